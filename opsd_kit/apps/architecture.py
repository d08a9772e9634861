"""Which room of opsd_kit imports which: the import graph read from the source (AST), the layer
order it must respect, and the Markdown of ``docs/architecture.md``.

``python -m opsd_kit.apps.architecture > docs/architecture.md`` regenerates the document;
``tests/test_architecture.py`` checks it against the code. Every import counts: at module top,
inside functions (lazy imports) and under ``if TYPE_CHECKING:``.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "opsd_kit"
ROOT = Path(__file__).resolve().parents[1]

#: The rooms from the bottom up; a room may import from its own layer and the layers below it,
#: never from a layer above. Rooms in one tuple share a layer.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("data",),
    ("prompts", "losses", "models"),
    ("rollout",),
    ("config",),
    ("run",),
    ("policy",),
    ("evaluation",),
    ("algorithms",),
    ("trainer",),
    ("apps",),
)

#: What each room is for (one line each, in the document's table).
PURPOSE = {
    "data": "problems and reference solutions: readers, built-in sets, reasoning-gym tasks, splits, the answer parser",
    "prompts": "student and teacher prompts as token ids, the prompt cache, contiguous batches",
    "losses": "divergences (KL, JSD, clipped, top-k, sampled-token) and the chunked loss from hidden states",
    "models": "where a model comes from: hub id, folder, the bundled SmolLM2, the `tiny` test model",
    "rollout": "how the student samples: HF `generate`, the fast engine (fused decoder), vLLM, the sampler",
    "config": "`TrainConfig`, the profiles, the evaluation protocols",
    "run": "a run's bookkeeping: its folder, checkpoints, token ledger, metrics, model card",
    "policy": "the LoRA policy and its teachers (frozen, live, EMA)",
    "evaluation": "grading, avg@k evaluation, statistics, diagnostics, the study, reports, figures",
    "algorithms": "OPSD and the GRPO, RLSD and SFT baselines on a shared base",
    "trainer": "the training loop on accelerate: accumulation, checkpoints, resume, guards",
    "apps": "entry points: the `opsd-kit` command, the demo pipeline, notebook helpers, export, this document",
}


def layer_of(room: str) -> int:
    """The layer of a room (0 at the bottom); a room not in `LAYERS` is an error."""
    for i, rooms in enumerate(LAYERS):
        if room in rooms:
            return i
    raise ValueError(f"room {room!r} is not in opsd_kit.apps.architecture.LAYERS; add it there")


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package by dotted name (``opsd_kit.data.answers``), packages by their
    ``__init__``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def room_of(module: str) -> str | None:
    """The room of a module: its first name below the package (None for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _target(name: str, known: dict[str, Path]) -> str | None:
    """The module a dotted name refers to: the longest known module that is a prefix of it."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its source."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: len(module.split(".")) - node.level + is_package]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # ``from pkg import name``: name is a submodule of pkg, or else a name defined in pkg
            names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
        for name in names:
            if name == PACKAGE or not name.startswith(PACKAGE + "."):
                continue
            target = _target(name, known)
            if target and target != module:
                found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    known = modules(root)
    return {m: imports_of(m, p, known) for m, p in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Every (importer, imported) pair whose imported room stands on a higher layer."""
    bad = []
    for src, targets in sorted(graph.items()):
        if room_of(src) is None:
            continue
        for dst in sorted(targets):
            if room_of(dst) is not None and layer_of(room_of(dst)) > layer_of(room_of(src)):
                bad.append((src, dst))
    return bad


def room_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Room -> the other rooms it imports from."""
    out: dict[str, set[str]] = {}
    for src, targets in graph.items():
        if (room := room_of(src)) is None:
            continue
        out.setdefault(room, set()).update(r for t in targets if (r := room_of(t)) not in (None, room))
    return out


def _short(module: str) -> str:
    return module.removeprefix(PACKAGE + ".")


def render(root: Path = ROOT) -> str:
    """The Markdown of ``docs/architecture.md``."""
    graph = import_graph(root)
    rooms = room_graph(graph)
    order = sorted(rooms, key=lambda r: (-layer_of(r), r))
    lines = [
        "# Architecture: which room imports which",
        "",
        "Generated from the source by `python -m opsd_kit.apps.architecture > docs/architecture.md`;",
        "`tests/test_architecture.py` fails when this file differs from what the code says. Every import",
        "counts, lazy ones inside functions and `if TYPE_CHECKING:` ones included.",
        "",
        "The rooms stand in layers, bottom to top: "
        + " < ".join("{" + ", ".join(r) + "}" if len(r) > 1 else r[0] for r in LAYERS)
        + ". A module imports only from its own layer and the layers below; the import graph has no cycle.",
        "",
        "## Rooms",
        "",
        "| layer | room | what it holds | imports from |",
        "|---|---|---|---|",
    ]
    for room in order:
        deps = sorted(rooms[room], key=lambda r: (-layer_of(r), r))
        kind = "package" if (root / room).is_dir() else "module"
        lines.append(f"| {layer_of(room)} | `{room}` ({kind}) | {PURPOSE.get(room, '')} | "
                     f"{', '.join(f'`{d}`' for d in deps) or 'nothing'} |")
    lines += ["", "## Modules", "", "| module | imports from the kit |", "|---|---|"]
    for module in sorted((m for m in graph if room_of(m)), key=lambda m: (-layer_of(room_of(m)), m)):
        targets = ", ".join(f"`{_short(t)}`" for t in sorted(graph[module])) or "nothing"
        lines.append(f"| `{_short(module)}` | {targets} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        print("usage: python -m opsd_kit.apps.architecture > docs/architecture.md", file=sys.stderr)
        return 2
    print(render(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
