"""Markdown tables of a demo or study run, from its ``summary.json`` (what docs/results.md shows).

``python -m opsd_kit.evaluation.report runs/demo-cpu-demo`` prints them; nothing is recomputed, so the
tables say exactly what the run measured.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

MODES = ("strict", "lenient")


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _interval(d: dict, key: str = "accuracy") -> str:
    return f"{_pct(d[key])} [{_pct(d['ci_low'])}, {_pct(d['ci_high'])}]"


def _signed(d: dict) -> str:
    return f"{100 * d['diff']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]"


def _p(x: float) -> str:
    return f"{x:.2g}" if x >= 1e-3 else f"{x:.1e}"


def points_table(summary: dict) -> str:
    """One row per evaluated model: accuracy with its 95% interval in both modes, and cost."""
    k, n = summary["points"][0]["k"], summary["points"][0]["n_eval"]
    lines = [f"| method | step | strict avg@{k} % [95% CI] | lenient avg@{k} % [95% CI] | boxed | "
             "mean tokens | truncated | rollout tokens in training | training s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in summary["points"]:
        lines.append(f"| {p['method']} | {p['step']} | {_interval(p['strict'])} | {_interval(p['lenient'])} | "
                     f"{p['boxed_rate']:.2f} | {p['mean_response_tokens']:.0f} | {p['truncation_rate']:.2f} | "
                     f"{p['generated_tokens']:,} | {p['train_seconds']:.0f} |")
    start = summary.get("start")
    base = f" 'base' is the runs' common start, `{Path(start).name}` (init_adapter)." if start else ""
    return f"{n} held-out problems, k = {k}.{base}\n\n" + "\n".join(lines)


TEST_NAMES = {"mcnemar_exact": "exact McNemar", "sign_flip_exact": "sign-flip permutation test (exact)",
              "sign_flip_monte_carlo": "sign-flip permutation test (Monte Carlo)",
              "mcnemar_first_sample": "exact McNemar on each problem's first sample only"}
"""How each paired test (`stats.paired_test`) is named under the table; a summary.json written
before the test was recorded holds ``mcnemar_p``, McNemar on the first samples."""


def _test(d: dict) -> tuple[float, str]:
    """``(p, test)`` of one mode's comparison, also from a summary that predates ``test``."""
    return (d["p"], d["test"]) if "test" in d else (d["mcnemar_p"], "mcnemar_first_sample")


def comparisons_table(summary: dict, focus: str = "opsd") -> str:
    """Paired differences (a - b, percentage points) with their 95% intervals and the paired
    test's p: every method against the base, and ``focus`` against every other method (all pairs
    are in the run's ``comparisons.csv``). A line under the table names the test behind p."""
    lines = ["| a | b | strict a - b [95% CI] | p | lenient a - b [95% CI] | p |",
             "|---|---|---|---|---|---|"]
    rows = [dict(c, a=m, b="base") for m, c in summary["vs_base"].items()]
    rows += [c for c in summary["comparisons"] if focus in (c["a"], c["b"])]
    for c in rows:
        lines.append(f"| {c['a']} | {c['b']} | {_signed(c['strict'])} | {_p(_test(c['strict'])[0])} | "
                     f"{_signed(c['lenient'])} | {_p(_test(c['lenient'])[0])} |")
    tests = sorted({_test(c[m])[1] for c in rows for m in MODES})
    k = summary["points"][0]["k"]
    what = "each problem's verdict" if k == 1 else f"each problem's avg@{k} (all {k} samples)"
    lines.append(f"\np: {', '.join(TEST_NAMES.get(t, t) for t in tests)}, two-sided, paired on {what}.")
    return "\n".join(lines)


def ratio_lines(summary: dict) -> str:
    """The tokens-to-equal-accuracy ratio of OPSD vs GRPO per mode (`study.tokens_to_equal_accuracy`),
    or why it is undefined."""
    out = []
    for mode, r in summary["tokens_to_equal_accuracy"].items():
        if r.get("ratio") is None:
            out.append(f"- {mode}: undefined: {r['reason']}")
            continue
        interval = ""
        if r.get("ci_low") is not None:
            interval = (f" [95% CI {r['ci_low']:.3g}, {r['ci_high']:.3g}; defined in "
                        f"{100 * r['defined_fraction']:.0f}% of the resamples]")
        fraction = r.get("target_fraction", 1.0)
        out.append(f"- {mode}: GRPO needed {r['ratio']:.3g}x{interval} OPSD's rollout tokens to first reach "
                   f"{_pct(r['target_accuracy'])}% ({r['tokens_grpo']:,.0f} vs {r['tokens_opsd']:,.0f} tokens, "
                   f"interpolated on each method's accuracy-vs-tokens curve; the target is the base's "
                   f"{_pct(r['base_accuracy'])}% plus {fraction:.0%} of the smaller method's best gain)")
    return "\n".join(out)


def answer_split_table(summary: dict) -> str:
    rows = summary.get("answer_token_divergence") or []
    if not rows:
        return ""  # the plan ran no answer-token split
    lines = ["| model | rollouts | share of the divergence on answer tokens | mean on answer tokens | "
             "mean on other tokens |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} (step {r['step']}) | {r['rollouts']} | {r['answer_share']:.3f} | "
                     f"{r['answer_mean']:.3f} | {r['other_mean']:.3f} |")
    return "\n".join(lines)


def gap_lines(run_dir: Path) -> str:
    """The teacher-student gap measured before an OPSD run trained (the first run folder, by
    name, whose notebook 01 wrote one to diagnostics.json)."""
    path = next(iter(sorted(run_dir.glob("*/diagnostics.json"))), None)
    if path is None:
        return ""
    g = json.loads(path.read_text())["gap"]
    style = "n/a" if g.get("gap/style_fraction") is None else f"{g['gap/style_fraction']:.2f}"
    shuffled = g.get("gap/divergence_mean_shuffled")
    return (f"Before training (`{path.parent.name}`), on {g['gap/n_problems']} held-out problems x "
            f"{g['gap/k']} samples: student "
            f"{_pct(g['gap/student_accuracy_strict'])}% strict / {_pct(g['gap/student_accuracy_lenient'])}% "
            f"lenient, privileged teacher {_pct(g['gap/teacher_accuracy_strict'])}% / "
            f"{_pct(g['gap/teacher_accuracy_lenient'])}%; mean per-token {g['gap/kind']} on the student's "
            f"rollouts {g['gap/divergence_mean']:.3f} with the reference solution, "
            f"{'n/a' if shuffled is None else f'{shuffled:.3f}'} with another problem's (style fraction {style}).")


def render(run_dir) -> str:
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    seconds = ", ".join(f"{name} {s:.0f} s" for name, s in summary["notebook_seconds"].items())
    parts = [f"Run: `{summary['profile']}` / `{summary.get('plan', 'demo')}`, {summary.get('date', '')}, "
             f"{summary['total_seconds'] / 60:.1f} min in all ({seconds}).",
             points_table(summary), comparisons_table(summary), ratio_lines(summary),
             answer_split_table(summary), gap_lines(run_dir)]
    return "\n\n".join(p for p in parts if p) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m opsd_kit.evaluation.report RUN_DIR (a folder holding summary.json)", file=sys.stderr)
        return 2
    print(render(argv[0]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
