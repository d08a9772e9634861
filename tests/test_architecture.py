"""The package's shape: rooms in layers (`opsd_kit.apps.architecture.LAYERS`, the one place the
order is stated), no import cycle, no import from a higher layer, a short top level, and a
docs/architecture.md that says what the code does."""
from __future__ import annotations

from pathlib import Path

import pytest

from opsd_kit.apps import architecture

REPO = Path(__file__).resolve().parents[1]
MAX_TOP_LEVEL_MODULES = 10  # `ls opsd_kit` names the design; the rest lives in subpackages


@pytest.fixture(scope="module")
def graph():
    return architecture.import_graph()


def test_import_graph_has_no_cycle(graph):
    assert architecture.find_cycle(graph) is None


def test_no_module_imports_from_a_higher_layer(graph):
    assert architecture.upward_imports(graph) == []


def test_every_room_has_a_layer(graph):
    for module in graph:
        if (room := architecture.room_of(module)) is not None:
            architecture.layer_of(room)  # raises for a room missing from LAYERS


def test_top_level_is_short_and_every_folder_is_a_documented_room():
    package = REPO / "opsd_kit"
    top_modules = [p.name for p in package.glob("*.py") if p.name != "__init__.py"]
    assert len(top_modules) <= MAX_TOP_LEVEL_MODULES, top_modules
    for folder in (p for p in package.iterdir() if p.is_dir() and p.name != "__pycache__"):
        init = folder / "__init__.py"
        assert init.is_file(), f"{folder} is not a package"
        assert init.read_text().lstrip().startswith('"""'), f"{init} says nothing about its room"


def test_docs_architecture_is_generated_from_the_code():
    committed = (REPO / "docs" / "architecture.md").read_text()
    assert committed == architecture.render(), (
        "docs/architecture.md is stale: python -m opsd_kit.apps.architecture > docs/architecture.md")


# The checker itself, on a made-up package: it must see lazy and TYPE_CHECKING imports and
# report cycles and upward imports.

def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "opsd_kit"
    for name, source in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root


def test_lazy_type_checking_and_relative_imports_count(tmp_path):
    root = _package(tmp_path, {
        "data/__init__.py": "",
        "data/answers.py": "",
        "data/problems.py": "from .answers import extract\nfrom . import answers\n",
        "losses.py": "",
        "config.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from opsd_kit.losses import x\n",
        "trainer.py": "def f():\n    from opsd_kit.data import answers\n    import opsd_kit.config\n",
    })
    graph = architecture.import_graph(root)
    assert graph["opsd_kit.config"] == {"opsd_kit.losses"}
    assert graph["opsd_kit.trainer"] == {"opsd_kit.data.answers", "opsd_kit.config"}
    assert graph["opsd_kit.data.problems"] == {"opsd_kit.data.answers"}  # relative imports resolve too


def test_an_upward_lazy_import_and_a_cycle_are_found(tmp_path):
    root = _package(tmp_path, {
        "data/__init__.py": "",
        "data/problems.py": "def load():\n    from opsd_kit.trainer import train\n",
        "trainer.py": "from opsd_kit.data.problems import load\n",
    })
    graph = architecture.import_graph(root)
    assert architecture.upward_imports(graph) == [("opsd_kit.data.problems", "opsd_kit.trainer")]
    assert architecture.find_cycle(graph) in (
        ["opsd_kit.data.problems", "opsd_kit.trainer", "opsd_kit.data.problems"],
        ["opsd_kit.trainer", "opsd_kit.data.problems", "opsd_kit.trainer"])


def test_one_function_one_name():
    """No module of the kit imports one of the kit's names under another name."""
    import ast

    renamed = []
    for module, path in architecture.modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("opsd_kit"):
                renamed += [f"{module}: {a.name} as {a.asname}" for a in node.names if a.asname not in (None, a.name)]
    assert renamed == []
