"""Load what the trainer needs: the SD1.5 components, the preference model, the prompts — or the embedded
default (a tiny random-weight SD-architecture pipeline and preference model, written once in their real file
formats and loaded back through the same code a real run uses)."""

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
    """SD1.5 components from a diffusers folder or Hub id, a single-file checkpoint, or the embedded default."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if model is None:
        source = str(embedded_pipeline_dir(seed))
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
    return BaseModel(unet, vae, text_encoder, tokenizer, scheduler, source)


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
