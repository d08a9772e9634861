"""A tiny-profile training run that SIGKILLs itself at a chosen point (used by test_kill_resume).

    python _train_child.py '{"algorithm": "opsd", "overrides": {...}, "kill": {"where": ..., "at": n}}'

``kill.where`` says where the process dies, ``kill.at`` at which occurrence (1-based):

- ``"loss"``: inside the n-th micro-batch loss of the run (mid-step);
- ``"checkpoint_adapter"``: the n-th checkpoint write, after the adapter files, before the trainer state;
- ``"checkpoint_state"``: the n-th checkpoint write, after trainer_state.pt, before the COMPLETE marker;
- ``"checkpoint_rename"``: the n-th checkpoint write, complete under its temporary name, before the rename;
- ``"checkpoint_prune"``: the n-th deletion of a checkpoint folder, half-way through it;
- ``"metrics"``: the n-th metrics line, half-written.

The process exits with -SIGKILL when the point is reached (the parent checks it did).

    python _train_child.py '{"cli": ["train", ...], "signal": {"name": "SIGTERM", "at_step": n}}'

runs the command line instead, sending itself the signal as optimizer step ``n`` begins (a
Ctrl-C or a scheduler's SIGTERM); the process exits with the command's exit code.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class Counter:
    def __init__(self, at: int):
        self.at, self.n = at, 0

    def hit(self) -> bool:
        self.n += 1
        return self.n == self.at


def install(trainer, where: str, at: int) -> None:
    import torch

    from opsd_kit.run import checkpoint, metrics

    count = Counter(at)
    if where == "loss":
        loss = trainer.algorithm.loss

        def killing_loss(mb):
            if count.hit():
                die()
            return loss(mb)

        trainer.algorithm.loss = killing_loss
    elif where == "checkpoint_adapter":
        save_adapter = trainer.policy.save_adapter

        def killing_save_adapter(path):
            save_adapter(path)
            if Path(path).parent.name.startswith(".step-") and count.hit():
                die()

        trainer.policy.save_adapter = killing_save_adapter
    elif where == "checkpoint_state":
        save = torch.save

        def killing_save(obj, f, *args, **kwargs):
            save(obj, f, *args, **kwargs)
            if Path(str(f)).name == "trainer_state.pt" and count.hit():
                die()

        torch.save = killing_save
    elif where == "checkpoint_rename":
        rename = os.rename

        def killing_rename(src, dst, *args, **kwargs):
            if Path(src).name.startswith(".step-") and (Path(src) / "COMPLETE").is_file() and count.hit():
                die()
            return rename(src, dst, *args, **kwargs)

        checkpoint.os.rename = killing_rename
    elif where == "checkpoint_prune":
        rmtree = shutil.rmtree

        def killing_rmtree(path, *args, **kwargs):
            files = sorted(p for p in Path(path).rglob("*") if p.is_file() and p.name != "COMPLETE")
            if any(p.name == "trainer_state.pt" for p in files) and count.hit():
                for p in files[::2]:  # half of the files are gone, the COMPLETE marker is not
                    p.unlink()
                die()
            return rmtree(path, *args, **kwargs)

        checkpoint.shutil.rmtree = killing_rmtree
    elif where == "metrics":
        log = metrics.MetricsLogger.log

        def killing_log(self, row):
            if count.hit():
                line = json.dumps({k: metrics._jsonable(v) for k, v in row.items()})
                with self.path.open("a") as f:
                    f.write(line[: len(line) // 2])
                die()
            return log(self, row)

        metrics.MetricsLogger.log = killing_log
    else:
        raise SystemExit(f"unknown kill point {where!r}")


def signal_at_step(spec: dict) -> None:
    from opsd_kit.trainer import Trainer

    number, count = signal.Signals[spec["name"]], Counter(spec["at_step"])
    step = Trainer._optimizer_step

    def signalling_step(self):
        if count.hit():
            os.kill(os.getpid(), number)
        return step(self)

    Trainer._optimizer_step = signalling_step


def main() -> None:
    import torch

    from opsd_kit.apps.cli import main as cli_main
    from opsd_kit.config import load_profile
    from opsd_kit.trainer import Trainer

    torch.set_num_threads(1)
    spec = json.loads(sys.argv[1])
    if "cli" in spec:
        signal_at_step(spec["signal"])
        sys.exit(cli_main(spec["cli"]))
    trainer = Trainer(load_profile("tiny", spec["algorithm"], **spec["overrides"]))
    install(trainer, spec["kill"]["where"], spec["kill"]["at"])
    trainer.train()
    print("finished without being killed")


if __name__ == "__main__":
    main()
