"""Single-file checkpoints (what ComfyUI users have in ``models/checkpoints``) loaded offline through diffusers'
single-file loader, with the configs it needs generated here from the checkpoint's own tensor shapes.

Two families are read: SD1.x (CLIP-L under ``cond_stage_model.transformer``) and SDXL base with the models
built on it (Pony, Illustrious, NoobAI: the same architecture; CLIP-L in Hugging Face layout under
``conditioner.embedders.0.transformer`` and OpenCLIP-bigG in open_clip layout under
``conditioner.embedders.1.model``). The family is decided from the tensor names and shapes alone (a safetensors
header, or a ``.ckpt`` read with ``weights_only=True``), so a wrong file is refused before anything is built.
What weights cannot tell (attention heads, group-norm groups, activations, the VAE's scaling factor) comes from
the family's published configs."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Literal, Mapping

from longalign_core.errors import BadModelFileError
from longalign_core.io_utils import publish_dir
from longalign_core.lora import SDXL_ADM_CHANNELS

from .models import BaseModel, _cache_root

Family = Literal["sd1", "sdxl"]
Shapes = Mapping[str, tuple[int, ...]]

UNET = "model.diffusion_model."
SD1_TEXT = "cond_stage_model.transformer.text_model."
SDXL_TEXT_L = "conditioner.embedders.0.transformer.text_model."
SDXL_TEXT_G = "conditioner.embedders.1.model."
VAE = "first_stage_model."
#: SDXL base's extra conditioning (pooled bigG text + 6 size/crop embeddings) and the refiner's (5 of them).
SDXL_ADM_IN, SDXL_REFINER_ADM_IN = SDXL_ADM_CHANNELS
#: SDXL attention: 64 channels per head. SD1.x: 8 heads everywhere (diffusers calls heads "attention_head_dim").
SDXL_HEAD_CHANNELS = 64
SD1_HEADS = 8
#: CLIP text encoders (CLIP-L, OpenCLIP-bigG): 64 channels per head.
CLIP_HEAD_CHANNELS = 64
FAMILY_NAMES = {"sd1": "SD1.x", "sdxl": "SDXL"}
SUPPORTED = ("the trainer reads single-file SD1.x and SDXL-family checkpoints (SDXL base 1.0, Pony, Illustrious, "
             "NoobAI: .safetensors or .ckpt, as ComfyUI keeps them in models/checkpoints)")


# --------------------------------------------------------------------------------------------------------------
# reading names and shapes only
# --------------------------------------------------------------------------------------------------------------


def read_checkpoint_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a single-file checkpoint, without loading its weights where the format allows:
    a safetensors header, or a ``.ckpt``/``.pt`` read with ``weights_only=True`` (memory-mapped when it can be),
    so no code from the file is ever run. A missing, empty, corrupt or code-carrying file is a
    :class:`BadModelFileError` naming it."""
    from longalign_core.errors import check_input_file

    path = check_input_file(path, "checkpoint", error=BadModelFileError)
    with open(path, "rb") as handle:
        head = handle.read(16)
    is_zip_or_pickle = head[:2] == b"PK" or head[:1] == b"\x80"
    if path.suffix.lower() in (".safetensors", ".sft") or not is_zip_or_pickle:
        return _safetensors_shapes(path, is_zip_or_pickle)
    return _torch_shapes(path)


def _safetensors_shapes(path: Path, maybe_torch: bool) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except Exception as exc:  # SafetensorError is not an OSError/ValueError
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadModelFileError(
            f"checkpoint {path} is not a valid safetensors file (truncated, corrupt or not a model file: {detail}); "
            f"download or export it again, or give the checkpoint itself") from None


def _torch_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    import pickle

    import torch

    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        if "weights only" in str(exc).lower():
            raise BadModelFileError(
                f"checkpoint {path} contains pickled Python objects other than tensors, so it was not loaded "
                f"(loading it could run code). Use the model's .safetensors download, or convert the .ckpt once "
                f"in a trusted environment. ({first})") from None
        raise BadModelFileError(f"checkpoint {path} is not a PyTorch or safetensors checkpoint ({first}); "
                                f"give the model's .safetensors or .ckpt file") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadModelFileError(f"checkpoint {path} is not a readable PyTorch checkpoint (truncated or corrupt: "
                                f"{detail}); download or export it again") from None
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BadModelFileError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict of named "
                                f"tensors; {SUPPORTED}")
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(k, str) and torch.is_tensor(v)}


