"""The trainable LoRA on the UNet: attached with peft (rank r, alpha r, so scale 1 as the release), dropout on
the branch's output as the release places it, read back as (up, down) pairs and written as a kohya-keyed
safetensors file that ComfyUI's LoraLoader and LongAlign's loaders read."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from longalign_core.lora import save_kohya

LORA_FILE = "longalign_lora.safetensors"


def attach_lora(unet, targets, rank: int, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Add a peft LoRA of ``rank`` on every target (Gaussian init of A, zero B: the UNet is unchanged at first)
    and set the precision rule: LoRA master weights (and so the AdamW state) fp32, frozen base weights in
    ``dtype``. Returns the trainable parameters."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", lora_dropout=0.0,
                                target_modules=[t.path for t in targets]))
    for p in unet.parameters():
        p.data = p.data.float() if p.requires_grad else p.data.to(dtype)
    return [p for p in unet.parameters() if p.requires_grad]


def add_lora_output_dropout(unet, targets, p: float) -> list:
    """Dropout on the output of every LoRA branch, as the released LongAlign LoRA layers do
    (``W x + dropout(B A x)``); peft's own ``lora_dropout`` would drop the branch's input instead
    (``W x + B A dropout(x)``). Active while the module is in training mode. Returns the hook handles."""
    modules = dict(unet.named_modules())
    handles = []
    for t in targets:
        up = modules[t.path].lora_B["default"]
        handles.append(up.register_forward_hook(
            lambda module, args, out: F.dropout(out, p, training=module.training)))
    return handles


def lora_pairs(unet, targets) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(up, down) per target from a peft-wrapped UNet, with the peft scale folded into ``up``."""
    modules = dict(unet.named_modules())
    pairs = {}
    for t in targets:
        layer = modules[t.path]
        up = layer.lora_B["default"].weight.detach().float().cpu()
        down = layer.lora_A["default"].weight.detach().float().cpu()
        pairs[t.path] = (up * float(layer.scaling["default"]), down)
    return pairs


def lora_metadata(cfg, *, base_source: str, reward_source: str, prompts_sha256: str, is_sdxl: bool,
                  steps: int) -> dict[str, object]:
    """What the LoRA file says about itself: how it was trained (LongAlign keys) and the kohya fields ComfyUI
    and other tools read (``ss_network_dim``, ``ss_base_model_version``, ``ss_resolution``)."""
    return {
        "format": "kohya", "longalign": "trainer-lora", "base_model": base_source, "stage": cfg.stage,
        "rank": cfg.lora_rank, "ss_network_dim": cfg.lora_rank, "ss_network_alpha": cfg.lora_rank,
        "omega": cfg.reward_omega, "steps": steps, "prompts_sha256": prompts_sha256, "reward_model": reward_source,
        "seed": cfg.seed, "overflow": cfg.overflow, "token_budget": cfg.token_budget, "split_mode": cfg.split_mode,
        "long_segments": cfg.long_segments, "lora_dropout": cfg.lora_dropout, "resolution": cfg.resolution,
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_base_model_version": "sdxl_base_v1-0" if is_sdxl else "sd_v1"}


def export_lora(unet, targets, path: str | Path, metadata: dict[str, object]) -> dict:
    """Write the UNet's LoRA to ``path`` (kohya keys, atomically); returns its (up, down) pairs."""
    pairs = lora_pairs(unet, targets)
    save_kohya(pairs, path, metadata)
    return pairs
