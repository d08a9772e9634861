"""The main job: notebooks 00 to 04 in order under papermill, into one run folder.

``python -m opsd_kit.demo --profile cpu-demo --run-dir runs/demo`` (what ``make demo`` runs).
The run folder gets the executed notebooks, each method's run (metrics, checkpoints,
adapter), the evaluation tables and figures, and ``summary.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

NOTEBOOKS = ("00_data_prep", "01_opsd_training", "02_grpo_baseline", "03_sft_baseline",
             "04_evaluation_and_token_efficiency")

#: Data and evaluation sizes per profile (the training settings live in the profile itself).
DEMO_SIZES = {
    "tiny": dict(train_size=16, eval_size=4, k=2, eval_max_new_tokens=8, gap_problems=2),
    "cpu-demo": dict(train_size=256, eval_size=32, k=2, eval_max_new_tokens=64, gap_problems=8),
}


def notebook_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "notebooks"


def demo_parameters(profile: str, run_dir: Path) -> dict[str, dict]:
    """Papermill parameters for each notebook."""
    from .config import load_profile

    if profile not in DEMO_SIZES:
        raise ValueError(f"make demo supports PROFILE in {sorted(DEMO_SIZES)}, got {profile!r}")
    sizes = DEMO_SIZES[profile]
    cfg = load_profile(profile)
    data = run_dir / "data"
    common = dict(profile=profile, train_file=str(data / "train.jsonl"), eval_file=str(data / "eval.jsonl"))
    return {
        "00_data_prep": dict(train_source=cfg.train_data, train_size=sizes["train_size"], eval_source="",
                             eval_size=sizes["eval_size"], seed=cfg.seed, model=cfg.model, out_dir=str(data)),
        "01_opsd_training": dict(common, run_dir=str(run_dir / "opsd"), gap_problems=sizes["gap_problems"]),
        "02_grpo_baseline": dict(common, run_dir=str(run_dir / "grpo")),
        "03_sft_baseline": dict(common, run_dir=str(run_dir / "sft")),
        "04_evaluation_and_token_efficiency": dict(
            profile=profile, eval_file=common["eval_file"], train_file=common["train_file"],
            out_dir=str(run_dir / "study"),
            runs={m: str(run_dir / m) for m in ("opsd", "grpo", "sft")}, k=sizes["k"],
            max_new_tokens=sizes["eval_max_new_tokens"]),
    }


def run_demo(profile: str, run_dir, *, kernel: str | None = None, notebooks=NOTEBOOKS) -> dict:
    """Execute the notebooks in order; stop at the first failure (papermill keeps the failed
    notebook, with its error, in the run folder). Returns and writes ``summary.json``."""
    import papermill

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    params = demo_parameters(profile, run_dir)
    timings = {}
    for name in notebooks:
        start = time.perf_counter()
        print(f"[demo] {name} ...", flush=True)
        papermill.execute_notebook(str(notebook_dir() / f"{name}.ipynb"), str(run_dir / f"{name}.ipynb"),
                                   parameters=params[name], kernel_name=kernel, cwd=str(run_dir),
                                   progress_bar=False)
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"[demo] {name} done in {timings[name]} s", flush=True)
    study = run_dir / "study"
    summary = {"profile": profile, "run_dir": str(run_dir), "notebook_seconds": timings,
               "total_seconds": round(sum(timings.values()), 1)}
    if (study / "study.json").is_file():
        summary.update(json.loads((study / "study.json").read_text()))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu-demo", choices=sorted(DEMO_SIZES))
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebooks' own)")
    args = parser.parse_args(argv)
    summary = run_demo(args.profile, args.run_dir or f"runs/demo-{args.profile}", kernel=args.kernel)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
