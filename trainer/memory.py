"""Memory of a run's parts: the peak of a step on its device, what each model part holds in its dtype, and the
advice a user needs when a step does not fit (the test for a failed allocation is
:func:`longalign_core.out_of_memory.is_out_of_memory`; the phase timer :mod:`longalign_core.phase_timer`)."""

from __future__ import annotations

import contextlib
import os
import threading
import time

import torch

GiB = 2**30


def rss_bytes() -> int:
    """This process's resident memory now (Linux; 0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def process_peak_bytes() -> int:
    """The highest resident memory this process has had (``ru_maxrss``; 0 where unavailable)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    except (ImportError, OSError):
        return 0


def total_memory(device: torch.device) -> int:
    """What the device has: the GPU's memory, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


class PeakMemory:
    """Peak memory on ``device`` while the block runs, above what was held when it began (``increase``) and in
    all (``peak``): ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the resident set sampled every 2 ms
    after returning freed memory to the system."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device, self.interval = device, interval
        self.base = self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            import gc

            gc.collect()
            with contextlib.suppress(OSError, AttributeError):
                import ctypes

                ctypes.CDLL("libc.so.6").malloc_trim(0)
            self.base = rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self.peak = self.base
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())

    @property
    def increase(self) -> int:
        return self.peak - self.base


def module_bytes(module: torch.nn.Module | None, trainable: bool | None = None) -> tuple[int, int, str]:
    """(parameters, bytes, dtypes) of ``module``'s parameters (only the trainable or frozen ones if asked)."""
    if module is None:
        return 0, 0, ""
    params = [p for p in module.parameters() if trainable is None or p.requires_grad == trainable]
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params})
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params), "/".join(dtypes)


def out_of_memory_advice(cfg, where: str) -> str:
    """One paragraph: the step did not fit, and the settings to change, the one that saves most first."""
    steps = []
    if not cfg.gradient_checkpointing:
        steps.append("turn gradient checkpointing back on (drop --no-gradient-checkpointing)")
    if cfg.train_batch_size > 1:
        half = max(1, cfg.train_batch_size // 2)
        steps.append(f"lower --train-batch-size to {half} and raise --gradient-accumulation-steps to "
                     f"{cfg.gradient_accumulation_steps * cfg.train_batch_size // half} (the same prompts per "
                     f"optimizer step)")
    if cfg.decode_batch not in (None, 1):
        steps.append("lower --decode-batch to 1")
    steps.append(f"lower --resolution (now {cfg.resolution}; memory grows with its square)")
    if not cfg.cache_text_embeddings:
        steps.append("add --cache-text-embeddings (the CLIP text encoders and the preference model's text tower "
                     "leave memory after encoding the prompts once: 2.2 GiB on SDXL with Denscore in bf16)")
    if cfg.sample_grad_steps > 1:
        steps.append(f"lower --sample-grad-steps (now {cfg.sample_grad_steps})")
    if cfg.mixed_precision == "no":
        steps.append("train in bf16 (--mixed-precision bf16) on a GPU that has it")
    return (f"the run does not fit: {where} ran out of memory on this device. Change, in this order: "
            + "; ".join(f"({i}) {s}" for i, s in enumerate(steps, 1))
            + ". `python -m trainer.finetune --dry-run` with the new settings tells whether it fits before a run.")
