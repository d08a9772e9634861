"""What the notebooks share: their papermill parameters checked (unknown names refused, mappings
given as JSON strings decoded), and for the training notebooks (01 OPSD, 02 GRPO/RLSD, 03 SFT)
a ready trainer from those parameters and the training curves of a finished run; and the
committed form of the notebooks (`normalised`):

    python -m opsd_kit.apps.notebook --strip notebooks/*.ipynb   # rewrite them in that form
    python -m opsd_kit.apps.notebook --check notebooks/*.ipynb   # exit 1 naming any that is not
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path
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


#: The notebook metadata of the committed notebooks; JupyterLab and papermill add more on save.
NOTEBOOK_METADATA = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                     "language_info": {"name": "python"}}


def normalised(text: str) -> str:
    """The committed form of a notebook's JSON ``text``: no outputs, no execution counts, cell
    metadata reduced to non-empty ``tags`` (the ``parameters`` tag papermill reads), notebook
    metadata `NOTEBOOK_METADATA`, nbformat 4.5 with the cells' ids kept, written as nbformat
    writes (indent 1, sorted keys, a final newline). Opening and saving a notebook in JupyterLab
    changes none of what this keeps."""
    notebook = json.loads(text)
    cells = []
    for cell in notebook["cells"]:
        out = {"cell_type": cell["cell_type"], "id": cell.get("id"), "metadata": {}, "source": cell["source"]}
        if out["id"] is None:
            del out["id"]
        tags = cell.get("metadata", {}).get("tags")
        if tags:
            out["metadata"]["tags"] = tags
        if cell["cell_type"] == "code":
            out.update(execution_count=None, outputs=[])
        elif cell.get("attachments"):
            out["attachments"] = cell["attachments"]
        cells.append(out)
    clean = {"cells": cells, "metadata": NOTEBOOK_METADATA, "nbformat": 4, "nbformat_minor": 5}
    return json.dumps(clean, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opsd_kit.apps.notebook",
                                     description="Keep notebooks in their committed form (see `normalised`).")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--strip", action="store_true", help="rewrite each notebook in its committed form")
    action.add_argument("--check", action="store_true", help="exit 1 if a notebook is not in its committed form")
    parser.add_argument("notebooks", nargs="+", type=Path)
    args = parser.parse_args(argv)
    changed = []
    for path in args.notebooks:
        text = path.read_text(encoding="utf-8")
        if normalised(text) != text:
            changed.append(str(path))
            if args.strip:
                path.write_text(normalised(text), encoding="utf-8")
    if args.check and changed:
        print(f"not in the committed form (outputs, counts or metadata): {changed}; run "
              f"python -m opsd_kit.apps.notebook --strip {' '.join(changed)}", file=sys.stderr)
        return 1
    if args.strip:
        print(f"normalised {len(changed)} of {len(args.notebooks)} notebooks" + (f": {changed}" if changed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
