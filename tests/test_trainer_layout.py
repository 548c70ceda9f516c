"""The trainer package's house rules (issue #20): one job per module, short modules, imports that go one way."""

from __future__ import annotations

import ast

from conftest import REPO

TRAINER = REPO / "trainer"
#: The longest a module of trainer/ may grow before it is split by job.
MAX_LINES = 400


def module_name(path, package=TRAINER) -> str:
    """``path``'s module under ``package``, dotted: ``finetune``, ``evaluate.stats``, ``evaluate`` (its __init__)."""
    parts = list(path.relative_to(package).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package=TRAINER) -> dict[str, object]:
    """Every module of ``package``, subfolders included (a moved file keeps its rules), by :func:`module_name`."""
    return {module_name(p, package): p for p in sorted(package.rglob("*.py")) if p.name != "__main__.py"}


def trainer_imports(path, package=TRAINER) -> set[str]:
    """The trainer modules ``path`` imports, at module level or inside functions (a lazy import is still an
    edge of the graph: it only hides a circle until run time), as :func:`module_name` names them."""
    known = set(modules(package))
    me = module_name(path, package)
    here = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[:len(here) - (node.level - 1)]
            stem = base + (node.module.split(".") if node.module else [])
            found.update(".".join(stem + [a.name]) if ".".join(stem + [a.name]) in known else ".".join(stem)
                         for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "trainer":
            stem = node.module.split(".")[1:]
            found.update(".".join(stem + [a.name]) if ".".join(stem + [a.name]) in known else ".".join(stem)
                         for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(".".join(a.name.split(".")[1:]) for a in node.names if a.name.startswith("trainer."))
    return (found & known) - {me}


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
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "__init__.py").write_text("")
    (tmp_path / "sub" / "d.py").write_text("from ..a import x\nfrom .e import y\n")
    (tmp_path / "sub" / "e.py").write_text("def f():\n    from trainer.sub import d\n")
    graph = {name: trainer_imports(p, tmp_path) for name, p in modules(tmp_path).items()}
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}, "sub": set(), "sub.d": {"a", "sub.e"}, "sub.e": {"sub.d"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_in_the_trainer():
    graph = {name: trainer_imports(p) for name, p in modules().items()}
    assert graph["finetune"] >= {"objective", "checkpoints", "validation", "loading.models", "data"}
    assert graph["evaluate.evaluation"] >= {"evaluate.files", "evaluate.arms", "config", "loading.models"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_trainer_module_is_over_the_limit():
    long = {name: n for name, p in modules().items()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert {"evaluate.stats", "loading.single_file"} <= set(modules())  # the subfolders are read
    assert not long, f"split these by job: {long}"


def takers_of_the_whole_run(path) -> list[str]:
    """The places of ``path`` that handle the whole run rather than the parts they use (trainer/parts.py): a
    parameter named ``run``, ``trainer`` or ``trainer_…`` or annotated with ``Trainer``, and any use or import of
    the name ``Trainer`` (building one, taking its class)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            for a in args:
                note = ast.unparse(a.annotation) if a.annotation is not None else ""
                if a.arg == "run" or a.arg.startswith("trainer") or "Trainer" in note:
                    found.append(f"{path.name}:{node.lineno} {getattr(node, 'name', 'lambda')}({a.arg})")
        elif isinstance(node, ast.Name) and node.id == "Trainer" or \
                isinstance(node, ast.Attribute) and node.attr == "Trainer":
            found.append(f"{path.name}:{node.lineno} uses Trainer")
        elif isinstance(node, ast.ImportFrom) and any(a.name == "Trainer" for a in node.names):
            found.append(f"{path.name}:{node.lineno} imports Trainer")
    return found


def test_takers_of_the_whole_run_are_found(tmp_path):
    (tmp_path / "m.py").write_text("def ok(cfg, parts): ...\ndef bad(run, step): ...\n"
                                   "def typed(x: 'Trainer'): ...\nf = lambda trainer: trainer.cfg\n"
                                   "def builds(cfg):\n    from .finetune import Trainer\n    return Trainer(cfg)\n"
                                   "def driven(cfg, finetune):\n    return finetune.Trainer(cfg).parts\n"
                                   "def given(cfg, trainer_class): ...\n")
    assert sorted(takers_of_the_whole_run(tmp_path / "m.py")) == sorted([
        "m.py:2 bad(run)", "m.py:3 typed(x)", "m.py:4 lambda(trainer)", "m.py:6 imports Trainer",
        "m.py:7 uses Trainer", "m.py:9 uses Trainer", "m.py:10 given(trainer_class)"])


def test_no_trainer_module_takes_the_trainer_object():
    """Issue 29.1: the objective, the validation, the dry run, the outputs, the run log, the disk check and the
    text cache take the typed parts they use; only finetune.py (the Trainer's own module) handles the Trainer."""
    found = [hit for name, p in modules().items() if name != "finetune" for hit in takers_of_the_whole_run(p)]
    assert not found, found
