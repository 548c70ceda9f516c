"""The trainer package's house rules (issue #20): one job per module, short modules, imports that go one way."""

from __future__ import annotations

import ast

from conftest import REPO

TRAINER = REPO / "trainer"
#: The longest a module of trainer/ may grow before it is split by job.
MAX_LINES = 400


def trainer_imports(path, package=TRAINER) -> set[str]:
    """The trainer modules ``path`` imports, at module level or inside functions (a lazy import is still an
    edge of the graph: it only hides a circle until run time)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                names = [node.module] if node.module else [a.name for a in node.names]
            elif node.module and node.module.split(".")[0] == "trainer":
                names = [".".join(node.module.split(".")[1:])] if "." in node.module else [a.name for a in node.names]
            else:
                continue
            found.update(n.split(".")[0] for n in names if n)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("trainer."))
    modules = {p.stem for p in package.glob("*.py")}
    return (found & modules) - {path.stem}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a path ``[a, b, …, a]``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_circle_through_a_lazy_import(tmp_path):
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from trainer.c import y\n")
    (tmp_path / "c.py").write_text("from . import a\n")
    graph = {p.stem: trainer_imports(p, tmp_path) for p in tmp_path.glob("*.py")}
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_in_the_trainer():
    graph = {p.stem: trainer_imports(p) for p in TRAINER.glob("*.py")}
    assert graph["finetune"] >= {"objective", "checkpoints", "validation", "models", "data"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_trainer_module_is_over_the_limit():
    long = {p.name: n for p in TRAINER.glob("*.py") if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these by job: {long}"
