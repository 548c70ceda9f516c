"""Load what a run trains against: the SD1.x or SDXL base model (diffusers folder, Hub id, single-file
checkpoint, or an embedded demo model) and the preference model."""

from __future__ import annotations

import logging
from pathlib import Path

from .base_model import BaseModel
from .embedded import embedded_pipeline_dir, embedded_reward_dir, embedded_sdxl_pipeline_dir
from .single_file import load_single_file

log = logging.getLogger("LongAlign")


def load_base_model(model: str | None, seed: int = 0) -> BaseModel:
    """SD1.x or SDXL components from a diffusers folder or Hub id, a single-file checkpoint, or an embedded
    default (``None``/``embedded``, ``embedded-sdxl``). SDXL is recognised by its UNet's ``text_time`` extra
    conditioning (folders) or by its weights (single files)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if model in (None, "embedded"):
        source = str(embedded_pipeline_dir(seed))
    elif model == "embedded-sdxl":
        source = str(embedded_sdxl_pipeline_dir(seed))
    elif Path(model).is_file():
        return load_single_file(model)
    else:
        source = model
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    extra = {}
    if unet.config.get("addition_embed_type") == "text_time":  # SDXL: the second text encoder
        extra = dict(text_encoder_2=CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2"),
                     tokenizer_2=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2"))
    elif unet.config.get("addition_embed_type") is not None:
        from longalign_core.errors import BadModelFileError

        raise BadModelFileError(f"{source}: its UNet has extra conditioning {unet.config['addition_embed_type']!r}; "
                                f"the trainer supports SD1.x and SDXL base models")
    return BaseModel(unet, vae, text_encoder, tokenizer, scheduler, source, **extra)


def reward_model_source(reward_model: str | None, seed: int = 0) -> str:
    """The preference model to load: ``--reward-model`` as given, or the embedded tiny one (``None`` or
    ``embedded``; :class:`~trainer.config.TrainConfig` allows ``None`` only with an embedded base model)."""
    if reward_model in (None, "embedded"):
        return str(embedded_reward_dir(seed))
    return reward_model
