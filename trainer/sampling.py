"""DDIM sampling with truncated backpropagation (docs/method.md §5; the reference's reward stage).

From noise, DDIM (η = 0) over ``t = 999, 979, …, 19`` with classifier-free guidance. Gradients are kept at only K
of the steps (every ``steps/K``-th from a random offset), where the UNet runs under gradient checkpointing on a
**detached** input: the gradient reaches earlier steps through the DDIM update's ``x_t`` term, not through
∂ε/∂x. At the other steps ε is computed without a graph, but the update itself keeps one. The last step's
predicted clean latent x̂0 is returned for decoding.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint


@dataclass
class UNetConditioning:
    """What the UNet is conditioned on, per row: the text ``context`` ``(B, L, C)`` and, for SDXL, the pooled text
    embedding ``(B, 1280)`` and the size/crop ``time_ids`` ``(B, 6)`` of its ``text_time`` extra conditioning."""

    context: torch.Tensor
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def cat(self, other: "UNetConditioning") -> "UNetConditioning":
        """Rows of ``self`` then ``other`` (the CFG batch: unconditional first)."""
        both = lambda a, b: None if a is None else torch.cat([a, b])  # noqa: E731
        return UNetConditioning(torch.cat([self.context, other.context]), both(self.text_embeds, other.text_embeds),
                                both(self.time_ids, other.time_ids))

    def unet_kwargs(self) -> dict:
        """Keyword arguments of ``UNet2DConditionModel.forward`` (diffusers' SDXL ``added_cond_kwargs``)."""
        kwargs = {"encoder_hidden_states": self.context}
        if self.text_embeds is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.text_embeds, "time_ids": self.time_ids}
        return kwargs


def sdxl_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
                  ) -> torch.Tensor:
    """SDXL's micro-conditioning of one image, ``(original h, w, crop top, left, target h, w)`` — the order of
    diffusers' ``StableDiffusionXLPipeline._get_add_time_ids``. Generated images use ``(res, res, 0, 0, res, res)``."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def ddim_scheduler(noise_scheduler, steps: int):
    """A diffusers ``DDIMScheduler`` (η = 0) with ``steps`` trailing timesteps: 999, 979, …, 19 for 50."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(noise_scheduler.config, timestep_spacing="trailing", clip_sample=False,
                                          set_alpha_to_one=False)
    scheduler.set_timesteps(steps)
    return scheduler


def grad_step_indices(steps: int, grad_steps: int, offset: int) -> list[int]:
    """Indices of the steps that get gradients: ``offset, offset + steps/K, …`` (offset in 0..steps/K-1)."""
    every = steps // grad_steps
    if not 0 <= offset < every:
        raise ValueError(f"offset must be in 0..{every - 1}, got {offset}")
    return [offset + k * every for k in range(grad_steps)]


def _autocast_states() -> list[tuple[str, bool, torch.dtype]]:
    states = []
    for device in ("cpu", "cuda"):
        if hasattr(torch, "get_autocast_dtype"):
            states.append((device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)))
        else:  # torch < 2.4
            enabled = torch.is_autocast_cpu_enabled() if device == "cpu" else torch.is_autocast_enabled()
            dtype = torch.get_autocast_cpu_dtype() if device == "cpu" else torch.get_autocast_gpu_dtype()
            states.append((device, enabled, dtype))
    return states


class _Recomputed(torch.autograd.Function):
    """``fn()`` run without keeping activations; in the backward it runs again — same RNG state, same autocast,
    under ``recompute_context`` — and is backpropagated to ``params``. Unlike torch's non-reentrant checkpoint, the
    recomputation may save other tensors than the first run (it can checkpoint its own blocks); unlike the
    reentrant one, the gradient reaches the parameters through this node's inputs, once per backward (DDP's
    bookkeeping stays intact)."""

    @staticmethod
    def forward(ctx, fn, recompute_context, *params):
        ctx.fn, ctx.recompute_context, ctx.params = fn, recompute_context, params
        ctx.autocast = _autocast_states()
        ctx.cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        ctx.rng = torch.get_rng_state(), (torch.cuda.get_rng_state() if ctx.cuda else None)
        return fn()

    @staticmethod
    def backward(ctx, grad_out):
        devices = [torch.cuda.current_device()] if ctx.cuda else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), contextlib.ExitStack() as stack:
            torch.set_rng_state(ctx.rng[0])
            if ctx.cuda:
                torch.cuda.set_rng_state(ctx.rng[1])
            for device, enabled, dtype in ctx.autocast:
                if enabled:
                    stack.enter_context(torch.autocast(device, dtype=dtype))
            if ctx.recompute_context is not None:
                stack.enter_context(ctx.recompute_context())
            out = ctx.fn()
        wanted = [i for i, p in enumerate(ctx.params) if p.requires_grad]
        grads = torch.autograd.grad(out, [ctx.params[i] for i in wanted], grad_out, allow_unused=True)
        full = [None] * len(ctx.params)
        for i, g in zip(wanted, grads):
            full[i] = g
        return (None, None, *full)


