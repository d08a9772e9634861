"""A small sweep on one budget, in the open: every trial's settings, training signal and accuracy
on problems held out of training as one JSON line, so that a reader can see a baseline got its
best settings. ``make sweep`` runs the two the demo's choices rest on, on the demo's validation
problems (notebook 00's ``val.jsonl``, disjoint from training and the held-out set):

    python -m opsd_kit.apps.sweep --profile cpu-demo --algorithm sft --out runs/demo-cpu-demo/sweep-warmup \\
        --grid '{"max_steps": [4, 8, 12]}' --train-file runs/demo-cpu-demo/data/warmup.jsonl \\
        --eval-file runs/demo-cpu-demo/data/val.jsonl
    python -m opsd_kit.apps.sweep --profile cpu-demo --out runs/demo-cpu-demo/sweep-grpo --design one-at-a-time \\
        --set '{"init_adapter": "runs/demo-cpu-demo/start"}' --grid '{"learning_rate": [5e-5, 1e-4, 5e-4], ...}' \\
        --train-file runs/demo-cpu-demo/data/train.jsonl --eval-file runs/demo-cpu-demo/data/val.jsonl

The grid (`DEFAULT_GRID`, or ``--grid`` as a JSON object of TrainConfig field -> list of values)
names the reward, the group size, the temperature, ``num_iterations`` and the learning rate.
``--design grid`` trains every combination; ``one-at-a-time`` trains the profile's settings and
each value alone changed from them (1 + the number of values trials, blind to interactions).
Every other setting is the profile's (its ``max_generated_tokens`` is the budget every trial
gets). Every trial's config is validated before the first one trains. Trials already in
``<out>/sweep.jsonl`` are skipped, so a stopped sweep continues where it stopped.

Each line: ``trial``, ``overrides``, ``steps``, ``generated_tokens``, ``reward_mean`` and
``mixed_groups_mean`` (over the run's steps: 0 means GRPO never had a signal),
``rollout_correct_last``, ``train_seconds`` and, with an evaluation set, ``strict`` and
``lenient`` held-out avg@k of the final adapter with their 95% intervals.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
from pathlib import Path

DEFAULT_GRID: dict[str, list] = {
    "rewards": [["correct"], ["correct_lenient"], ["correct", "format"]],
    "num_generations": [4, 8],
    "temperature": [0.6, 1.0],
    "num_iterations": [1, 2],
    "learning_rate": [1e-4, 5e-4],
}
"""48 trials: the settings the issue names (reward, group size, temperature, reuse, step size)."""

RESULTS = "sweep.jsonl"


DESIGNS = ("grid", "one-at-a-time")


def grid_trials(grid: dict, design: str = "grid") -> list[dict]:
    """The trials of ``grid`` as override dicts: 'grid', every combination of its values (the first
    key varies slowest); 'one-at-a-time', no override (the profile's settings) and then each value
    alone, in the grid's order."""
    if not grid or any(not isinstance(v, list) or not v for v in grid.values()):
        raise ValueError(f"a sweep grid maps each field to a non-empty list of values, got {grid!r}")
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
    if design == "one-at-a-time":
        return [{}, *({key: value} for key, values in grid.items() for value in values)]
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def trial_name(profile: str, algorithm: str, overrides: dict) -> str:
    """A stable name of a trial (the same profile, algorithm and overrides, the same name)."""
    key = {"profile": profile, "algorithm": algorithm, "overrides": overrides}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def run_sweep(profile: str, out_dir, grid: dict | None = None, *, design: str = "grid", algorithm: str = "grpo",
              overrides: dict | None = None, train_file: str = "", eval_file: str = "",
              eval_profile: str | None = None, train_fn=None, evaluate_fn=None) -> list[dict]:
    """Train (and evaluate) every trial of ``grid`` (`grid_trials` with ``design``) not yet in
    ``<out_dir>/sweep.jsonl``; return all rows. ``overrides`` apply to every trial;
    ``train_fn(config, problems)`` and ``evaluate_fn(run_dir, eval_config, problems)`` replace
    training and evaluation (tests)."""
    from opsd_kit.config import load_profile

    out_dir = Path(out_dir)
    trials = grid_trials(DEFAULT_GRID if grid is None else grid, design)
    configs = []
    for trial in trials:  # every trial's config validated before anything trains
        settings = {**(overrides or {}), **trial}
        name = trial_name(profile, algorithm, settings)
        configs.append((name, trial, load_profile(profile, algorithm, **settings, run_dir=str(out_dir / name),
                                                  progress=False)))
    problems = _problems(train_file, configs[0][2]) if train_file else None
    eval_config, eval_problems = (None, None)
    if eval_file:
        from opsd_kit.evaluation.study import held_out

        eval_config, eval_problems = held_out(eval_profile or profile, eval_file)
    path = out_dir / RESULTS
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    done = {row["trial"] for row in rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, trial, config in configs:
        if name in done:
            continue
        print(f"[sweep] {name}: {json.dumps(trial)}", flush=True)
        (train_fn or _train)(config, problems)
        row = dict(trial=name, overrides=trial, **_training_summary(Path(config.run_dir)))
        if eval_config is not None:
            row.update((evaluate_fn or _evaluate)(config.run_dir, eval_config, eval_problems))
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    return rows


def _problems(train_file: str, config):
    from opsd_kit.data.sources import load_source

    return load_source(train_file, size=None, seed=config.seed)[0]


def _train(config, problems) -> None:
    from opsd_kit.trainer import train

    train(config, problems=problems)


def _training_summary(run_dir: Path) -> dict:
    """What a trial's metrics.jsonl says about its training signal and cost."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl is empty: the trial trained no step")

    def mean(key):
        values = [r[key] for r in rows if key in r]
        return sum(values) / len(values) if values else None

    last = rows[-1]
    return {"steps": last["step"], "generated_tokens": last.get("tokens/generated_total"),
            "reward_mean": mean("grpo/reward_mean"), "mixed_groups_mean": mean("grpo/mixed_groups"),
            "rollout_correct_last": last.get("rollout/correct"), "train_seconds": last.get("time/elapsed")}


def _evaluate(run_dir: str, eval_config, problems) -> dict:
    """Held-out avg@k of the trial's final adapter in both modes, with 95% intervals."""
    from opsd_kit.evaluation.evaluate import evaluate_model
    from opsd_kit.evaluation.stats import accuracy_interval, bootstrap_indices
    from opsd_kit.evaluation.study import load_run_policy

    policy, builder = load_run_policy(run_dir, Path(run_dir) / "adapter", student_thinking=eval_config.student_thinking)
    result = evaluate_model(policy.model, policy.tokenizer, problems, builder=builder,
                            settings=eval_config.settings(), mode=eval_config.mode, seed=eval_config.seed)
    indices = bootstrap_indices(len(problems), eval_config.n_bootstrap, eval_config.seed) if eval_config.k > 1 else None
    out = {}
    for mode in ("strict", "lenient"):
        low, high = accuracy_interval(result.table[f"avg_{mode}"].to_numpy(float), eval_config.k,
                                      confidence=eval_config.confidence, indices=indices)
        out[mode] = {"accuracy": result.summary[f"eval/{mode}/avg@k"], "ci_low": low, "ci_high": high}
    return out


def main(argv=None) -> int:
    from opsd_kit.config import ConfigError, profile_names

    parser = argparse.ArgumentParser(prog="python -m opsd_kit.apps.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu-demo", choices=profile_names())
    parser.add_argument("--algorithm", default="grpo", choices=("grpo", "rlsd", "sft"))
    parser.add_argument("--out", required=True, help="folder for the trials' runs and sweep.jsonl")
    parser.add_argument("--grid", default=None, help="JSON object: TrainConfig field -> list of values "
                                                     "(default: DEFAULT_GRID)")
    parser.add_argument("--design", default="grid", choices=DESIGNS,
                        help="every combination of the grid's values, or each alone changed from the profile's")
    parser.add_argument("--set", default="{}", help="JSON object of overrides every trial gets")
    parser.add_argument("--train-file", default="", help="training problems (default: the profile's train_data)")
    parser.add_argument("--eval-file", default="", help="held-out problems to evaluate each trial on (default: none)")
    parser.add_argument("--eval-profile", default=None, help="evaluation protocol (default: the profile's)")
    parser.add_argument("--dry-run", action="store_true", help="list the trials and stop")
    args = parser.parse_args(argv)
    try:
        grid = DEFAULT_GRID if args.grid is None else json.loads(args.grid)
        if args.dry_run:
            for trial in grid_trials(grid, args.design):
                print(trial_name(args.profile, args.algorithm, {**json.loads(args.set), **trial}), json.dumps(trial))
            return 0
        run_sweep(args.profile, args.out, grid, design=args.design, algorithm=args.algorithm,
                  overrides=json.loads(args.set),
                  train_file=args.train_file, eval_file=args.eval_file, eval_profile=args.eval_profile)
    except (ConfigError, ValueError) as err:
        print(f"sweep: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
