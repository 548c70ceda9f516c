"""Wall-clock seconds per named phase of a piece of work (a training step, an evaluation, a node call), for the
dry run, the evaluation report and the benchmarks."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch


class PhaseTimer:
    """``with timer("reward"): …`` adds the block's seconds to ``timer.seconds["reward"]``.

    Nesting rule: a phase opened while another is open belongs to the outer one: its time is counted once, under
    the outer name (the UNet recomputed inside the backward is backward). So the phases never overlap, their sum
    is at most the wall time, and wall time minus their sum is the time outside every phase.

    ``enabled=False`` makes every phase a no-op (the trainer's timer is off unless a dry run or a benchmark
    measures a step). With a CUDA ``device`` each phase boundary synchronises, so a phase holds its own
    kernels."""

    def __init__(self, device: torch.device | None = None, enabled: bool = True):
        self.cuda = device is not None and device.type == "cuda"
        self.enabled = enabled
        self.seconds: dict[str, float] = defaultdict(float)
        self._open = False

    def reset(self) -> None:
        self.seconds.clear()

    @contextlib.contextmanager
    def __call__(self, name: str):
        if not self.enabled or self._open:
            yield
            return
        self._open = True
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - t0
            self._open = False
