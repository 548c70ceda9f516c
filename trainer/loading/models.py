"""Load what a run trains against: the SD1.x or SDXL base model (diffusers folder, Hub id, single-file
checkpoint, or an embedded demo model), in the training dtype, and the preference model."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from longalign_core.dtype_loading import from_pretrained_in_dtype
from longalign_core.errors import BadModelFileError, check_input_file, check_model_source

from ..sampling import vae_dtype
from .base_model import BaseModel
from .embedded import embedded_pipeline_dir, embedded_reward_dir, embedded_sdxl_pipeline_dir
from .single_file import load_single_file

log = logging.getLogger("LongAlign")


def check_model_sources(cfg) -> None:
    """Every model option that names a local path names one that exists, before anything is loaded (a typo in
    ``--model ./models/sd15`` is one message, not a Hub download that fails minutes later)."""
    for option, value, what in (("--model", cfg.model, "model folder or checkpoint file"),
                                ("--reward-model", cfg.reward_model, "preference model folder or file"),
                                ("--t5-model", cfg.t5_model, "T5 folder"),
                                ("--t5-adapter", cfg.t5_adapter, "T5 adapter folder")):
        if value is not None and value not in ("embedded", "embedded-sdxl"):
            check_model_source(value, option, what)
    for path in cfg.init_lora:
        if not Path(path).expanduser().exists():
            raise BadModelFileError(f"--init-lora {path}: no such LoRA file (a typo in the path?); give the .pt "
                                    f"of the LongSD release or a .safetensors LoRA")
        check_input_file(path, "LoRA file", "--init-lora", error=BadModelFileError)


def half_variant(source: str, subfolder: str, dtype: torch.dtype) -> dict:
    """``{"variant": "fp16"}`` when a 16-bit run reads a local folder that ships fp16 weights beside fp32 ones
    (as stabilityai/stable-diffusion-xl-base-1.0 does): half the bytes read, no full fp32 copy in memory."""
    folder = Path(source) / subfolder
    if dtype in (torch.float16, torch.bfloat16) and folder.is_dir() and any(folder.glob("*.fp16.safetensors")):
        return {"variant": "fp16"}
    return {}


def load_base_model(model: str | None, seed: int = 0, dtype: torch.dtype = torch.float32) -> BaseModel:
    """SD1.x or SDXL components from a diffusers folder or Hub id, a single-file checkpoint, or an embedded
    default (``None``/``embedded``, ``embedded-sdxl``), read directly in ``dtype`` with one copy of the weights in
    memory (:func:`~longalign_core.dtype_loading.from_pretrained_in_dtype`);
    the VAE in :func:`~trainer.sampling.vae_dtype` (fp32 for SDXL's in an fp16 run). SDXL is recognised by its
    UNet's ``text_time`` extra conditioning (folders) or by its weights (single files)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if model in (None, "embedded"):
        source = str(embedded_pipeline_dir(seed))
    elif model == "embedded-sdxl":
        source = str(embedded_sdxl_pipeline_dir(seed))
    elif Path(model).is_file():
        return load_single_file(model, dtype)
    else:
        source = model
    unet = from_pretrained_in_dtype(UNet2DConditionModel, source, dtype, subfolder="unet",
                                    **half_variant(source, "unet", dtype))
    vae_config = AutoencoderKL.load_config(source, subfolder="vae")
    vae = from_pretrained_in_dtype(AutoencoderKL, source, vae_dtype(dtype, vae_config), subfolder="vae",
                                   **half_variant(source, "vae", vae_dtype(dtype, vae_config)))
    text_encoder = from_pretrained_in_dtype(CLIPTextModel, source, dtype, subfolder="text_encoder",
                                            **half_variant(source, "text_encoder", dtype))
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    extra = {}
    if unet.config.get("addition_embed_type") == "text_time":  # SDXL: the second text encoder
        extra = dict(text_encoder_2=from_pretrained_in_dtype(
                         CLIPTextModelWithProjection, source, dtype, subfolder="text_encoder_2",
                         **half_variant(source, "text_encoder_2", dtype)),
                     tokenizer_2=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2"))
    elif unet.config.get("addition_embed_type") is not None:
        raise BadModelFileError(f"{source}: its UNet has extra conditioning {unet.config['addition_embed_type']!r}; "
                                f"the trainer supports SD1.x and SDXL base models")
    return BaseModel(unet, vae, text_encoder, tokenizer, scheduler, source, **extra)


def reward_model_source(reward_model: str | None, seed: int = 0) -> str:
    """The preference model to load: ``--reward-model`` as given, or the embedded tiny one (``None`` or
    ``embedded``; :class:`~trainer.config.TrainConfig` allows ``None`` only with an embedded base model)."""
    if reward_model in (None, "embedded"):
        return str(embedded_reward_dir(seed))
    return reward_model
