"""Single-file checkpoints (what ComfyUI users have in ``models/checkpoints``) loaded offline through diffusers'
single-file loader, with the configs it needs generated here."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from longalign_core.io_utils import publish_dir

from .models import BaseModel, _cache_root


def sd15_config_dir(unet_config: dict | None = None) -> Path:
    """A diffusers SD1.5 folder of configs only (no weights): what diffusers' single-file loader needs to build
    the pipeline offline. ``unet_config`` overrides the UNet's (tests use a shrunken one)."""
    from transformers import CLIPTextConfig

    from longalign_core.clip_vocab import load_clip_tokenizer
    from longalign_core.lora import load_unet_config

    unet = load_unet_config(unet_config)
    digest = hashlib.sha256(json.dumps(unet, sort_keys=True).encode()).hexdigest()[:12]
    root = _cache_root() / f"sd15-configs-{digest}"
    if (root / "model_index.json").is_file():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    for sub in ("unet", "vae", "scheduler"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    (tmp / "unet" / "config.json").write_text(json.dumps(unet))
    (tmp / "vae" / "config.json").write_text(json.dumps({
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
        "sample_size": 512, "scaling_factor": 0.18215}))
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1}))
    CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                   bos_token_id=0, eos_token_id=2, pad_token_id=1).save_pretrained(tmp / "text_encoder")
    load_clip_tokenizer().save_pretrained(tmp / "tokenizer")
    (tmp / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None], "safety_checker": [None, None],
        "requires_safety_checker": False, "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    return publish_dir(tmp, root)


def load_single_file(path: str, unet_config: dict | None = None) -> BaseModel:
    """A single-file SD1.5 checkpoint (what ComfyUI users have), through diffusers' single-file loader with the
    SD1.5 configs shipped here, so it works offline."""
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_single_file(path, config=str(sd15_config_dir(unet_config)),
                                                        local_files_only=True, safety_checker=None,
                                                        requires_safety_checker=False)
    except Exception as exc:  # diffusers raises several kinds for a wrong file
        raise RuntimeError(f"could not load {path} as a single-file SD1.5 checkpoint: {exc}") from None
    from diffusers import DDPMScheduler

    return BaseModel(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                     DDPMScheduler.from_config(pipe.scheduler.config), path)
