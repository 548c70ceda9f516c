"""The embedded demo models: tiny random-weight SD1.5- and SDXL-architecture pipelines and a tiny two-tower CLIP
preference model, written once in their real file formats (diffusers / transformers folders) under the user's
cache and loaded back through the same code a real run uses. They make ``python -m trainer.finetune`` with no
arguments a complete CPU run (the pictures are noise)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from longalign_core.io_utils import publish_dir

#: The demo profile's resolution (trainer.config.EMBEDDED_PROFILE).
EMBEDDED_RESOLUTION = 64


def cache_root() -> Path:
    """Where generated model folders (the embedded models, single-file config folders) are cached."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "longalign" / "embedded"


def _require(folder: Path, files: list[str]) -> None:
    """Refuse to publish a folder that was not completely written."""
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise RuntimeError(f"writing {folder} did not produce {missing}; under torch.distributed only the main "
                           f"process may create the embedded models")


def embedded_pipeline_dir(seed: int = 0) -> Path:
    """A tiny SD-architecture diffusers folder (UNet, VAE, CLIP text encoder with the real tokenizer, DDPM
    scheduler config), random weights, created once."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from longalign_core.clip_vocab import load_clip_tokenizer

    root = cache_root() / f"tiny-sd-v1-seed{seed}"
    if (root / "model_index.json").is_file():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    torch.manual_seed(seed)
    UNet2DConditionModel(sample_size=EMBEDDED_RESOLUTION // 8, in_channels=4, out_channels=4,
                         block_out_channels=(32, 64), layers_per_block=1,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                         attention_head_dim=4, norm_num_groups=8).save_pretrained(tmp / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=EMBEDDED_RESOLUTION).save_pretrained(tmp / "vae")
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                                 eos_token_id=49407, pad_token_id=49407)).save_pretrained(tmp / "text_encoder")
    load_clip_tokenizer().save_pretrained(tmp / "tokenizer")
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  clip_sample=False, steps_offset=1).save_pretrained(tmp / "scheduler")
    (tmp / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                      "note": "LongAlign embedded default: random weights"}))
    _require(tmp, ["unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer/tokenizer_config.json",
                   "scheduler/scheduler_config.json"])
    return publish_dir(tmp, root)


def embedded_sdxl_pipeline_dir(seed: int = 0) -> Path:
    """A tiny SDXL-architecture diffusers folder, random weights, created once: a ``text_time`` UNet (pooled text +
    six 256-channel size/crop embeddings = SDXL's 2816 extra inputs, so ComfyUI's SDXL model class accepts its
    LoRA), CLIP-L and OpenCLIP-bigG-shaped text encoders (bigG with a 1280-d projection, its tokenizer padding
    with "!"), an SDXL VAE config (scaling 0.13025, ``force_upcast``) and SDXL's Euler scheduler config."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from longalign_core.clip_vocab import load_clip_tokenizer
    from longalign_core.lora import SDXL_ADM_CHANNELS, SDXL_TIME_EMBED_DIM

    root = cache_root() / f"tiny-sdxl-seed{seed}"
    if (root / "model_index.json").is_file():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    torch.manual_seed(seed)
    text = dict(vocab_size=49408, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    CLIPTextModel(CLIPTextConfig(hidden_size=32, hidden_act="quick_gelu", pad_token_id=49407, **text)
                  ).save_pretrained(tmp / "text_encoder")
    CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, hidden_act="gelu", projection_dim=1280,
                                               pad_token_id=0, **text)).save_pretrained(tmp / "text_encoder_2")
    UNet2DConditionModel(sample_size=EMBEDDED_RESOLUTION // 8, in_channels=4, out_channels=4,
                         block_out_channels=(32, 64), layers_per_block=1,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1),
                         cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
                         addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
                         projection_class_embeddings_input_dim=SDXL_ADM_CHANNELS[0], norm_num_groups=8
                         ).save_pretrained(tmp / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=EMBEDDED_RESOLUTION, scaling_factor=0.13025,
                  force_upcast=True).save_pretrained(tmp / "vae")
    load_clip_tokenizer().save_pretrained(tmp / "tokenizer")
    load_clip_tokenizer(pad_token="!").save_pretrained(tmp / "tokenizer_2")
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading"
                           ).save_pretrained(tmp / "scheduler")
    (tmp / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                      "note": "LongAlign embedded SDXL default: random weights"}))
    _require(tmp, ["unet/config.json", "vae/config.json", "text_encoder/config.json", "text_encoder_2/config.json",
                   "tokenizer/tokenizer_config.json", "tokenizer_2/tokenizer_config.json",
                   "scheduler/scheduler_config.json"])
    return publish_dir(tmp, root)


def embedded_reward_dir(seed: int = 0) -> Path:
    """A tiny two-tower CLIP preference model folder (Hugging Face CLIPModel format), random weights."""
    from transformers import CLIPConfig, CLIPModel

    from longalign_core.clip_vocab import load_clip_tokenizer

    root = cache_root() / f"tiny-denscore-seed{seed}"
    if (root / "config.json").is_file():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    torch.manual_seed(seed + 1)
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                                      eos_token_id=49407, pad_token_id=49407),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(tmp)
    load_clip_tokenizer().save_pretrained(tmp)
    _require(tmp, ["config.json", "model.safetensors"])
    return publish_dir(tmp, root)


