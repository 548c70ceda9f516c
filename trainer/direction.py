"""The common text direction V of the reward's decomposition (docs/method.md §4) during training.

The release estimates V at every step from that step's prompts, gathered over its 6 GPUs: 48 captions. With
fewer prompts per step that estimate is mostly the prompts themselves: at one prompt, V *is* the prompt's
embedding, the text-relevant part x̂·t⊥ is identically 0 and the reweighted reward is ω times the plain score,
so the method silently stops being LongAlign. The choices:

* ``training``: V from a seeded sample of the training prompts, computed once at the start of the run:
  what the per-step estimate averages to, with no noise and no dependence on the batch size;
* ``reference``: V from the shipped reference prompts (the V validation uses);
* ``batch``: the release's per-step V, from the prompts of the whole optimizer step (every micro-batch of every
  process: each process draws them itself from the seeded order, so nothing is gathered);
* ``auto``: ``batch`` when a step has at least :data:`MIN_PROMPTS_FOR_BATCH_V` prompts, else ``training``.
"""

from __future__ import annotations

import numpy as np
import torch

from longalign_core.denscore import common_direction, prompt_features
from longalign_core.reference_direction import direction_from_prompts

from .data import batch_prompts

#: Prompts per optimizer step from which the per-step V is used (the release had 8 per GPU × 6 GPUs = 48).
MIN_PROMPTS_FOR_BATCH_V = 32


def resolve_direction(choice: str, prompts_per_step: int) -> tuple[str, str | None]:
    """(the V to use, a one-line warning or None) for ``--reward-direction choice`` when an optimizer step has
    ``prompts_per_step`` prompts (batch × accumulation × processes)."""
    if choice == "auto":
        return ("batch" if prompts_per_step >= MIN_PROMPTS_FOR_BATCH_V else "training"), None
    if choice == "batch" and prompts_per_step < MIN_PROMPTS_FOR_BATCH_V:
        return "batch", (f"warning: --reward-direction batch with {prompts_per_step} prompts per optimizer step "
                         f"(batch × accumulation × processes; the release had 48): V is then mostly the step's own "
                         f"prompts and the text-relevant part shrinks toward 0 (exactly 0 at 1). Use "
                         f"--reward-direction training, or at least {MIN_PROMPTS_FOR_BATCH_V} prompts per step")
    return choice, None


def direction_sample(prompts: list[str], count: int, seed: int) -> list[str]:
    """``count`` training prompts drawn with the seed (all of them when there are fewer), in file order."""
    if count >= len(prompts):
        return list(prompts)
    rng = np.random.default_rng([seed, 0xD1EC])
    return [prompts[i] for i in sorted(rng.choice(len(prompts), size=count, replace=False))]


class RewardDirection:
    """V for each optimizer step: fixed (``training``, ``reference``) or from the step's prompts (``batch``)."""

    def __init__(self, mode: str, reward, cfg, prompts: list[str], processes: int, fixed: torch.Tensor | None):
        self.mode, self.reward, self.cfg, self.prompts, self.processes = mode, reward, cfg, prompts, processes
        self.fixed = fixed

    @classmethod
    def build(cls, mode: str, reward, cfg, prompts: list[str], processes: int, reference: torch.Tensor,
              device) -> "RewardDirection":
        """V of ``mode``; ``training`` computes it from the sampled training prompts once, segmented like the
        scores (``cfg.split_mode``, ``cfg.long_segments``). It is never read from a cache: a resumed run computes
        V again, exactly as the uninterrupted one did."""
        fixed = None
        if mode == "reference":
            fixed = reference
        elif mode == "training":
            sample = direction_sample(prompts, cfg.reward_direction_prompts, cfg.seed)
            fixed = direction_from_prompts(reward, sample, cfg.split_mode, cfg.long_segments)
        return cls(mode, reward, cfg, prompts, processes, None if fixed is None else fixed.to(device))

    def describe(self) -> str:
        """Which V, for the run's summary."""
        return {"training": f"{min(len(self.prompts), self.cfg.reward_direction_prompts)} training prompts (fixed)",
                "reference": "the reference prompt set (fixed)",
                "batch": "each step's prompts (the release)"}[self.mode]

    def step_prompts(self, step: int) -> list[str]:
        """Every prompt of optimizer step ``step``: all micro-batches of all processes (the seeded order)."""
        cfg = self.cfg
        micros = cfg.gradient_accumulation_steps
        return [p for micro in range(micros) for process in range(self.processes)
                for p in batch_prompts(self.prompts, cfg.seed, step, micro, cfg.train_batch_size, process,
                                       self.processes, micros)]

    def for_step(self, step: int) -> torch.Tensor:
        """V ``(D,)`` for optimizer step ``step``."""
        return self.fixed if self.fixed is not None else self.for_prompts(self.step_prompts(step))

    @torch.no_grad()
    def for_prompts(self, prompts: list[str]) -> torch.Tensor:
        """V ``(D,)`` for a step of these prompts: the fixed V, or (``batch``) the normalised mean of their
        segment-averaged text embeddings t̄."""
        if self.fixed is not None:
            return self.fixed
        feats = prompt_features(self.reward, prompts, self.cfg.split_mode, self.cfg.long_segments)
        return common_direction(torch.stack([f.mean for f in feats]))
