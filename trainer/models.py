"""Load what the trainer needs: the SD1.5 or SDXL components, the preference model, the prompts — or an embedded
default (a tiny random-weight SD1.5- or SDXL-architecture pipeline and preference model, written once in their
real file formats and loaded back through the same code a real run uses)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from longalign_core.io_utils import publish_dir, read_jsonl_texts

log = logging.getLogger("LongAlign")

#: The demo profile's resolution (trainer.config.EMBEDDED_PROFILE).
EMBEDDED_RESOLUTION = 64



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


def _cache_root() -> Path:
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

    root = _cache_root() / f"tiny-sd-v1-seed{seed}"
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

    root = _cache_root() / f"tiny-sdxl-seed{seed}"
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

    root = _cache_root() / f"tiny-denscore-seed{seed}"
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
        from .single_file import load_single_file

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


def load_prompts(source: str | None, column: str = "caption") -> list[str]:
    """Prompts from a .txt (one per line), .jsonl (``prompt``/``caption``), a ``datasets`` folder, or the
    built-in long prompts. A bad file is a :class:`~longalign_core.errors.BadInputError` naming it (and the
    line or row)."""
    from longalign_core.errors import BadConfigError, BadInputError

    if source is None:
        from longalign_core.denscore import default_reference_prompts

        return default_reference_prompts()
    path = Path(source)
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise BadInputError(f"{path} is not a `datasets` folder written by save_to_disk ({exc})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        if column not in ds.column_names:
            raise BadInputError(f"{path} has no column {column!r} (columns: {ds.column_names}); set --caption-column")
        prompts = list(ds[column])
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise BadInputError(f"{path}: row {i} of column {column!r} is {type(p).__name__}, not a string")
    elif path.suffix == ".jsonl":
        prompts = read_jsonl_texts(path, column, option="--prompts")
    elif path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            line = path.read_bytes()[: exc.start].count(b"\n") + 1
            raise BadInputError(f"{path}:{line}: not UTF-8 text ({exc.reason}); save the prompts file as UTF-8") \
                from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        raise BadConfigError(f"prompts file or folder {path} not found (--prompts or --validation-prompts)")
    if not prompts:
        raise BadInputError(f"no prompts found in {path}")
    return prompts
