"""The layout of single-file SD1.x / SDXL checkpoints, and the diffusers configs a checkpoint's own tensor shapes
imply: what diffusers' single-file loader needs to build the pipeline offline. What weights cannot tell
(attention heads, group-norm groups, activations, the VAE's scaling factor) comes from the family's published
configs."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Literal

from longalign_core.checkpoint_family import (  # noqa: F401
    FAMILY_NAMES,
    SD1_TEXT,
    SDXL_ADM_IN,
    SDXL_REFINER_ADM_IN,
    SDXL_TEXT_G,
    SDXL_TEXT_L,
    SUPPORTED,
    UNET,
    VAE,
    Family,
    Shapes,
)
from longalign_core.errors import BadModelFileError
from longalign_core.io_utils import publish_dir

from .embedded import cache_root

#: SDXL attention: 64 channels per head. SD1.x: 8 heads everywhere (diffusers calls heads "attention_head_dim").
SDXL_HEAD_CHANNELS = 64
SD1_HEADS = 8
#: CLIP text encoders (CLIP-L, OpenCLIP-bigG): 64 channels per head.
CLIP_HEAD_CHANNELS = 64


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
    root = cache_root() / f"{name}-configs-{hashlib.sha256(content.encode()).hexdigest()[:12]}"
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
