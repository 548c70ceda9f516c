"""Validation during a run: the held-out prompts sampled from the same noise every time, scored with V from the
reference prompt set, so the text-relevant and text-irrelevant parts are comparable across steps (and runs)."""

from __future__ import annotations

import numpy as np
import torch

from longalign_core.denscore import segment_score

from .run_log import CSVLog
from .sampling import ddim_scheduler, decode, sample_truncated
from .seeding import step_generator

#: The generator step of the validation noise (no training step uses it).
VALIDATION_DRAW = 10**6


@torch.no_grad()
def validate(run, step: int, vlog: CSVLog) -> dict | None:
    """Sample and score ``run.validation_prompts`` (main process only, on the unwrapped UNet in eval mode: no
    LoRA dropout); write the row to ``vlog``, TensorBoard and ``validation/step-NNNNNN.png``."""
    cfg, acc = run.cfg, run.acc
    prompts = run.validation_prompts
    if not prompts or not acc.is_main_process:
        return None
    unet = acc.unwrap_model(run.unet)
    unet.eval()
    if run.t5 is not None:
        run.t5.adapter.eval()
    try:
        gen = step_generator(cfg.seed, VALIDATION_DRAW, 0)  # the same noise at every validation
        step_cond = run.text.encode(prompts, with_uncond=True)
        cond, uncond = run.text.unet_conditioning(step_cond)
        side = cfg.resolution // 8
        noise = torch.randn(len(prompts), 4, side, side, generator=gen).to(acc.device, run.weight_dtype)
        scheduler = ddim_scheduler(run.noise_scheduler, cfg.validation_steps)
        eps = lambda x, t, c: unet(x, t, **c.unet_kwargs()).sample  # noqa: E731
        with acc.autocast():
            x0 = sample_truncated(eps, scheduler, noise, cond, uncond, cfg.sample_guidance, [])
            images = decode(run.vae, x0)
        result = segment_score(run.reward, images, prompts, direction=run.reference_direction, crop="center",
                               split_mode=cfg.split_mode, long_segments=cfg.long_segments)
    finally:
        unet.train()
        if cfg.train_t5_adapter:
            run.t5.adapter.train()
    p = result.parts
    row = {"step": step, "denscore": float(p.score.mean()), "text_relevant": float(p.relevant.mean()),
           "text_irrelevant": float(p.irrelevant.mean()), "prompts_cut": step_cond.prompts_cut,
           "tokens_lost": step_cond.tokens_lost}
    from PIL import Image

    grid = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    (run.out / "validation").mkdir(exist_ok=True)
    Image.fromarray(np.concatenate(list(grid), axis=1)).save(run.out / "validation" / f"step-{step:06d}.png")
    vlog.write(row)
    acc.log({f"validation/{k}": v for k, v in row.items() if k != "step"}, step=step)
    return row
