"""The two training objectives, each for one micro-batch.

* reward stage (docs/method.md §5, paper §4): sample from noise with truncated backpropagation, decode, score
  with the segment-level preference model, decompose along V and reweight the text-irrelevant part:
  loss ``0.5 · (1 − mean S_ω)``, ``S_ω = relevant + ω · irrelevant``;
* align stage (stage 1): the diffusion loss (MSE to ε, or to v for v-prediction models) on (image, long caption)
  pairs with the segment-level conditioning and caption dropout.

``run`` is the :class:`~trainer.finetune.Trainer`: its models, text encoder (``run.text``), accelerator and
config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longalign_core.denscore import segment_score

from .sampling import ddim_scheduler, decode, grad_step_indices, sample_truncated


def reward_loss(run, prompts: list[str], gen: torch.Generator, dump: dict | None = None):
    """Loss of one micro-batch of ``prompts`` and its statistics. V comes from the step's prompts gathered over
    all processes. ``dump`` (a dict) receives diagnostics."""
    cfg, device = run.cfg, run.acc.device
    # 1. the conditioning of the prompts and of the empty prompt (CFG)
    step_cond = run.text.encode(prompts, with_uncond=True)
    cond, uncond = run.text.unet_conditioning(step_cond)
    # 2. DDIM from noise, gradients at K of the steps (every steps/K-th from a random offset)
    side = cfg.resolution // 8
    noise = torch.randn(len(prompts), 4, side, side, generator=gen).to(device, run.weight_dtype)
    scheduler = ddim_scheduler(run.noise_scheduler, cfg.sample_steps)
    every = cfg.sample_steps // cfg.sample_grad_steps
    offset = int(torch.randint(0, every, (1,), generator=gen))
    grad_idx = grad_step_indices(cfg.sample_steps, cfg.sample_grad_steps, offset)
    with run.acc.autocast():
        x0 = sample_truncated(run.unet_eps, scheduler, noise, cond, uncond, cfg.sample_guidance, grad_idx,
                              use_checkpoint=cfg.gradient_checkpointing)
        # 3. decode with gradients
        images = decode(run.vae, x0)
    # 4. the segment-level score, decomposed along V, the text-irrelevant part reweighted by ω
    result = segment_score(run.reward, images, prompts, direction=None, omega=cfg.reward_omega,
                           crop=cfg.reward_crop, split_mode=cfg.split_mode, long_segments=cfg.long_segments,
                           generator=gen, gather=run.acc.gather)
    parts = result.parts
    s_omega = parts.reweighted
    loss = 0.5 * (1 - s_omega.mean())
    if dump is not None:
        t_bar = torch.stack([f.mean for f in result.prompts])
        dump.update(t_bar_mean=t_bar.mean(0).detach().cpu(), direction=result.direction.detach().cpu(),
                    cond_length=step_cond.cond.shape[1], uncond_length=step_cond.uncond.shape[1])
    all_scores = run.acc.gather(parts.score.detach())  # the std over every process's images
    stats = {"reward": float(parts.score.detach().mean()),
             "reward_std": float(all_scores.std()) if all_scores.numel() > 1 else 0.0,
             "reweighted": float(s_omega.detach().mean()), "text_relevant": float(parts.relevant.detach().mean()),
             "text_irrelevant": float(parts.irrelevant.detach().mean()), "grad_offset": offset,
             "reward_tokens_lost": sum(sum(f.truncated) for f in result.prompts), **step_cond.stats}
    return loss, stats


def align_loss(run, batch, gen: torch.Generator):
    """Supervised diffusion loss on ``batch`` = (images ``(B, 3, H, W)`` in [0, 1], captions, SDXL time ids) and
    its statistics."""
    cfg, device = run.cfg, run.acc.device
    images, captions, time_ids = batch
    keep = torch.rand(len(captions), generator=gen) >= cfg.caption_dropout
    captions = [c if k else "" for c, k in zip(captions, keep.tolist())]
    with torch.no_grad(), torch.autocast(device.type, enabled=False):  # the VAE in its own dtype
        latents = run.vae.encode(images.to(device, run.vae.dtype) * 2 - 1).latent_dist.sample(
            generator=gen).to(run.weight_dtype) * run.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
    t = torch.randint(0, run.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                      generator=gen).to(device)
    noisy = run.noise_scheduler.add_noise(latents, noise, t)
    step_cond = run.text.encode(captions, with_uncond=False)
    cond, _ = run.text.unet_conditioning(step_cond, time_ids)
    with run.acc.autocast():
        pred = run.unet_eps(noisy, t, cond)
    # the model's own target: ε, or v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x0 for v-prediction models (NoobAI-XL V-Pred)
    target = noise if run.prediction_type == "epsilon" else run.noise_scheduler.get_velocity(latents, noise, t)
    loss = F.mse_loss(pred.float(), target.float())
    return loss, step_cond.stats
