"""Writes docs/results.md: the tables of the committed runs, read from their summary.json
(`opsd_kit.evaluation.report`), and of the sweeps, read from their sweep.jsonl
(`opsd_kit.apps.sweep`), with the hand-written parts of docs/results_notes.md around them.

    python docs/make_results.py > docs/results.md

`tests/test_results_doc.py` checks that docs/results.md is what this prints.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from opsd_kit.evaluation import report

DOCS = Path(__file__).resolve().parent
#: section name -> (folder under docs/, copied from runs/; heading)
RUNS = {"demo": ("demo-cpu-demo", "`make demo` of 2026-12-05: from the common start"),
        "study": ("study-cpu-demo", "`make study` of 2026-12-05, its study plan: from the common start"),
        "raw": ("raw-cpu-demo", "`make demo` of 2026-12-05, its raw plan: from the base model"),
        "demo_1129": ("raw-2026-11-29/demo", "`make demo` of 2026-11-29: from the base model, strict GRPO reward"),
        "study_1129": ("raw-2026-11-29/study", "`make study` of 2026-11-29: from the base model, strict GRPO reward")}
#: section name -> (sweep.jsonl under docs/, heading)
SWEEPS = {"sweep_warmup": ("sweep-cpu-demo/warmup.jsonl", "Sweep: the warm-up's length (SFT on the warm-up problems)"),
          "sweep_grpo": ("sweep-cpu-demo/grpo.jsonl", "Sweep: GRPO's settings from the common start"),
          "sweep_grpo_raw": ("sweep-cpu-demo/grpo-raw.jsonl", "Sweep: GRPO's settings from the base model")}
#: the order of docs/results.md: the runs from the common start and the raw plan, the sweeps, the earlier runs
ORDER = ["demo", "study", "raw", "sweep_warmup", "sweep_grpo", "sweep_grpo_raw", "demo_1129", "study_1129"]
#: the token-efficiency figures notebook 04 draws, one per grading mode
MODES = ("strict", "lenient")


def notes(path: Path = DOCS / "results_notes.md") -> dict[str, str]:
    """The hand-written sections, by the name in their ``<!-- section: NAME -->`` marker."""
    parts = re.split(r"<!-- section: (\w+) -->\n", path.read_text())
    return {name: text.strip() for name, text in zip(parts[1::2], parts[2::2])}


def machine_line(summary: dict) -> str:
    """Where a run ran, as its summary.json recorded it (the date is in the report's first line)."""
    m = summary.get("machine", {})
    device = "CUDA" if m.get("cuda") else "no GPU"
    threads = m.get("torch_threads", "?")
    return (f"Platform `{m.get('platform', 'not recorded')}`, {device}, {threads} torch "
            f"thread{'s' * (threads != 1)} per job, {summary['jobs']} job{'s' * (summary['jobs'] != 1)} at a time.")


def split_prose(note: str) -> tuple[str, str]:
    """A hand-written section as (what goes above its table, its '**What it shows.**' part or '')."""
    return tuple(note.split("**What it shows.**", 1)) if "**What it shows.**" in note else (note, "")


def section(heading: str, folder: str, note: str) -> str:
    run_dir = DOCS / folder
    summary = json.loads((run_dir / "summary.json").read_text())
    body, prose = split_prose(note)
    parts = [f"## {heading}", machine_line(summary), body.strip(), report.render(run_dir).strip(),
             *(f"![held-out accuracy against rollout tokens and training time, {mode} grading]"
               f"({folder}/token_efficiency_{mode}.png)" for mode in MODES)]
    if prose:
        parts.append("**What it shows.**" + prose.rstrip())
    return "\n\n".join(parts)


def sweep_table(path: Path) -> str:
    """One row per trial of a sweep.jsonl: its settings, training signal, cost and held-out accuracy."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]

    def accuracy(row, mode):
        a = row.get(mode)
        return "" if a is None else f"{100 * a['accuracy']:.1f} [{100 * a['ci_low']:.1f}, {100 * a['ci_high']:.1f}]"

    def number(value, digits=2):
        return "" if value is None else f"{value:.{digits}f}"

    lines = ["| trial | settings | steps | rollout tokens | mean reward | mixed groups | training s | "
             "strict % [95% CI] | lenient % [95% CI] |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        settings = ", ".join(f"{k}={json.dumps(v)}" for k, v in row["overrides"].items())
        lines.append(f"| {row['trial']} | {settings} | {row['steps']} | {row['generated_tokens'] or 0:,} | "
                     f"{number(row['reward_mean'])} | {number(row['mixed_groups_mean'])} | "
                     f"{row['train_seconds']:.0f} | {accuracy(row, 'strict')} | {accuracy(row, 'lenient')} |")
    return "\n".join(lines)


def sweep_section(heading: str, file: str, note: str) -> str:
    body, prose = split_prose(note)
    parts = [f"## {heading}", body.strip(), sweep_table(DOCS / file)]
    if prose:
        parts.append("**What it shows.**" + prose.rstrip())
    return "\n\n".join(parts)


def render() -> str:
    text = notes()
    parts = ["# Results: the sweeps, the demo and the study on the bundled SmolLM2-135M",
             "Generated by `python docs/make_results.py > docs/results.md` from the runs' `summary.json`, the "
             "sweeps' `sweep.jsonl` and the hand-written [`results_notes.md`](results_notes.md); edit those, "
             "not this file.",
             text["setting"]]
    runs = {name: section(heading, folder, text[name]) for name, (folder, heading) in RUNS.items()}
    sweeps = {name: sweep_section(heading, file, text[name]) for name, (file, heading) in SWEEPS.items()}
    sections = {**runs, **sweeps}
    assert sorted(ORDER) == sorted(sections), "ORDER names every section once"
    parts += [sections[name] for name in ORDER]
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