# --------------------------------------------------------------------------------------------------------------
# which family
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# configs from shapes
# --------------------------------------------------------------------------------------------------------------


def _indices(keys, pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (one group) over ``keys``."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _depth(keys, block: str) -> int:
    """Transformer blocks in the spatial transformer ``block`` (e.g. ``input_blocks.4.1``), 0 for none."""
    found = _indices(keys, re.escape(UNET + block) + r"\.transformer_blocks\.(\d+)\.")
    return found[-1] + 1 if found else 0


def ldm_unet_config_from_shapes(shapes: Shapes, path: str | os.PathLike = "checkpoint") -> dict:
    """The LDM/ComfyUI-style UNet config (``model_channels``, ``channel_mult``, ``num_res_blocks``,
    ``transformer_depth``, ``transformer_depth_output`` (listed as ComfyUI does: from the outermost level in,
    i.e. the last output block first), ``transformer_depth_middle``, ``context_dim``,
    ``use_linear_in_transformer``, ``adm_in_channels``, ``in_channels``, ``out_channels``) read off the
    ``model.diffusion_model.*`` tensor shapes. Heads are not in the weights: the caller adds them."""
    try:
        return _ldm_unet_config(shapes, path)
    except (KeyError, IndexError) as exc:
        raise BadModelFileError(f"checkpoint {path}: its UNet (model.diffusion_model.*) does not have the Stable "
                                f"Diffusion layout (no {exc}); {SUPPORTED}") from None


def _ldm_unet_config(shapes: Shapes, path) -> dict:
    keys = [k for k in shapes if k.startswith(UNET)]
    conv_in = shapes[UNET + "input_blocks.0.0.weight"]
    model_channels, in_channels = conv_in[0], conv_in[1]
    levels: list[list[int]] = [[]]  # per level: transformer depth of each res block
    channels: list[int] = []
    for i in _indices(keys, re.escape(UNET) + r"input_blocks\.(\d+)\.")[1:]:
        if UNET + f"input_blocks.{i}.0.op.weight" in shapes:  # a downsampler closes the level
            levels.append([])
            continue
        out_ch = shapes[UNET + f"input_blocks.{i}.0.out_layers.3.weight"][0]
        if len(levels[-1]) == 0:
            channels.append(out_ch)
        levels[-1].append(_depth(keys, f"input_blocks.{i}.1"))
    output_depth = [_depth(keys, f"output_blocks.{j}.1")
                    for j in _indices(keys, re.escape(UNET) + r"output_blocks\.(\d+)\.")]
    attn = next((k for k in keys if k.endswith(".attn2.to_k.weight")), None)
    proj_in = next((k for k in keys if k.endswith(".proj_in.weight")), None)
    adm = shapes.get(UNET + "label_emb.0.0.weight")
    if len(channels) != len(levels) or any(c % model_channels for c in channels) or attn is None:
        raise BadModelFileError(f"checkpoint {path}: its UNet (model.diffusion_model.*) does not have the "
                                f"Stable Diffusion layout (levels {levels}, channels {channels}); {SUPPORTED}")
    return {
        "in_channels": in_channels, "out_channels": shapes[UNET + "out.2.weight"][0],
        "model_channels": model_channels, "channel_mult": [c // model_channels for c in channels],
        "num_res_blocks": [len(level) for level in levels],
        "transformer_depth": [d for level in levels for d in level],
        "transformer_depth_output": output_depth[::-1],  # LDM/ComfyUI order: from the outermost level in
        "transformer_depth_middle": _depth(keys, "middle_block.1"),
        "context_dim": shapes[attn][1],
        "use_linear_in_transformer": proj_in is not None and len(shapes[proj_in]) == 2,
        "adm_in_channels": adm[1] if adm else None,
    }


def unet_config_from_shapes(shapes: Shapes, family: Family, path: str | os.PathLike = "checkpoint") -> dict:
    """The diffusers ``UNet2DConditionModel`` config of the checkpoint's UNet: layout from the shapes (through
    :func:`ldm_unet_config_from_shapes` and :func:`longalign_core.lora.diffusers_config_from_ldm`, which keeps
    per-block transformer depths), heads from the family's rule (SD1.x: 8 heads; SDXL: 64 channels per head). A
    layout diffusers cannot build is a :class:`BadModelFileError` naming the file."""
    from longalign_core.lora import LoraFormatError, diffusers_config_from_ldm

    ldm = ldm_unet_config_from_shapes(shapes, path)
    heads = {"num_heads": SD1_HEADS, "num_head_channels": -1} if family == "sd1" else \
        {"num_heads": -1, "num_head_channels": SDXL_HEAD_CHANNELS}
    try:
        config = diffusers_config_from_ldm({**ldm, **heads})
    except LoraFormatError as exc:
        raise BadModelFileError(f"checkpoint {path}: {exc}; {SUPPORTED}") from None
    tlpb = config["transformer_layers_per_block"]
    if all(isinstance(d, int) for d in tlpb) and len(set(tlpb)) == 1:
        config["transformer_layers_per_block"] = tlpb[0]  # as SD1.x's published config writes it
    config["sample_size"] = 128 if family == "sdxl" else 64
    if family == "sdxl":
        config["addition_embed_type_num_heads"] = 64
    return config


def clip_text_config_from_shapes(shapes: Shapes, prefix: str, layout: Literal["hf", "open_clip"],
                                 family_rule: Literal["clip_l", "bigg"]) -> dict:
    """``transformers.CLIPTextConfig`` fields of a text encoder stored under ``prefix``: vocabulary, width, depth,
    MLP width, context length and projection from the shapes; heads (64 channels each) and the activation from
    the published CLIP-L (quick_gelu) / OpenCLIP-bigG (gelu) configs."""
    if layout == "hf":
        vocab, hidden = shapes[prefix + "embeddings.token_embedding.weight"]
        positions = shapes[prefix + "embeddings.position_embedding.weight"][0]
        layers = len(_indices(shapes, re.escape(prefix) + r"encoder\.layers\.(\d+)\."))
        intermediate = shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0]
        projection = 768
    else:
        vocab, hidden = shapes[prefix + "token_embedding.weight"]
        positions = shapes[prefix + "positional_embedding"][0]
        layers = len(_indices(shapes, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."))
        intermediate = shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0]
        projection = shapes.get(prefix + "text_projection", (hidden, hidden))[1]
    return {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // CLIP_HEAD_CHANNELS),
            "max_position_embeddings": positions, "projection_dim": projection,
            "hidden_act": "quick_gelu" if family_rule == "clip_l" else "gelu",
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


# --------------------------------------------------------------------------------------------------------------
# config folders
# --------------------------------------------------------------------------------------------------------------

#: The SD VAE (SD1.x and SDXL share the architecture; SDXL's latents are scaled by 0.13025 and it upcasts).
_VAE = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32}
_SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False}
_SD1_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1}
#: Full-size text encoders (what a checkpoint of the family has when its shapes are not given).
CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
          "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
