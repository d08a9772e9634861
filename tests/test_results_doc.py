"""docs/results.md is what `python docs/make_results.py` prints from the committed runs' summary.json
and docs/results_notes.md: the tables cannot drift from the runs they describe."""
from __future__ import annotations

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _make_results():
    spec = importlib.util.spec_from_file_location("make_results", DOCS / "make_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_md_is_generated_from_the_runs():
    assert (DOCS / "results.md").read_text() == _make_results().render(), (
        "docs/results.md is stale: python docs/make_results.py > docs/results.md")


def test_every_hand_written_section_is_used():
    make_results = _make_results()
    assert set(make_results.notes()) == {"setting", *make_results.RUNS, *make_results.SWEEPS}