def recomputed(fn: Callable[[], torch.Tensor], params, recompute_context=None) -> torch.Tensor:
    """``fn()`` whose activations are not kept: the backward runs it again (see :class:`_Recomputed`); gradients
    flow to ``params`` (the trainable parameters ``fn`` uses) only."""
    return _Recomputed.apply(fn, recompute_context, *params)


@contextlib.contextmanager
def blocks_checkpointed(unet):
    """Diffusers' per-block gradient checkpointing switched on for the duration (a backward then holds one block's
    activations at a time)."""
    was = unet.is_gradient_checkpointing
    if not was:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if not was:
            unet.disable_gradient_checkpointing()


def sample_truncated(unet: Callable, scheduler, noise: torch.Tensor, cond, uncond, guidance: float,
                     grad_indices: list[int], use_checkpoint: bool = True,
                     on_step: Callable[[int, bool], None] | None = None, detach_input: bool = True,
                     recompute_context: Callable[[], contextlib.AbstractContextManager] | None = None,
                     params=None) -> torch.Tensor:
    """Run the DDIM chain from ``noise`` and return x̂0 of the last step, ``(B, 4, h, w)``.

    ``unet(x, t, context) -> ε``; ``cond``/``uncond`` are ``(B, L, C)`` contexts or :class:`UNetConditioning`
    (SDXL), concatenated into one CFG batch. ``on_step(i, with_grad)`` is called once per step (progress, tests).
    With ``params`` (the trainable parameters), a gradient step is run by :func:`recomputed`: between sampling and
    backward it keeps only its inputs, and ``recompute_context()`` is entered while it is recomputed inside the
    backward (the trainer: :func:`blocks_checkpointed`, so the recomputation holds one block's activations at a
    time; block checkpoints active during the sampling would each keep their block's input until the backward,
    for every gradient step at once). Without ``params``: torch's checkpoint around the call.
    ``detach_input=False`` with every index and no checkpointing is plain backpropagation through the whole chain
    (the benchmark's baseline).
    """
    grad_set = set(grad_indices)
    latents = noise
    context = torch.cat([uncond, cond]) if isinstance(cond, torch.Tensor) else uncond.cat(cond)
    pred_x0 = noise
    for i, t in enumerate(scheduler.timesteps):
        t_batch = t.expand(2 * noise.shape[0]).to(noise.device)
        with_grad = i in grad_set and torch.is_grad_enabled()
        if with_grad:
            x_in = torch.cat([latents, latents])
            x_in = x_in.detach() if detach_input else x_in
            if use_checkpoint and params is not None:
                eps = recomputed(lambda x=x_in, t=t_batch: unet(x, t, context), params, recompute_context)
            elif use_checkpoint:
                eps = checkpoint(unet, x_in, t_batch, context, use_reentrant=False)
            else:
                eps = unet(x_in, t_batch, context)
        else:
            with torch.no_grad():
                eps = unet(torch.cat([latents, latents]), t_batch, context)
        eps_uncond, eps_cond = eps.chunk(2)
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        out = scheduler.step(eps.to(latents.dtype), t, latents)
        latents, pred_x0 = out.prev_sample, out.pred_original_sample
        if on_step is not None:
            on_step(i, with_grad)
    return pred_x0


def vae_dtype(training_dtype: torch.dtype, vae_config) -> torch.dtype:
    """The VAE's dtype for a run in ``training_dtype``: fp32 when training in fp16 with a VAE whose config asks for
    ``force_upcast`` (diffusers' flag, True unless the config says otherwise: SDXL's VAE overflows to NaN in fp16,
    and SD1.5's published config keeps the default; diffusers' SDXL pipeline and training scripts upcast the same
    way), otherwise the training dtype (bf16 has fp32's range; an fp16-safe VAE says force_upcast false)."""
    if training_dtype == torch.float16 and vae_config.get("force_upcast", False):
        return torch.float32
    return training_dtype


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode with gradients, mapped to images in [0, 1]: ``(x / 2 + 0.5).clamp(0, 1)``. The VAE runs in its
    own dtype even under autocast, so an upcast VAE (:func:`vae_dtype`) really decodes in fp32."""
    with torch.autocast(latents.device.type, enabled=False):
        x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (x.float() / 2 + 0.5).clamp(0, 1)
