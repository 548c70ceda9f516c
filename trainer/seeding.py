"""Where every random draw of a run comes from: (seed, step, process). A resumed run, or a second process, repeats
or diverges exactly as an uninterrupted one would."""

from __future__ import annotations

import torch


def step_seed(seed: int, step: int, process: int) -> int:
    """The seed of one (step, process): every random draw of the step derives from it."""
    return ((seed * 1_000_003 + step) * 1_009 + process) % (2**63 - 1)


def step_generator(seed: int, step: int, process: int, device="cpu") -> torch.Generator:
    """Explicit draws of a step (noise, DDIM offset, crop, caption dropout) come from (seed, step, process): a
    resumed run repeats them exactly."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, process))


def seed_global_rng(seed: int, step: int, process: int) -> None:
    """Seed torch's global generators (CPU and CUDA) for the step: the implicit draws — the LoRA dropout masks
    and the T5 adapter's dropout — then also derive from (seed, step, process). Gradient checkpointing replays
    them exactly (it saves and restores the RNG state)."""
    torch.manual_seed(step_seed(seed, step, process) ^ 0x5EED)
