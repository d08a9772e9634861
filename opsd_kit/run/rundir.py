"""A run folder, and where a run starts in it. The safe default never destroys work:

- no complete checkpoint in the folder: a fresh run;
- checkpoints of the same config (`config.resumable_fields` aside): resume from the newest;
- checkpoints of another config: refused with the differing keys, unless ``overwrite=True``;
- ``resume=False`` over checkpoints: needs ``overwrite=True``; ``resume=True``: needs a checkpoint;
- another ``max_steps`` (extending a finished run, or shortening one): resumed when the learning
  rates of the steps already taken do not depend on it, so the run trains exactly as a fresh
  run of the new ``max_steps`` would (`max_steps_change_error`); refused otherwise.

`RunDir` is the one place that reads a run folder: its ``config.json``, checkpoints, final
adapter and metrics. The trainer asks it how to start (`RunDir.plan_start`), the demo whether a
finished run of a config is there (`RunDir.finished`), the command line and the study for the
saved config and the adapters to evaluate. It reads small files only, so it decides before any
model loads. Nothing is deleted except by `RunDir.discard_previous_run`, once a run starts.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

from opsd_kit.config import RETIRED_FIELDS, ConfigError, TrainConfig, resumable_fields
from opsd_kit.run.checkpoint import checkpoint_step, complete_checkpoints, remove_checkpoints

WAYS_OUT = ("start over with resume=False overwrite=True (`--set resume=false overwrite=true`; deletes them), "
            "or use another run_dir")


@dataclass(frozen=True)
class RunStart:
    """How `Trainer.train` starts: from ``checkpoint`` (None: fresh), deleting the previous
    run's checkpoints and final adapter first when ``discard`` is set."""

    checkpoint: Path | None = None
    discard: bool = False


