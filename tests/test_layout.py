"""The house keeps its shape: folders by role, imports only downwards, no circles, no 700-line rooms.

Read from the source (every ``import``, including those inside functions), so a new module or a new import that
breaks the rule fails here, not in a reader's head.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "leanmim"
# Bottom to top: a module may import its own folder and anything ranked below it, never above.
RANKS = {"files": 0, "": 0, "config": 1, "parts": 2, "methods": 3, "data": 4, "weights": 5, "train": 6, "eval": 7}
TOP = 8  # api, cli, the catalogue, __main__ and the moved-name modules (engine, finetune)
GENERATED = {"_catalogue_data"}
MAX_LINES = 450


def modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The leanmim modules ``name`` imports (a package means its ``__init__``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "leanmim":
                target = node.module.partition(".")[2]
            else:
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}" if target else alias.name
                found.add(full if full in known else target)
        elif isinstance(node, ast.Import):
            found.update(a.name.partition(".")[2] for a in node.names if a.name.split(".")[0] == "leanmim")
    found.discard(name)
    return found


def folder(name: str) -> str:
    return name.split(".")[0]


def rank(name: str) -> int:
    return RANKS.get(folder(name), TOP)


KNOWN = modules()
GRAPH = {name: imports(name, path, KNOWN) for name, path in KNOWN.items()}


def test_every_import_points_down_or_within_its_folder():
    upward = [f"{a} (rank {rank(a)}) imports {b} (rank {rank(b)})" for a, targets in GRAPH.items() for b in targets
              if rank(b) > rank(a) or (rank(b) == rank(a) < TOP and folder(a) != folder(b))]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(GRAPH.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [node, target]) if target in path
                              else f"{node} -> {target}")
            elif target not in state:
                visit(target, path + [node])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [])
    assert not cycles, "\n".join(cycles)


def test_the_layout_test_sees_imports():
    # the rules above are only as good as the graph: check it on edges known to exist
    assert "train.trainer" in GRAPH["train.pretrain"] and "train.trainer" in GRAPH["train.finetune"]
    assert "parts.encoder" in GRAPH["methods.mae"] and "weights" in GRAPH["train.pretrain"]
    assert rank("eval.cost") > rank("train.run") > rank("weights.read") > rank("methods.mae") > rank("parts.tokens")


@pytest.mark.parametrize("name", sorted(set(KNOWN) - GENERATED))
def test_no_module_is_a_700_line_room(name):
    lines = len(KNOWN[name].read_text().splitlines())
    assert lines < MAX_LINES, f"{KNOWN[name]} has {lines} lines: split it along its seams"


@pytest.mark.parametrize("package", sorted({n for n, p in KNOWN.items() if p.name == "__init__.py" and n}))
def test_each_folder_says_what_lives_there(package):
    directory = KNOWN[package].parent
    doc = ast.get_docstring(ast.parse(KNOWN[package].read_text())) or ""
    missing = [p.name for p in sorted(directory.glob("*.py")) if p.name != "__init__.py" and p.name not in doc]
    assert not missing, f"{directory}/__init__.py's docstring does not name {missing}"


def test_old_import_paths_say_where_names_moved():
    import importlib

    for old, name, new in (("leanmim.engine", "pretrain", "leanmim.train.pretrain"),
                           ("leanmim.finetune", "finetune", "leanmim.train.finetune"),
                           ("leanmim.finetune", "load_finetuned", "leanmim.weights")):
        module = importlib.import_module(old)
        with pytest.warns(FutureWarning, match=f"moved to {new}.{name}"):
            moved = getattr(module, name)
        assert moved is getattr(importlib.import_module(new), name)
    from leanmim import weights
    from leanmim.weights.read import read_weights
    assert weights.read_weights is read_weights  # leanmim.weights stays the package users import from

