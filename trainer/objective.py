"""The two training objectives, each for one micro-batch.

* reward stage (docs/method.md §5, paper §4): sample from noise with truncated backpropagation, decode, score
  with the segment-level preference model, decompose along V and reweight the text-irrelevant part:
  loss ``0.5 · (1 − mean S_ω)``, ``S_ω = relevant + ω · irrelevant``;
* align stage (stage 1): the diffusion loss (MSE to ε, or to v for v-prediction models) on (image, long caption)
  pairs with the segment-level conditioning and caption dropout.

Each takes the parts of the run it uses (:mod:`trainer.parts`): the LoRA UNet, the text side, the base model's
frozen parts and (reward stage) the preference model, with the run's config and accelerator. ``phases`` (a
:class:`~longalign_core.phase_timer.PhaseTimer`) times the step's phases when a dry run or a benchmark asks.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from longalign_core.denscore import Decomposition, segment_score
from longalign_core.phase_timer import PhaseTimer

from .sampling import blocks_checkpointed, ddim_scheduler, decode, grad_step_indices, sample_truncated

if TYPE_CHECKING:
    from longalign_core.preference import PreferenceModel

    from .conditioning import StepEncoder
    from .parts import BaseParts, LoRAUNet

#: A timer that records nothing: the phases of a step nobody measures.
UNTIMED = PhaseTimer(enabled=False)


def draw_grad_offset(steps: int, grad_steps: int, gen: torch.Generator) -> int:
    """The first DDIM step with gradients: uniform over ``0 .. steps // grad_steps − 1`` (the reference's
    random offset: every step of the chain gets gradients equally often over the run)."""
    return int(torch.randint(0, steps // grad_steps, (1,), generator=gen))


def drop_captions(captions: list[str], rate: float, gen: torch.Generator) -> list[str]:
    """Caption dropout: each caption replaced by the empty prompt with probability ``rate`` (so the LoRA also
    learns the unconditional prediction classifier-free guidance needs)."""
    keep = torch.rand(len(captions), generator=gen) >= rate
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def reward_loss(cfg, acc, lora: LoRAUNet, text: StepEncoder, base: BaseParts, judge: PreferenceModel,
                prompts: list[str], gen: torch.Generator, direction: torch.Tensor, dump: dict | None = None,
                phases: PhaseTimer = UNTIMED):
    """Loss of one micro-batch of ``prompts`` and its statistics. ``judge`` scores the decoded images;
    ``direction`` is V: the step's (:meth:`~trainer.direction.RewardDirection.for_step`), the one way V reaches
    the loss. ``dump`` (a dict) receives diagnostics."""
    device = acc.device
    # 1. the conditioning of the prompts and of the empty prompt (CFG)
    with phases("text encoding"):
        step_cond = text.encode(prompts, with_uncond=True)
    cond, uncond = text.unet_conditioning(step_cond)
    # 2. DDIM from noise, gradients at K of the steps (every steps/K-th from a random offset)
    side = cfg.resolution // 8
    noise = torch.randn(len(prompts), 4, side, side, generator=gen).to(device, base.dtype)
    scheduler = ddim_scheduler(base.noise_scheduler, cfg.sample_steps)
    offset = draw_grad_offset(cfg.sample_steps, cfg.sample_grad_steps, gen)
    grad_idx = grad_step_indices(cfg.sample_steps, cfg.sample_grad_steps, offset)
    crop_seed = int(torch.randint(0, 2**62, (1,), generator=gen))  # one crop position for the whole batch
    with acc.autocast():
        x0 = sample_truncated(lora.eps, scheduler, noise, cond, uncond, cfg.sample_guidance, grad_idx,
                              use_checkpoint=cfg.gradient_checkpointing,
                              recompute_context=lambda: blocks_checkpointed(lora.module), params=lora.params)
    # 3.–4. decode with gradients, score segment by segment, decompose along V, reweight the text-irrelevant part
    v = direction
    loss, parts, features = decode_and_score(cfg, base.vae, judge, x0, prompts, v, crop_seed, phases)
    if dump is not None:
        t_bar = torch.stack([f.mean for f in features])
        dump.update(t_bar_mean=t_bar.mean(0).detach().cpu(), direction=v.detach().float().cpu(),
                    cond_length=step_cond.cond.shape[1], uncond_length=step_cond.uncond.shape[1])
    all_scores = acc.gather(parts.score.to(device))  # the std over every process's images
    stats = {"reward": float(parts.score.mean()),
             "reward_std": float(all_scores.std()) if all_scores.numel() > 1 else 0.0,
             "reweighted": float(parts.reweighted.mean()), "text_relevant": float(parts.relevant.mean()),
             "text_irrelevant": float(parts.irrelevant.mean()), "grad_offset": offset,
             "reward_tokens_lost": sum(sum(f.truncated) for f in features), **step_cond.stats}
    return loss, stats


def decode_batch(cfg) -> int:
    """Images per decode-and-score piece: ``--decode-batch``, or as many as make one 512×512 image."""
    res = cfg.resolution
    return cfg.decode_batch or max(1, (512 * 512) // (res * res))


def decode_and_score(cfg, vae, judge: PreferenceModel, x0: torch.Tensor, prompts: list[str], v: torch.Tensor,
                     crop_seed: int, phases: PhaseTimer = UNTIMED):
    """The loss ``0.5 · (1 − mean_b S_ω,b)`` of the decoded ``x0`` ``(B, 4, h, w)`` (``vae`` decodes, ``judge``
    scores), its parts (detached) and the prompts' text features.

    The images are decoded and scored :func:`decode_batch` at a time. Each piece is backpropagated to its x̂0 at
    once (S_ω of an image depends on its own x̂0 only: V is fixed by the text), which frees the VAE's and the
    preference model's activations before the next piece; the returned loss carries the collected
    ``∂loss/∂x̂0`` back into the sampling chain, so its value and its gradient are those of the whole batch.
    The random crop is drawn from ``crop_seed`` for each piece: one position for the batch, whatever the piece
    size."""
    n = len(prompts)
    piece = decode_batch(cfg)
    whole = piece >= n
    x0_pieces = [x0] if whole else [x0.detach()[i:i + piece].requires_grad_() for i in range(0, n, piece)]
    grads, parts, features, start = [], [], [], 0
    for x in x0_pieces:
        with phases("VAE decode"):
            images = decode(vae, x)
        with phases("reward"):
            result = segment_score(judge, images, prompts[start:start + len(x)], direction=v,
                                   omega=cfg.reward_omega, crop=cfg.reward_crop, split_mode=cfg.split_mode,
                                   long_segments=cfg.long_segments,
                                   generator=torch.Generator().manual_seed(crop_seed))
        piece_loss = -0.5 * result.parts.reweighted.sum() / n
        if whole:
            loss = 0.5 + piece_loss
        else:
            with phases("backward (decode, reward)"):
                grads.append(torch.autograd.grad(piece_loss, x)[0])
        parts.append(result.parts)
        features += result.prompts
        start += len(x)
    joined = Decomposition(*(torch.cat([getattr(p, f.name).detach() for p in parts])
                             for f in dataclasses.fields(Decomposition)))
    if not whole:  # value of the whole loss, gradient through x̂0 into the chain
        value = 0.5 * (1 - joined.reweighted.mean())
        grad = torch.cat(grads).to(x0.dtype)
        surrogate = (x0 * grad).sum()
        loss = surrogate + (value - surrogate.detach())
    return loss, joined, features


def align_loss(cfg, acc, lora: LoRAUNet, text: StepEncoder, base: BaseParts, batch, gen: torch.Generator,
               phases: PhaseTimer = UNTIMED):
    """Supervised diffusion loss on ``batch`` = (images ``(B, 3, H, W)`` in [0, 1], captions, SDXL time ids) and
    its statistics."""
    device, vae, scheduler = acc.device, base.vae, base.noise_scheduler
    images, captions, time_ids = batch
    captions = drop_captions(captions, cfg.caption_dropout, gen)
    with torch.no_grad(), torch.autocast(device.type, enabled=False), phases("VAE encode"):  # in its own dtype
        latents = vae.encode(images.to(device, vae.dtype) * 2 - 1).latent_dist.sample(
            generator=gen).to(base.dtype) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen).to(device)
    noisy = scheduler.add_noise(latents, noise, t)
    with phases("text encoding"):
        step_cond = text.encode(captions, with_uncond=False)
    cond, _ = text.unet_conditioning(step_cond, time_ids)
    with acc.autocast():
        pred = lora.eps(noisy, t, cond)
    # the model's own target: ε, or v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x0 (v-prediction models: NoobAI-XL V-Pred)
    target = noise if base.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    loss = F.mse_loss(pred.float(), target.float())
    return loss, step_cond.stats
