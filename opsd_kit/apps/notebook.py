"""What the notebooks share: their papermill parameters checked (unknown names refused, mappings
given as JSON strings decoded), and for the training notebooks (01 OPSD, 02 GRPO/RLSD, 03 SFT)
a ready trainer from those parameters and the training curves of a finished run."""
from __future__ import annotations

import ast
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opsd_kit.config import TrainConfig
    from opsd_kit.trainer import Trainer, TrainResult

#: The settings a notebook prints after setting up its run.
SHOWN = ("model", "algorithm", "max_steps", "problems_per_step", "max_new_tokens", "temperature", "learning_rate")


def check_parameters() -> None:
    """Refuse papermill parameters the running notebook does not declare.

    papermill runs the cell tagged ``parameters`` and then the cell it injects (its first line is
    ``# Parameters``); a name injected there that the tagged cell does not set would be ignored
    with no more than a warning (``-p max_step 2`` would train the default number of steps), so
    this raises, listing the parameters the notebook takes. Outside papermill (JupyterLab, Colab)
    no cell is injected and there is nothing to check.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    history = list(shell.history_manager.input_hist_raw) if shell is not None else []
    injected = [i for i, source in enumerate(history) if i and source.lstrip().startswith("# Parameters")]
    if not injected:
        return
    declared = assigned_names(history[injected[-1] - 1])
    unknown = sorted(assigned_names(history[injected[-1]]) - declared)
    if unknown:
        raise ValueError(f"unknown notebook parameter(s) {unknown}: this notebook takes {sorted(declared)} "
                         "(other config fields go in `overrides`, e.g. -p overrides '{\"max_steps\": 2}')")


def assigned_names(source: str) -> set[str]:
    """The names a cell assigns at top level (``x = ...``, ``x: int = ...``)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        else:
            targets = [node.target] if isinstance(node, ast.AnnAssign) else []
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def as_mapping(value, name: str) -> dict:
    """A mapping parameter as given: a dict, or a JSON object string (papermill's
    ``-p overrides '{"max_steps": 2}'`` passes a string); "" and None are empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"parameter {name!r} is not valid JSON ({err}): {value!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"parameter {name!r} must be a mapping (a dict, or a JSON object string), "
                         f"got {type(value).__name__}: {value!r}")
    return dict(value)


def setup_run(profile: str, algorithm: str, run_dir: str, train_file: str = "", overrides: dict | str | None = None,
              **knobs) -> tuple[TrainConfig, list, Trainer]:
    """``(config, problems, trainer)`` of a notebook's run: ``profile`` for ``algorithm`` with
    ``overrides`` (any TrainConfig field; a dict or a JSON object string) and the notebook's
    top-level ``knobs`` (``max_steps=...``; None keeps the profile's value; a knob that
    contradicts ``overrides`` is an error), the problems of ``train_file`` (notebook 00's JSONL;
    "" means the profile's ``train_data``), and a Trainer, its model loaded and every prompt
    tokenised (over-long prompts fail here, before training). Prints the data report and the
    main settings."""
    from opsd_kit.config import load_profile
    from opsd_kit.data.sources import load_source
    from opsd_kit.trainer import Trainer

    overrides = as_mapping(overrides, "overrides")
    knobs = {k: v for k, v in knobs.items() if v is not None}
    clash = sorted(k for k in knobs if k in overrides and overrides[k] != knobs[k])
    if clash:
        raise ValueError(f"parameter(s) {clash} set twice, differently: top level "
                         f"{ {k: knobs[k] for k in clash} } and in overrides { {k: overrides[k] for k in clash} }")
    config = load_profile(profile, algorithm, run_dir=run_dir, **(overrides | knobs))
    problems, report = load_source(train_file or config.train_data, size=None if train_file else config.train_size,
                                   seed=config.seed)
    print(report)
    show_config(config)
    return config, problems, Trainer(config, problems=problems)


def show_config(config: TrainConfig, keys: tuple[str, ...] = SHOWN) -> None:
    """Print the ``keys`` settings of ``config`` that apply to its algorithm (`config.applies_to`)."""
    from opsd_kit.config import applies_to

    print({k: getattr(config, k) for k in keys if config.algorithm in applies_to(k)})


def plot_training(result: TrainResult, title: str):
    """Show a finished run's training curves and save them as ``training_curves.png`` in its
    folder; return its metrics table (`metrics.read_metrics`)."""
    import matplotlib.pyplot as plt

    from opsd_kit.evaluation.plots import training_curves
    from opsd_kit.run.metrics import read_metrics

    metrics = read_metrics(result.metrics_path)
    fig = training_curves(metrics, title=title)
    fig.savefig(result.run_dir / "training_curves.png", dpi=120)
    plt.show()
    return metrics
