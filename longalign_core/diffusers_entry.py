"""LongAlign in diffusers pipelines: long-prompt keyword arguments and LoRA loading.

```python
from diffusers import StableDiffusionXLPipeline
from longalign_core.diffusers_entry import long_prompt_kwargs, load_longalign_lora

pipe = StableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
load_longalign_lora(pipe, "outputs/reward/longalign_lora.safetensors")          # optional
kwargs, reports = long_prompt_kwargs(pipe, "A very long prompt. With many sentences. …", "blurry")
image = pipe(**kwargs, num_inference_steps=30).images[0]
```

``long_prompt_kwargs`` returns what ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` accept instead of
``prompt``/``negative_prompt``: ``prompt_embeds``, ``negative_prompt_embeds`` and, for SDXL,
``pooled_prompt_embeds``, ``negative_pooled_prompt_embeds``. Positive and negative prompts are encoded in one
batch, so their lengths always agree (the pipelines require it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from .clip_text import CLIPSegmentEncoder
from .errors import BadConfigError, BadInputError
from .lora import load_lora, lora_targets, merge_lora
from .sdxl_text import SDXLSegmentEncoder
from .segment_encoding import DEFAULT_TOKEN_BUDGET, OverflowPolicy, PromptReport
from .segmentation import LongSegmentPolicy, SplitMode


def is_sdxl_pipeline(pipe) -> bool:
    """True for pipelines with SDXL's two text encoders (``text_encoder_2``)."""
    return getattr(pipe, "text_encoder_2", None) is not None


def _as_list(prompt: str | Sequence[str], what: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise BadInputError(f"{what} {bad[0]} is a {type(prompts[bad[0]]).__name__}, not text")
    return prompts


def long_prompt_kwargs(
    pipe,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] | None = None,
    *,
    budget: int = DEFAULT_TOKEN_BUDGET,
    overflow: OverflowPolicy = "extend",
    split_mode: SplitMode = "sentence",
    long_segments: LongSegmentPolicy = "split",
    clip_skip: int | None = None,
) -> tuple[dict[str, Any], list[PromptReport]]:
    """Segment-level conditioning for a diffusers SD1.x/SD2.x or SDXL pipeline → ``(kwargs, reports)``.

    ``reports`` has one :class:`PromptReport` per positive prompt, then one per negative prompt. A ``None``
    negative prompt behaves as in diffusers: the empty prompt, or zeros where an SDXL pipeline is configured
    with ``force_zeros_for_empty_prompt`` (SDXL base is).
    """
    prompts = _as_list(prompt, "prompt")
    if not prompts:
        raise BadInputError("no prompt given")
    zero_negative = negative_prompt is None and bool(getattr(getattr(pipe, "config", None),
                                                               "force_zeros_for_empty_prompt", False))
    negatives = _as_list("" if negative_prompt is None else negative_prompt, "negative prompt")
    if len(negatives) == 1 and len(prompts) > 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise BadInputError(f"{len(prompts)} prompts but {len(negatives)} negative prompts: give one negative "
                            f"prompt or one per prompt")
    if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
        raise BadConfigError(f"{type(pipe).__name__} has no CLIP `text_encoder`/`tokenizer` (an SDXL refiner "
                             f"has only the second encoder): LongAlign needs the base pipeline")
    options = dict(budget=budget, overflow=overflow, split_mode=split_mode, long_segments=long_segments)
    batch = prompts + negatives
    b = len(prompts)
    if is_sdxl_pipeline(pipe):
        encoder = SDXLSegmentEncoder(pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2,
                                     clip_skip=clip_skip or 0)
        out = encoder.encode(batch, **options)
        cond, pooled = out.cond, out.pooled
        if zero_negative:
            cond, pooled = cond.clone(), pooled.clone()
            cond[b:] = 0
            pooled[b:] = 0
        kwargs = dict(prompt_embeds=cond[:b], negative_prompt_embeds=cond[b:],
                      pooled_prompt_embeds=pooled[:b], negative_pooled_prompt_embeds=pooled[b:])
    else:
        # diffusers' clip_skip for SD1.x: hidden state `clip_skip` layers back, then the final layer norm.
        encoder = CLIPSegmentEncoder(pipe.tokenizer, pipe.text_encoder, clip_skip=clip_skip or 0)
        out = encoder.encode(batch, **options)
        kwargs = dict(prompt_embeds=out.cond[:b], negative_prompt_embeds=out.cond[b:])
    return kwargs, out.reports


# ------------------------------------------------------------------------------------------------------------
# LoRA


def load_longalign_lora(pipe, path: str | Path, strength: float = 1.0, adapter_name: str | None = None,
                        fuse: bool = False) -> str:
    """Load a LongAlign LoRA (this trainer's kohya ``.safetensors`` or a released LongSD ``.pt``) into
    ``pipe.unet`` → the adapter name.

    By default the LoRA becomes a peft adapter (diffusers' ``set_adapters`` / ``disable_adapters`` /
    ``delete_adapters`` work on it); loading a second file adds a second adapter and keeps both active, so
    the stage-1 and reward LongSD LoRAs stack like the reference's sequential merge. ``fuse=True`` instead adds
    ``strength · up @ down`` to the UNet weights (no adapter left behind; cannot be undone).
    """
    if not torch.isfinite(torch.tensor(float(strength))):
        raise BadConfigError(f"LoRA strength must be a finite number, got {strength}")
    unet = pipe.unet
    # targets from the config: a UNet that already carries peft adapters has extra Linear layers inside
    pairs = load_lora(path, lora_targets(dict(unet.config)))
    if fuse:
        merge_lora(unet, pairs, strength)
        return ""
    from peft import LoraConfig

    existing = list(getattr(unet, "peft_config", {}) or {})
    name = adapter_name or _free_adapter_name(existing, Path(path).stem)
    if name in existing:
        raise BadConfigError(f"the UNet already has an adapter named {name!r}: choose another adapter_name")
    ranks = {p: down.shape[0] for p, (up, down) in pairs.items()}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(pairs),
                        rank_pattern={p: r for p, r in ranks.items() if r != rank},
                        alpha_pattern={p: r for p, r in ranks.items() if r != rank}, lora_dropout=0.0,
                        init_lora_weights=False)
    active = unet.active_adapters() if existing else []
    previous = {n: _adapter_strength(unet, n) for n in active}
    unet.add_adapter(config, adapter_name=name)
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for module_path, (up, down) in pairs.items():
            layer = modules[module_path]
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            a.copy_(down.reshape(a.shape).to(a.dtype))
            b.copy_(up.reshape(b.shape).to(b.dtype))
    names = list(previous) + [name]
    unet.set_adapters(names, weights=[previous[n] for n in previous] + [float(strength)])
    return name


def _free_adapter_name(existing: list[str], stem: str) -> str:
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in stem) or "longalign"
    name, k = base, 2
    while name in existing:
        name, k = f"{base}_{k}", k + 1
    return name


def _adapter_strength(unet, name: str) -> float:
    """The strength an adapter was set to (LongAlign adapters have alpha = rank, so peft's scaling is it)."""
    from peft.tuners.lora import LoraLayer

    for module in unet.modules():
        if isinstance(module, LoraLayer) and name in module.scaling:
            return float(module.scaling[name])
    return 1.0


__all__ = ["long_prompt_kwargs", "load_longalign_lora", "is_sdxl_pipeline"]