class RunDir:
    """A training run's folder: ``config.json`` (the `TrainConfig` it was trained with),
    ``checkpoints/step-NNNNNN`` (complete ones only count), the final ``adapter`` and
    ``metrics.jsonl``."""

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def adapter(self) -> Path:
        """The final adapter's folder (written when a run ends or is interrupted)."""
        return self.path / "adapter"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @classmethod
    def holding(cls, adapter) -> RunDir:
        """The run folder an adapter folder (final or a checkpoint's) lies in: the nearest folder
        above it with a ``config.json``."""
        found = next((p for p in Path(adapter).resolve().parents if (p / "config.json").is_file()), None)
        if found is None:
            raise ConfigError(f"adapter {adapter} is not inside a run folder (no config.json above it), so its "
                              "model is unknown; pass the run folder it was trained in")
        return cls(found)

    # -- what the folder holds -------------------------------------------------------------
    def saved_config(self) -> dict:
        """The values of ``config.json`` as saved (tuples as lists); ConfigError naming the file
        when it cannot be read."""
        try:
            return json.loads(self.config_file.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{self.path} is not a run folder: {self.config_file} cannot be read ({err})") from err

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return complete_checkpoints(self.path)

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def adapters(self) -> list[tuple[int, Path]]:
        """``(step, adapter folder)`` of every complete checkpoint and of the final adapter (at
        the last step in ``metrics.jsonl``), by step."""
        found = {checkpoint_step(p): p / "adapter" for p in self.checkpoints()}
        last = self._last_metrics()
        if self.adapter.is_dir() and last is not None:
            found[last["step"]] = self.adapter
        return sorted(found.items())

    def newest_adapter(self) -> Path:
        """The final adapter, else the newest checkpoint's; ConfigError when there is neither
        (or no readable ``config.json``)."""
        self.saved_config()
        if self.adapter.is_dir():
            return self.adapter
        latest = self.latest_checkpoint()
        if latest is None:
            raise ConfigError(f"run folder {self.path} holds no final adapter and no complete checkpoint yet")
        return latest / "adapter"

    def _last_metrics(self) -> dict | None:
        lines = self.metrics_file.read_text().splitlines() if self.metrics_file.is_file() else []
        return json.loads(lines[-1]) if lines else None

    # -- decisions -------------------------------------------------------------------------
    def config_changes(self, config: TrainConfig) -> dict:
        """``{key: (saved value, new value)}`` for the keys outside `resumable_fields(config.algorithm)`
        (those that change nothing trained, or do not apply to the algorithm) where ``config`` differs
        from the saved one (a key an older config.json lacks counts as its default): a run of
        ``config`` may continue this folder's exactly when this is empty."""
        try:
            saved = json.loads(self.config_file.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{self.path} holds checkpoints but its config.json cannot be read ({err}), so "
                              f"whether they are of this config is unknown; {WAYS_OUT}") from err
        defaults = json.loads(json.dumps(TrainConfig().to_dict()))
        new = json.loads(json.dumps(config.to_dict()))  # tuples as lists, as in the saved file
        old = {**defaults, **saved}
        keys = [f.name for f in fields(TrainConfig)] + sorted(set(saved) - set(new) - set(RETIRED_FIELDS))
        resumable = resumable_fields(config.algorithm)
        return {k: (old.get(k), new.get(k)) for k in keys if k not in resumable and old.get(k) != new.get(k)}

    def plan_start(self, config: TrainConfig) -> RunStart:
        """Decide how a run of ``config`` starts here (module docstring); ConfigError when it may not."""
        latest = self.latest_checkpoint()
        if latest is None:
            if config.resume:
                raise ConfigError(f"resume=True, but {self.path} holds no complete checkpoint to resume from; "
                                  "leave resume unset to start fresh, or point run_dir at the run to continue")
            return RunStart()
        step = checkpoint_step(latest)
        if config.resume is False:
            if not config.overwrite:
                raise ConfigError(f"resume=False starts over, but {self.path} holds checkpoints (up to step {step}) "
                                  "and would delete them: add overwrite=True (`--set resume=false overwrite=true`), "
                                  "or use another run_dir")
            return RunStart(discard=True)
        changes = self.config_changes(config)
        if changes:
            if config.overwrite and config.resume is None:
                return RunStart(discard=True)
            listed = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())
            raise ConfigError(f"{self.path} holds checkpoints (up to step {step}) of another config ({listed}); "
                              f"resuming would mix two runs: {WAYS_OUT}")
        if step > config.max_steps:
            raise ConfigError(f"{self.path} holds a checkpoint of step {step}, past max_steps={config.max_steps}; "
                              f"set max_steps >= {step} to resume it, or {WAYS_OUT}")
        error = max_steps_change_error(config, self.saved_config().get("max_steps"), step)
        if error:
            raise ConfigError(f"{self.path}: {error}")
        return RunStart(checkpoint=latest)

    def finished(self, config: TrainConfig) -> bool:
        """Whether a run of ``config`` here has nothing left to train: it would resume
        (`plan_start`) from a checkpoint at the end ``config`` sets (step ``max_steps``, or the
        rollout-token budget ``max_generated_tokens`` spent), and the final adapter is saved.
        False where such a run would continue (a raised ``max_steps``), start fresh or be refused."""
        try:
            start = self.plan_start(config)
        except ConfigError:
            return False
        if start.checkpoint is None or not self.adapter.is_dir():
            return False
        step = checkpoint_step(start.checkpoint)
        if step >= config.max_steps:
            return True
        if config.max_generated_tokens is None or not self.metrics_file.is_file():
            return False
        rows = [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]
        generated = next((row["tokens/generated_total"] for row in rows if row["step"] == step), 0)
        return generated >= config.max_generated_tokens

    def discard_previous_run(self) -> int:
        """Delete the checkpoints and final adapter (``overwrite=True``); return how many complete
        checkpoints there were."""
        shutil.rmtree(self.adapter, ignore_errors=True)
        return remove_checkpoints(self.path)


def max_steps_change_error(config: TrainConfig, saved_max_steps: int | None, step: int) -> str | None:
    """Why a run that took ``step`` optimizer steps planned for ``saved_max_steps`` cannot go on
    to ``config.max_steps``, or None when it can.

    It can when the learning rates it already used do not depend on max_steps, so that going on
    gives exactly a fresh run of the new max_steps (the one its config.json then describes):
    ``lr_schedule='constant'``, or a run still in warmup. The factor at step s (0-based,
    `opsd_kit.trainer.make_scheduler`) is s / warmup_steps for s < warmup_steps and 1 at
    s = warmup_steps whatever max_steps is, so steps 0..step-1 agree when step <= warmup_steps + 1.
    A linear or cosine run past that decayed toward its old max_steps: resumed with another, its
    rate would jump to the new schedule's (a finished cosine run from about 0 back up)."""
    if saved_max_steps is None or saved_max_steps == config.max_steps:
        return None
    if config.lr_schedule == "constant" or step <= config.warmup_steps + 1:
        return None
    return (f"its {step} steps followed a {config.lr_schedule!r} learning-rate schedule planned for "
            f"max_steps={saved_max_steps}; going on to max_steps={config.max_steps} would switch to another "
            f"schedule midway (its rate jumps), which no fresh run of either length has. Keep "
            f"max_steps={saved_max_steps} to resume, or train {config.max_steps} steps from the start: "
            f"{WAYS_OUT} (lr_schedule='constant' runs can be extended)")
