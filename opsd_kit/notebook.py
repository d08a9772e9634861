"""What the training notebooks (01 OPSD, 02 GRPO/RLSD, 03 SFT) share: from their papermill
parameters to a ready trainer, and from a finished run to its training curves."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import TrainConfig
    from .trainer import Trainer, TrainResult

#: The settings a notebook prints after setting up its run.
SHOWN = ("model", "algorithm", "max_steps", "problems_per_step", "max_new_tokens", "temperature", "learning_rate")


def setup_run(profile: str, algorithm: str, run_dir: str, train_file: str = "",
              overrides: dict | None = None) -> tuple[TrainConfig, list, Trainer]:
    """``(config, problems, trainer)`` of a notebook's run: ``profile`` for ``algorithm`` with
    ``overrides`` (any TrainConfig field), the problems of ``train_file`` (notebook 00's JSONL; ""
    means the profile's ``train_data``), and a Trainer, its model loaded and every prompt
    tokenised (over-long prompts fail here, before training). Prints the data report and the
    main settings."""
    from .config import load_profile
    from .data import load_source
    from .trainer import Trainer

    config = load_profile(profile, algorithm, run_dir=run_dir, **(overrides or {}))
    problems, report = load_source(train_file or config.train_data, size=None if train_file else config.train_size,
                                   seed=config.seed)
    print(report)
    show_config(config)
    return config, problems, Trainer(config, problems=problems)


def show_config(config: TrainConfig, keys: tuple[str, ...] = SHOWN) -> None:
    """Print the ``keys`` settings of ``config``."""
    print({k: getattr(config, k) for k in keys})


def plot_training(result: TrainResult, title: str):
    """Show a finished run's training curves and save them as ``training_curves.png`` in its
    folder; return its metrics table (`metrics.read_metrics`)."""
    import matplotlib.pyplot as plt

    from .metrics import read_metrics
    from .plots import training_curves

    metrics = read_metrics(result.metrics_path)
    fig = training_curves(metrics, title=title)
    fig.savefig(result.run_dir / "training_curves.png", dpi=120)
    plt.show()
    return metrics
