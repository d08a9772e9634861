"""Where a run starts in its run folder. The safe default never destroys work:

- no complete checkpoint in ``run_dir``: a fresh run;
- checkpoints of the same config (`RESUMABLE_CHANGES` aside): resume from the newest;
- checkpoints of another config: refused with the differing keys, unless ``overwrite=True``;
- ``resume=False`` over checkpoints: needs ``overwrite=True``; ``resume=True``: needs a checkpoint;
- another ``max_steps`` (extending a finished run, or shortening one): resumed when the learning
  rates of the steps already taken do not depend on it, so the run trains exactly as a fresh
  run of the new ``max_steps`` would (`max_steps_change_error`); refused otherwise.

`plan_start` reads small files only (the run's ``config.json`` and the checkpoint names), so it
runs before any model loads. Nothing is deleted here: `discard_previous_run` does it, once the
run starts.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

from opsd_kit.config import ConfigError, TrainConfig, resumable_fields
from opsd_kit.run.checkpoint import checkpoint_step, latest_checkpoint, remove_checkpoints

RESUMABLE_CHANGES = resumable_fields()
"""Keys a resumed run may change: they do not change what is trained (`config.resumable_fields`)."""

WAYS_OUT = ("start over with resume=False overwrite=True (`--set resume=false overwrite=true`; deletes them), "
            "or use another run_dir")


@dataclass(frozen=True)
class RunStart:
    """How `Trainer.train` starts: from ``checkpoint`` (None: fresh), deleting the previous
    run's checkpoints and final adapter first when ``discard`` is set."""

    checkpoint: Path | None = None
    discard: bool = False


def plan_start(config: TrainConfig) -> RunStart:
    """Decide how ``config``'s run starts in its run folder; raise ConfigError when it may not."""
    run_dir = Path(config.run_dir)
    latest = latest_checkpoint(run_dir)
    if latest is None:
        if config.resume:
            raise ConfigError(f"resume=True, but {run_dir} holds no complete checkpoint to resume from; leave "
                              "resume unset to start fresh, or point run_dir at the run to continue")
        return RunStart()
    step = checkpoint_step(latest)
    if config.resume is False:
        if not config.overwrite:
            raise ConfigError(f"resume=False starts over, but {run_dir} holds checkpoints (up to step {step}) "
                              "and would delete them: add overwrite=True (`--set resume=false overwrite=true`), or "
                              "use another run_dir")
        return RunStart(discard=True)
    changes = config_changes(run_dir, config)
    if changes:
        if config.overwrite and config.resume is None:
            return RunStart(discard=True)
        listed = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())
        raise ConfigError(f"{run_dir} holds checkpoints (up to step {step}) of another config ({listed}); "
                          f"resuming would mix two runs: {WAYS_OUT}")
    if step > config.max_steps:
        raise ConfigError(f"{run_dir} holds a checkpoint of step {step}, past max_steps={config.max_steps}; "
                          f"set max_steps >= {step} to resume it, or {WAYS_OUT}")
    error = max_steps_change_error(config, _saved_config(run_dir).get("max_steps"), step)
    if error:
        raise ConfigError(f"{run_dir}: {error}")
    return RunStart(checkpoint=latest)


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


def _saved_config(run_dir) -> dict:
    path = Path(run_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{run_dir} holds checkpoints but its config.json cannot be read ({err}), so whether "
                          f"they are of this config is unknown; {WAYS_OUT}") from err


def config_changes(run_dir, config: TrainConfig) -> dict:
    """``{key: (saved value, new value)}`` for the keys outside `resumable_fields(config.algorithm)`
    (those that change nothing trained, or do not apply to the algorithm) where ``config`` differs
    from the config saved in ``run_dir`` (a key an older config.json lacks counts as its default)."""
    saved = _saved_config(run_dir)
    defaults = json.loads(json.dumps(TrainConfig().to_dict()))
    new = json.loads(json.dumps(config.to_dict()))  # tuples as lists, as in the saved file
    old = {**defaults, **saved}
    keys = [f.name for f in fields(TrainConfig)] + sorted(set(saved) - set(new))
    resumable = resumable_fields(config.algorithm)
    return {k: (old.get(k), new.get(k)) for k in keys if k not in resumable and old.get(k) != new.get(k)}


def discard_previous_run(run_dir) -> int:
    """Delete ``run_dir``'s checkpoints and final adapter (``overwrite=True``); return how many
    complete checkpoints there were."""
    shutil.rmtree(Path(run_dir) / "adapter", ignore_errors=True)
    return remove_checkpoints(run_dir)
