"""Which Stable Diffusion family a single-file checkpoint is, from its tensor names and shapes alone (a safetensors
header): SD1.x or SDXL (base and the models built on it: Pony, Illustrious, NoobAI), the two the trainer
fine-tunes; anything else (SD2.x, the SDXL refiner, SD3, Flux, a LoRA, a VAE…) is refused by name. Shared by the
trainer (``trainer.loading.single_file``) and the training node, which refuses a file before anything loads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Mapping

from .errors import BadModelFileError
from .lora import SDXL_ADM_CHANNELS

Family = Literal["sd1", "sdxl"]
Shapes = Mapping[str, tuple[int, ...]]

UNET = "model.diffusion_model."
SD1_TEXT = "cond_stage_model.transformer.text_model."
SDXL_TEXT_L = "conditioner.embedders.0.transformer.text_model."
SDXL_TEXT_G = "conditioner.embedders.1.model."
VAE = "first_stage_model."
#: SDXL base's extra conditioning (pooled bigG text + 6 size/crop embeddings) and the refiner's (5 of them).
SDXL_ADM_IN, SDXL_REFINER_ADM_IN = SDXL_ADM_CHANNELS
FAMILY_NAMES = {"sd1": "SD1.x", "sdxl": "SDXL"}
SUPPORTED = ("the trainer reads single-file SD1.x and SDXL-family checkpoints (SDXL base 1.0, Pony, Illustrious, "
             "NoobAI: .safetensors or .ckpt, as ComfyUI keeps them in models/checkpoints)")


def safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header (no weight is read); a file that is not one is a
    :class:`BadModelFileError` naming it."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except Exception as exc:  # SafetensorError is not an OSError/ValueError
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadModelFileError(
            f"checkpoint {path} is not a valid safetensors file (truncated, corrupt or not a model file: {detail}); "
            f"download or export it again, or give the checkpoint itself") from None


def _refuse(path, looks_like: str, fix: str = "") -> BadModelFileError:
    return BadModelFileError(f"{path} looks like {looks_like}, which the trainer cannot fine-tune; {SUPPORTED}."
                             + (f" {fix}" if fix else ""))


def checkpoint_family(shapes: Shapes, path: str | os.PathLike = "checkpoint") -> Family:
    """``"sd1"`` or ``"sdxl"`` from the tensor names and shapes of a single-file checkpoint; anything else (SD2.x,
    the SDXL refiner, SD3, Flux, a LoRA, a VAE, a bare UNet…) is one :class:`BadModelFileError` naming ``path``,
    what it looks like and what is supported."""
    keys = shapes.keys()

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if not has(UNET + "input_blocks."):
        if has(UNET + "joint_blocks.") or has("joint_blocks."):
            raise _refuse(path, "a Stable Diffusion 3 checkpoint (MMDiT: joint_blocks)")
        if has(UNET + "double_blocks.") or has("double_blocks."):
            raise _refuse(path, "a Flux checkpoint (double_blocks/single_blocks)")
        if any(".lora_down." in k or ".lora_A." in k or k.startswith("lora_") for k in keys):
            raise _refuse(path, "a LoRA, not a base model", "Give the checkpoint the LoRA was trained for.")
        if has("down_blocks.") or has("unet.down_blocks."):
            raise _refuse(path, "a diffusers-format model (down_blocks.*), not a single-file checkpoint",
                          "Give the diffusers folder that holds model_index.json instead.")
        if has("encoder.down.") or has(VAE + "encoder."):
            raise _refuse(path, "a VAE only (no UNet under model.diffusion_model.input_blocks)")
        if has("transformer.resblocks.") or has("text_model.") or has("encoder.block."):
            raise _refuse(path, "a text encoder only (no UNet)")
        sample = ", ".join(sorted(keys)[:3]) or "no tensors"
        raise _refuse(path, f"something other than a Stable Diffusion checkpoint (no "
                            f"model.diffusion_model.input_blocks.* tensors; first names: {sample})")
    adm = shapes.get(UNET + "label_emb.0.0.weight", (None, None))[1]
    if has("cond_stage_model.model.transformer.resblocks."):
        raise _refuse(path, "a Stable Diffusion 2.x checkpoint (OpenCLIP-H text encoder under "
                            "cond_stage_model.model)")
    if adm == SDXL_REFINER_ADM_IN or (has("conditioner.embedders.0.model.") and not has(SDXL_TEXT_L)):
        raise _refuse(path, "the SDXL refiner (only OpenCLIP-bigG, 2560-channel extra conditioning); it refines "
                            "SDXL images but is not a base model to fine-tune", "Give the SDXL base checkpoint.")
    if has(SD1_TEXT) and adm is None:
        family: Family = "sd1"
    elif has(SDXL_TEXT_L) and has(SDXL_TEXT_G) and adm == SDXL_ADM_IN:
        family = "sdxl"
        if "edm_mean" in keys or "edm_vpred.sigma_max" in keys:  # ComfyUI's markers of these noise schedules
            kind = "Playground v2.5" if "edm_mean" in keys else "CosXL (EDM v-prediction)"
            raise _refuse(path, f"an SDXL-architecture model trained with an EDM noise schedule ({kind})")
    elif not has("cond_stage_model.") and not has("conditioner."):
        raise _refuse(path, "a UNet without its text encoders (no cond_stage_model.* or conditioner.* tensors)",
                      "Give the full checkpoint (UNet, text encoders and VAE in one file).")
    else:
        stored = sorted({".".join(k.split(".")[:4]) for k in keys if k.startswith("cond")})[:4]
        unet = f"a UNet with {adm}-channel extra conditioning" if adm else "a UNet without extra conditioning"
        raise _refuse(path, f"{unet} and text encoders stored as {', '.join(stored)}: neither SD1.x's layout "
                            f"(cond_stage_model.transformer.text_model) nor SDXL's (CLIP-L under "
                            f"conditioner.embedders.0.transformer, OpenCLIP-bigG in open_clip layout under "
                            f"conditioner.embedders.1.model, 2816-channel extra conditioning)")
    if not has(VAE + "encoder.") or not has(VAE + "decoder."):
        raise _refuse(path, f"an {FAMILY_NAMES[family]} checkpoint without its VAE (no first_stage_model.* tensors)",
                      "Give the full checkpoint (UNet, text encoders and VAE in one file).")
    return family