OPEN_CLIP_BIGG = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                  "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu",
                  "projection_dim": 1280, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


def _config_dir(name: str, files: dict[str, dict], text_encoders: dict[str, dict],
                tokenizers: dict[str, str]) -> Path:
    """A diffusers pipeline folder of configs only (no weights), keyed by its content, created once:
    ``files`` maps relative paths to JSON, ``text_encoders`` subfolders to ``CLIPTextConfig`` fields,
    ``tokenizers`` subfolders to the pad token of the real CLIP tokenizer."""
    from transformers import CLIPTextConfig

    from longalign_core.clip_vocab import load_clip_tokenizer

    content = json.dumps([files, text_encoders, tokenizers], sort_keys=True)
    root = _cache_root() / f"{name}-configs-{hashlib.sha256(content.encode()).hexdigest()[:12]}"
    if (root / "model_index.json").is_file():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    for rel, data in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(json.dumps(data))
    for sub, fields in text_encoders.items():
        CLIPTextConfig(**fields).save_pretrained(tmp / sub)
    for sub, pad in tokenizers.items():
        load_clip_tokenizer(pad_token=pad).save_pretrained(tmp / sub)
    return publish_dir(tmp, root)


def sd15_config_dir(unet_config: dict | None = None, text_config: dict | None = None) -> Path:
    """A diffusers SD1.5 folder of configs only: what diffusers' single-file loader needs to build the pipeline
    offline. ``unet_config``/``text_config`` default to SD1.5's (a checkpoint's own come from its shapes)."""
    from longalign_core.clip_vocab import END_TOKEN
    from longalign_core.lora import load_unet_config

    return _config_dir("sd15", {
        "unet/config.json": load_unet_config(unet_config),
        "vae/config.json": {**_VAE, "sample_size": 512, "scaling_factor": 0.18215},
        "scheduler/scheduler_config.json": _SD1_SCHEDULER,
        "model_index.json": {
            "_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None],
            "safety_checker": [None, None], "requires_safety_checker": False,
            "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}},
        {"text_encoder": {**CLIP_L, **(text_config or {})}}, {"tokenizer": END_TOKEN})


def sdxl_config_dir(unet_config: dict, text_config: dict | None = None, text_config_2: dict | None = None,
                    scheduler: dict | None = None) -> Path:
    """A diffusers SDXL folder of configs only (``StableDiffusionXLPipeline``): the UNet given, the SDXL VAE
    (scaling 0.13025, upcast), CLIP-L and OpenCLIP-bigG (``CLIPTextModelWithProjection``) text encoders
    (full size unless their shapes are given), the real CLIP tokenizer twice (the second pads with "!", as
    SDXL's does) and SDXL's Euler scheduler (``scheduler``: fields replaced, e.g. v-prediction)."""
    from longalign_core.clip_vocab import END_TOKEN

    return _config_dir("sdxl", {
        "unet/config.json": dict(unet_config),
        "vae/config.json": {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "scheduler/scheduler_config.json": {**_SDXL_SCHEDULER, **(scheduler or {})},
        "model_index.json": {
            "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
            "feature_extractor": [None, None], "image_encoder": [None, None],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}},
        {"text_encoder": {**CLIP_L, **(text_config or {})},
         "text_encoder_2": {**OPEN_CLIP_BIGG, **(text_config_2 or {})}},
        {"tokenizer": END_TOKEN, "tokenizer_2": "!"})


def config_dir_for(shapes: Shapes, family: Family, path: str | os.PathLike = "checkpoint") -> Path:
    """The offline config folder of a checkpoint with these shapes, everything a shape can tell taken from it."""
    unet = unet_config_from_shapes(shapes, family, path)
    if family == "sd1":
        return sd15_config_dir(unet, clip_text_config_from_shapes(shapes, SD1_TEXT, "hf", "clip_l"))
    return sdxl_config_dir(unet, clip_text_config_from_shapes(shapes, SDXL_TEXT_L, "hf", "clip_l"),
                           clip_text_config_from_shapes(shapes, SDXL_TEXT_G, "open_clip", "bigg"),
                           sdxl_prediction_from_keys(shapes))


def sdxl_prediction_from_keys(shapes: Shapes) -> dict:
    """Scheduler fields an SDXL-family file declares by marker tensors, read as ComfyUI reads them: ``v_pred``
    (v-prediction, e.g. NoobAI-XL V-Pred), with ``ztsnr`` (betas rescaled to zero terminal SNR). (The EDM
    variants are refused by :func:`checkpoint_family`.)"""
    if "v_pred" not in shapes:
        return {}
    return {"prediction_type": "v_prediction", **({"rescale_betas_zero_snr": True} if "ztsnr" in shapes else {})}


# --------------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------------


def load_single_file(path: str | os.PathLike) -> BaseModel:
    """A single-file SD1.x or SDXL-family checkpoint (what ComfyUI users have), family and configs from its own
    tensor names and shapes, loaded through diffusers' single-file loader offline. SDXL gives a
    :class:`BaseModel` with ``text_encoder_2``/``tokenizer_2`` set. The noise scheduler is DDPM with the
    family's betas (what training samples noise with); a v-prediction SDXL file (``v_pred`` marker) gives
    ``prediction_type="v_prediction"`` (and zero terminal SNR with ``ztsnr``) in its config."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    shapes = read_checkpoint_shapes(path)
    family = checkpoint_family(shapes, path)
    config = config_dir_for(shapes, family, path)
    pipeline_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = pipeline_cls.from_single_file(str(path), config=str(config), local_files_only=True, **extra)
    except Exception as exc:  # diffusers raises several kinds for a file it cannot convert
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadModelFileError(f"{path} was detected as an {FAMILY_NAMES[family]} checkpoint "
                                f"but diffusers could not load it ({type(exc).__name__}: {detail}); is the file "
                                f"complete? {SUPPORTED}") from None
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if family == "sdxl":
        return BaseModel(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler, str(path),
                         text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)
    return BaseModel(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler, str(path))
