"""Validation during a run: the held-out prompts sampled from the same noise every time, scored with V from the
reference prompt set, so the text-relevant and text-irrelevant parts are comparable across steps (and runs)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from longalign_core.child_process import report_progress
from longalign_core.denscore import segment_score

from .report import PER_PROMPT_FILE
from .run_log import PER_PROMPT_COLUMNS, VALIDATION_COLUMNS, CSVLog
from .sampling import ddim_scheduler, decode, sample_truncated
from .seeding import step_generator

if TYPE_CHECKING:
    from .parts import RunParts

#: The generator step of the validation noise (no training step uses it).
VALIDATION_DRAW = 10**6


class Validation:
    """The run's validations and their logs: ``validation.csv`` (one row per validation: the means over the
    held-out prompts and their standard errors) and ``validation_per_prompt.csv`` (each prompt's parts, for the
    reward-hacking check's paired differences)."""

    def __init__(self, cfg, acc, parts: RunParts, out: Path):
        main = acc.is_main_process
        self.cfg, self.acc, self.parts, self.out = cfg, acc, parts, out
        self.log = CSVLog(out / "validation.csv", VALIDATION_COLUMNS, main)
        self.per_prompt = CSVLog(out / PER_PROMPT_FILE, PER_PROMPT_COLUMNS, main)

    def keep_until(self, step: int) -> set[float]:
        """Drop validations after ``step`` (a resumed run repeats them); returns the steps kept."""
        self.per_prompt.keep_until(step)
        return {float(r["step"]) for r in self.log.keep_until(step)}

    def __call__(self, step: int) -> dict | None:
        """Validate at ``step`` on the main process; every process waits for it."""
        row = validate(self.cfg, self.acc, self.parts, self.out, step, self.log, self.per_prompt)
        self.acc.wait_for_everyone()
        return row


@torch.no_grad()
def validate(cfg, acc, parts: RunParts, out: Path, step: int, log: CSVLog,
             per_prompt: CSVLog | None = None) -> dict | None:
    """Sample and score the held-out ``parts.data.validation_prompts`` (main process only, on the unwrapped UNet
    in eval mode: no LoRA dropout) with V of the reference prompts; write the row to ``log`` (each prompt's to
    ``per_prompt``), TensorBoard and ``out/validation/step-NNNNNN.png``."""
    prompts = parts.data.validation_prompts
    if not prompts or not acc.is_main_process:
        return None
    unet, base, text, t5 = parts.lora.module, parts.base, parts.text, parts.t5
    unet.eval()
    if t5 is not None:
        t5.adapter.eval()
    try:
        gen = step_generator(cfg.seed, VALIDATION_DRAW, 0)  # the same noise at every validation
        step_cond = text.encode(prompts, with_uncond=True)
        cond, uncond = text.unet_conditioning(step_cond)
        side = cfg.resolution // 8
        noise = torch.randn(len(prompts), 4, side, side, generator=gen).to(acc.device, base.dtype)
        scheduler = ddim_scheduler(base.noise_scheduler, cfg.validation_steps)
        eps = lambda x, t, c: unet(x, t, **c.unet_kwargs()).sample  # noqa: E731
        with acc.autocast():
            x0 = sample_truncated(eps, scheduler, noise, cond, uncond, cfg.sample_guidance, [])
            images = decode(base.vae, x0)
        result = segment_score(parts.scoring.judge, images, prompts, direction=parts.scoring.reference_v,
                               crop="center", split_mode=cfg.split_mode, long_segments=cfg.long_segments)
    finally:
        unet.train()
        if cfg.train_t5_adapter:
            t5.adapter.train()
    p = result.parts
    n = len(prompts)
    se = (lambda x: float(x.std() / n**0.5)) if n > 1 else (lambda x: "")  # noqa: E731
    row = {"step": step, "denscore": float(p.score.mean()), "text_relevant": float(p.relevant.mean()),
           "text_irrelevant": float(p.irrelevant.mean()), "text_relevant_se": se(p.relevant),
           "text_irrelevant_se": se(p.irrelevant), "prompts_cut": step_cond.prompts_cut,
           "tokens_lost": step_cond.tokens_lost}
    from PIL import Image

    grid = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    from longalign_core.io_utils import atomic_path

    picture = out / "validation" / f"step-{step:06d}.png"
    with atomic_path(picture) as tmp:
        Image.fromarray(np.concatenate(list(grid), axis=1)).save(tmp, format="PNG")
    report_progress(step=step, total=cfg.train_steps, image=str(picture))
    log.write(row)
    if per_prompt is not None:
        for i in range(n):
            per_prompt.write({"step": step, "prompt": i, "denscore": float(p.score[i]),
                              "text_relevant": float(p.relevant[i]), "text_irrelevant": float(p.irrelevant[i])})
    acc.log({f"validation/{k}": v for k, v in row.items() if k != "step" and v != ""}, step=step)
    return row
