"""Concepts the trainer, the evaluation, the nodes and the benchmarks share have one implementation each
(issue #29): the out-of-memory test, the phase timer, the precision table, the clip-skip check."""

from __future__ import annotations

import ast

import numpy as np
import pytest
import torch

from conftest import REPO
from longalign_core import phase_timer
from longalign_core.out_of_memory import is_out_of_memory
from longalign_core.phase_timer import PhaseTimer

# -- out of memory ----------------------------------------------------------------------------------------------


def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 — the exception itself is the object under test
        return exc
    raise AssertionError("expected an exception")


def test_real_allocation_failures_are_out_of_memory():
    """What the CPU allocators really raise: torch's RuntimeError ("can't allocate memory", no "out of memory"
    in it: the node's trimmed forward used to take it for an unsupported model) and numpy's MemoryError."""
    torch_cpu = _raised(lambda: torch.empty(2**50, dtype=torch.uint8))
    numpy_cpu = _raised(lambda: np.empty(2**50, dtype=np.uint8))
    assert type(torch_cpu) is RuntimeError and "out of memory" not in str(torch_cpu).lower()
    assert is_out_of_memory(torch_cpu)
    assert isinstance(numpy_cpu, MemoryError) and is_out_of_memory(numpy_cpu)


@pytest.mark.parametrize("exc", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),  # CUDA / ROCm caching allocator
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),  # a kernel
    RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.20 MB)"),
    MemoryError(),
], ids=["cuda", "cuda-kernel", "mps", "python"])
def test_accelerator_allocation_failures_are_out_of_memory(exc):
    assert is_out_of_memory(exc)


@pytest.mark.parametrize("exc", [
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x768 and 1280x1280)"),  # an unsupported model
    AttributeError("'SDClipModel' object has no attribute 'process_tokens'"),
    ValueError("--token-budget 10**9 would run out of memory"),  # a user's mistake, said in words
    KeyboardInterrupt(),
], ids=["shape", "attribute", "value-error", "interrupt"])
def test_other_errors_are_not_out_of_memory(exc):
    assert not is_out_of_memory(exc)


# -- phase timer ------------------------------------------------------------------------------------------------


class _Clock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = _Clock()
    monkeypatch.setattr(phase_timer, "time", fake)
    return fake


def test_a_phase_inside_another_belongs_to_the_outer_one(clock):
    timer = PhaseTimer()
    with timer("backward"):
        clock.now += 2
        with timer("UNet, with gradients"):  # the UNet recomputed inside the backward
            clock.now += 3
        clock.now += 1
    with timer("optimizer"):
        clock.now += 0.5
    with timer("backward"):  # a phase met again adds up
        clock.now += 4
    assert dict(timer.seconds) == {"backward": 10.0, "optimizer": 0.5}


def test_a_phase_left_by_an_exception_is_counted_and_closed(clock):
    timer = PhaseTimer()
    with pytest.raises(torch.OutOfMemoryError), timer("reward"):
        clock.now += 1
        raise torch.OutOfMemoryError("CUDA out of memory")
    with timer("VAE decode"):  # not taken for a phase inside "reward"
        clock.now += 2
    assert dict(timer.seconds) == {"reward": 1.0, "VAE decode": 2.0}


def test_a_disabled_timer_counts_nothing_and_reset_clears(clock):
    timer = PhaseTimer(enabled=False)
    with timer("reward"):
        clock.now += 1
    assert dict(timer.seconds) == {}
    timer.enabled = True
    with timer("reward"):
        clock.now += 1
    assert dict(timer.seconds) == {"reward": 1.0}
    timer.reset()
    assert dict(timer.seconds) == {}


# -- one definition each ----------------------------------------------------------------------------------------

#: name -> the one module that may define it
ONE_HOME = {"is_out_of_memory": "longalign_core/out_of_memory.py", "PhaseTimer": "longalign_core/phase_timer.py",
            "PhaseTimes": None, "DTYPES": "longalign_core/dtypes.py", "check_clip_skip": "longalign_core/clip_text.py"}


def _definitions():
    """(name, file) of every top-level function, class or assignment in the project's Python files."""
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith((".", "tests/")) or "/." in rel:
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                yield node.name, rel
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Name):
                        yield target.id, rel


def test_each_shared_concept_is_defined_once():
    found = {}
    for name, rel in _definitions():
        if name in ONE_HOME:
            found.setdefault(name, []).append(rel)
    wrong = {name: files for name, files in found.items() if files != [ONE_HOME[name]]}
    assert not wrong, f"defined outside their one home {ONE_HOME}: {wrong}"
    assert set(found) == {k for k, v in ONE_HOME.items() if v}


# -- clip skip --------------------------------------------------------------------------------------------------


def test_clip_skip_out_of_range_is_the_same_mistake_for_sd_and_sdxl(clip_tokenizer, tiny_text_encoder):
    """Both readouts refuse a clip skip that leaves no layer with the project's BadConfigError (a CLI prints it as
    one paragraph, exit code 2); each keeps its own convention of what 0 means."""
    from transformers import CLIPTextModelWithProjection

    from conftest import tiny_clip_text_config
    from longalign_core import CLIPSegmentEncoder
    from longalign_core.errors import BadConfigError
    from longalign_core.sdxl_text import SDXLSegmentEncoder

    layers = tiny_text_encoder.config.num_hidden_layers  # 3
    bigg = CLIPTextModelWithProjection(tiny_clip_text_config()).eval()
    CLIPSegmentEncoder(clip_tokenizer, tiny_text_encoder, clip_skip=layers - 1)  # the first layer's output
    SDXLSegmentEncoder(clip_tokenizer, tiny_text_encoder, clip_tokenizer, bigg, clip_skip=layers - 2)  # likewise
    with pytest.raises(BadConfigError, match=f"clip_skip must be in 0..{layers - 1} for this {layers}-layer"):
        CLIPSegmentEncoder(clip_tokenizer, tiny_text_encoder, clip_skip=layers)
    for skip in (layers - 1, -1):
        with pytest.raises(BadConfigError, match=f"clip_skip must be in 0..{layers - 2} for this {layers}-layer"):
            SDXLSegmentEncoder(clip_tokenizer, tiny_text_encoder, clip_tokenizer, bigg, clip_skip=skip)
    from longalign_core.errors import BadModelFileError

    with pytest.raises(BadModelFileError, match="text_encoder_2 must be a CLIPTextModelWithProjection"):
        SDXLSegmentEncoder(clip_tokenizer, tiny_text_encoder, clip_tokenizer, tiny_text_encoder)  # no projection


# -- bench/ stands on importable code -----------------------------------------------------------------------------


def test_the_benchmarks_import_nothing_from_the_tests():
    """bench/ builds its stand-in models with standins/ (as the tests do), never by putting tests/ on the path."""
    test_modules = {p.stem for p in (REPO / "tests").glob("*.py")}
    found = {}
    for path in sorted((REPO / "bench").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module.split(".")[0]]
            elif isinstance(node, ast.Constant) and node.value == "tests":  # REPO / "tests" on sys.path
                names = ["tests/"]
            hits = [n for n in names if n in test_modules or n in ("tests", "tests/")]
            if hits:
                found.setdefault(path.name, []).extend(hits)
    assert not found, f"bench/ files that import from tests/ (move the helper to standins/): {found}"
