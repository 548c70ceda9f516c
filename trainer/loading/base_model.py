"""``BaseModel``: the parts of a Stable Diffusion model a run starts from, however they were stored (diffusers
folder, Hub id, single file, embedded demo)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BaseModel:
    """The frozen parts and the UNet to fine-tune."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object
    source: str
    #: SDXL's second text encoder (OpenCLIP-bigG, ``CLIPTextModelWithProjection``) and its tokenizer.
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None
