"""The `opsd-kit` command (also ``python -m opsd_kit.apps.cli``):

    opsd-kit train --profile tiny --algorithm opsd --set max_steps=5
    opsd-kit eval runs/tiny-opsd --data reasoning_gym:chain_sum --eval-profile tiny
    opsd-kit eval runs/tiny-opsd --data reasoning_gym:chain_sum --set engine=hf   # generate, the reference
    opsd-kit compare runs/tiny-opsd runs/tiny-grpo --data eval.jsonl --out runs/study
    opsd-kit profiles --show tiny
    opsd-kit export runs/tiny-opsd runs/tiny-opsd-merged --merge

Runs under ``accelerate launch -m opsd_kit.apps.cli train ...`` for several processes. A config,
data or model-name error (a row whose prompt cannot fit ``max_prompt_tokens`` included: it is
found when the data loads, before the model does) prints one line to stderr and exits 2; a
training run stopped by Ctrl-C or SIGTERM exits 128 + the signal (130, 143) after its checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from opsd_kit.apps.export import add_export_options
from opsd_kit.config import ALGORITHMS, ConfigError, EvalConfig, TrainConfig, eval_profile_names, profile_names
from opsd_kit.run.rundir import RunDir

MODES = ("strict", "lenient")


def parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` pairs; values are parsed as JSON when they can be (numbers, true, null)."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opsd-kit", description="On-Policy Self-Distillation research kit.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,compare,export,profiles}")

    def overrides(p, cls, what: str) -> None:
        keys = ", ".join(f.name for f in dataclasses.fields(cls))
        p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                       help=f"{what} overrides (JSON values: 3, 1e-4, true, null). Keys: {keys}")

    t = sub.add_parser("train", help="train with OPSD or a baseline",
                       description="Train. Rerunning the same command resumes from the newest checkpoint; a run "
                                   "folder of another config is refused (--set resume=false overwrite=true starts "
                                   "over).")
    t.add_argument("--profile", default="tiny", choices=profile_names())
    t.add_argument("--algorithm", default="opsd", choices=ALGORITHMS)
    overrides(t, TrainConfig, "training config")

    e = sub.add_parser("eval", help="held-out accuracy of a run or an adapter, with 95%% intervals")
    e.add_argument("path", help="a run folder (its final adapter, else its newest checkpoint) or an adapter folder "
                                "inside a run folder")
    e.add_argument("--data", default=None, help="held-out problems: a source spec (gsm8k:test, "
                                                "reasoning_gym:chain_sum, ...) or a file; default: the protocol's")
    e.add_argument("--eval-profile", default=None, choices=eval_profile_names(),
                   help="evaluation protocol (default: the one of the run's profile)")
    overrides(e, EvalConfig, "evaluation config")

    c = sub.add_parser("compare", help="several runs on one held-out set: one table and one figure per mode")
    c.add_argument("runs", nargs="+", metavar="[NAME=]RUN_DIR",
                   help="run folders; NAME defaults to the run's algorithm (opsd and grpo give the token ratio)")
    c.add_argument("--data", required=True, help="held-out problems: a source spec or a file")
    c.add_argument("--out", required=True, help="folder for points.csv, comparisons.csv and the figures")
    c.add_argument("--eval-profile", default=None, choices=eval_profile_names(),
                   help="evaluation protocol (default: the one of the first run's profile)")
    c.add_argument("--points", type=int, default=1, help="checkpoints evaluated per run (default 1: the final)")
    c.add_argument("--workers", type=int, default=1, help="evaluation processes")
    overrides(c, EvalConfig, "evaluation config")

    x = sub.add_parser("export", help="a run's adapter as a clean adapter folder, or merged into a full model",
                       description="Export an adapter (opsd_kit.apps.export): OUT holds the adapter naming its "
                                   "base by public id, or with --merge a plain transformers model folder.")
    x.add_argument("path", help="a run folder (its final adapter, else its newest checkpoint) or an adapter folder")
    add_export_options(x)

    p = sub.add_parser("profiles", help="list the profiles, or show one's every setting")
    p.add_argument("--show", default=None, choices=profile_names(), metavar="NAME",
                   help=f"print every training setting of profile NAME with its meaning ({', '.join(profile_names())})")
    p.add_argument("--algorithm", default="opsd", choices=ALGORITHMS)
    return parser


def main(argv: list[str] | None = None) -> int:
    from opsd_kit.data.problems import DataError
    from opsd_kit.models import ModelNotAvailableError
    from opsd_kit.prompts import PromptTooLongError
    from opsd_kit.run.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    command = {"train": _train, "eval": _eval, "compare": _compare, "export": _export,
               "profiles": _profiles}[args.command]
    try:
        return command(args)
    except (ConfigError, DataError, CheckpointError, ModelNotAvailableError, PromptTooLongError) as err:
        print(f"opsd-kit {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------------------------
def _train(args) -> int:
    from opsd_kit.config import load_profile
    from opsd_kit.trainer import train

    result = train(load_profile(args.profile, args.algorithm, **parse_overrides(args.set)))
    print(json.dumps({"run_dir": str(result.run_dir), "steps": result.steps,
                      "interrupted": result.interrupted, "ledger": result.ledger}))
    return 128 + result.signal if result.interrupted else 0


def _eval(args) -> int:
    from opsd_kit.data.sources import load_source
    from opsd_kit.evaluation.evaluate import evaluate_model
    from opsd_kit.evaluation.stats import accuracy_interval, bootstrap_indices
    from opsd_kit.evaluation.study import eval_prompt, eval_prompt_check, load_run_policy

    run_dir, adapter = _locate_adapter(Path(args.path))
    config = _eval_config(args, run_dir)
    prompt = eval_prompt(config)
    check = eval_prompt_check(run_dir, student_thinking=config.student_thinking, prompt=prompt)
    problems, _report = load_source(config.data, size=config.size, seed=config.seed, check=check)
    policy, builder = load_run_policy(run_dir, adapter, student_thinking=config.student_thinking, prompt=prompt)
    result = evaluate_model(policy.model, policy.tokenizer, problems, builder=builder, settings=config.settings(),
                            mode=config.mode, seed=config.seed, progress=sys.stderr.isatty(), engine=config.engine)
    indices = bootstrap_indices(len(problems), config.n_bootstrap, config.seed) if config.k > 1 else None
    print(f"{adapter} on {config.data}: {len(problems)} problems, k = {config.k}")
    for mode in MODES:
        low, high = accuracy_interval(result.table[f"avg_{mode}"].to_numpy(float), config.k,
                                      confidence=config.confidence, indices=indices)
        print(f"{mode:>8} avg@{config.k} {result.summary[f'eval/{mode}/avg@k']:.3f}  "
              f"{config.confidence:.0%} interval [{low:.3f}, {high:.3f}]")
    return 0


def _compare(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from opsd_kit.data.sources import load_source
    from opsd_kit.evaluation.plots import token_efficiency
    from opsd_kit.evaluation.study import eval_prompt, eval_prompt_check, evaluate_points, study_points, summarize

    runs = dict(_named_run(entry) for entry in args.runs)
    if len(runs) != len(args.runs):
        raise ConfigError(f"two runs share a name in {args.runs}; name them NAME=RUN_DIR")
    config = _eval_config(args, Path(next(iter(runs.values()))))
    check = eval_prompt_check(next(iter(runs.values())), student_thinking=config.student_thinking,
                              prompt=eval_prompt(config))
    problems, _report = load_source(config.data, size=config.size, seed=config.seed, check=check)
    points = study_points(runs, {name: args.points for name in runs})
    out = Path(args.out)
    results = evaluate_points(points, problems, config, model_run=next(iter(runs.values())),
                              out_dir=out / "evaluations", workers=args.workers)
    summary = summarize(points, results, config)
    summary["points"].to_csv(out / "points.csv", index=False)
    summary["comparisons"].to_csv(out / "comparisons.csv", index=False)
    for mode in MODES:
        figure = token_efficiency(summary["points"], mode=mode, ratio=summary["tokens_to_equal_accuracy"][mode])
        figure.savefig(out / f"token_efficiency_{mode}.png", dpi=120)
    columns = ["method", "step", "generated_tokens"] + [f"{m}/{c}" for m in MODES for c in ("avg@k", "ci_low",
                                                                                             "ci_high")]
    print(summary["points"][columns].to_string(index=False, float_format="{:.3f}".format))
    paired = ["a", "a_step", "b", "b_step"] + [f"{m}/{c}" for m in MODES for c in ("diff", "ci_low", "ci_high", "p",
                                                                                    "test")]
    print(f"\npaired differences (a - b) and the paired test of each (k = {config.k}: "
          f"{'exact McNemar' if config.k == 1 else 'sign-flip permutation test of the per-problem avg@k'}):")
    print(summary["comparisons"][paired].to_string(index=False, float_format="{:.3g}".format))
    for mode in MODES:
        r = summary["tokens_to_equal_accuracy"][mode]
        print(f"tokens to equal accuracy ({mode}): " + (f"ratio {r['ratio']:.3g}" if r.get("ratio") is not None
                                                         else f"undefined: {r['reason']}"))
    print(f"tables and figures in {out}")
    return 0


def _export(args) -> int:
    from opsd_kit.apps.export import export

    path = Path(args.path)
    adapter = path if (path / "adapter_config.json").is_file() else _locate_adapter(path)[1]
    try:
        out = export(adapter, args.out, merge=args.merge, push_to_hub=args.push_to_hub, dtype=args.dtype)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        raise ConfigError(str(err)) from err
    print(f"exported {'the merged model' if args.merge else 'the adapter'} {adapter} to {out}")
    return 0


def _profiles(args) -> int:
    from opsd_kit.config import applies_to, field_docs, load_profile

    if args.show is None:
        print("\n".join(profile_names()))
        return 0
    config = load_profile(args.show, args.algorithm)
    docs = field_docs(TrainConfig)
    for name, value in config.to_dict().items():
        unused = "" if args.algorithm in applies_to(name) else f"  (not used by algorithm={args.algorithm!r})"
        print(f"{name} = {value!r}{unused}")
        for line in docs.get(name, "").splitlines():
            print(f"    {line}")
    return 0


# ---------------------------------------------------------------------------------------------
def _eval_config(args, run_dir: Path) -> EvalConfig:
    """The protocol of ``--eval-profile`` (default: the run's profile's) with ``--set`` and ``--data``."""
    from opsd_kit.config import load_eval_profile

    name = args.eval_profile or RunDir(run_dir).saved_config().get("profile")
    if name is None:
        raise ConfigError(f"the run in {run_dir} was not built from a profile; choose a protocol with "
                          f"--eval-profile ({', '.join(eval_profile_names())})")
    overrides = parse_overrides(args.set)
    if args.data:
        overrides["data"] = args.data
    config = load_eval_profile(name, **overrides)
    if not config.data:
        raise ConfigError(f"evaluation profile {name!r} names no held-out data; pass --data with a source spec "
                          "or a file")
    return config


def _locate_adapter(path: Path) -> tuple[Path, Path]:
    """``(run folder, adapter folder)`` for a run folder (its newest adapter) or an adapter folder inside one."""
    if (path / "adapter_config.json").is_file():
        return RunDir.holding(path).path, path
    return path, RunDir(path).newest_adapter()


def _named_run(entry: str) -> tuple[str, str]:
    """``NAME=RUN_DIR`` or ``RUN_DIR`` (named by the run's algorithm)."""
    name, sep, run_dir = entry.partition("=")
    if not sep:
        run_dir = entry
    saved = RunDir(run_dir).saved_config()
    return (name if sep else saved.get("algorithm", Path(run_dir).name)), run_dir


if __name__ == "__main__":
    sys.exit(main())
