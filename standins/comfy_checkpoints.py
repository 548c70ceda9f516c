"""Single-file checkpoints ComfyUI detects as SD1.5 and SDXL, with random weights: the key layouts of the published
files, shapes read from ComfyUI's own modules on the meta device (the checkout at ``COMFYUI_PATH``), UNets shrunk
where detection does not look. Used by the ComfyUI tests (through ``tests/comfy_support.py``) and
``bench/train_node.py``."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch

from standins.comfy_host import CLIP_SHAPES, import_comfy, random_clip_text_state_dict


def ldm_unet_vae_shapes(unet_cfg: dict) -> dict[str, torch.Size]:
    """Single-file (LDM) key → shape for a UNet of ``unet_cfg`` and the full-size SD VAE, from ComfyUI's own
    modules on the meta device (nothing is allocated)."""
    import_comfy()
    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    shapes = {}
    with torch.device("meta"):
        unet = UNetModel(**unet_cfg, dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init)
        shapes.update({"model.diffusion_model." + k: v.shape for k, v in unet.state_dict().items()})
        vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
        shapes.update({"first_stage_model." + k: v.shape for k, v in vae.state_dict().items()})
    return shapes


def build_tiny_sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random-weight single-file checkpoint ComfyUI detects as SD1.5: LDM key layout, UNet shrunk to one
    level (model_channels 320 and context 768 are what detection needs), full-size CLIP-L and VAE (ComfyUI
    fixes their configs). Shapes come from ComfyUI's own modules on the meta device."""
    from safetensors.torch import save_file

    unet_cfg = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
                    channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
                    transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False,
                    use_spatial_transformer=True, legacy=False, adm_in_channels=None,
                    use_temporal_attention=False, num_heads=8, num_head_channels=-1, use_checkpoint=False)
    shapes = ldm_unet_vae_shapes(unet_cfg)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if len(shape) <= 1:
            value = torch.zeros(shape) if key.endswith("bias") else torch.ones(shape)
        else:
            value = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        sd[key] = value.half()
    for key, value in random_clip_text_state_dict("l", seed).items():
        sd["cond_stage_model.transformer." + key] = value.half()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"note": "random weights, LongAlign tests only"})
    return path


def _random(shape, key: str, gen_: torch.Generator) -> torch.Tensor:
    """fp16 random weights: LayerNorm-like 1-D ones/zeros, embeddings N(0, 0.3), matrices N(0, 1/fan_in)."""
    if len(shape) <= 1:
        fill = torch.zeros if key.endswith("bias") else torch.ones
        return fill(shape, dtype=torch.float16)
    std = 0.3 if "embedding" in key else 1 / math.sqrt(math.prod(shape[1:]))
    return torch.empty(shape, dtype=torch.float16).normal_(0, std, generator=gen_)


def _text_encoder_shapes(kind: str, with_projection: bool) -> dict[str, torch.Size]:
    """Key -> shape of a full-size CLIP text encoder in Hugging Face layout (built on the meta device)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407, **CLIP_SHAPES[kind])
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(cfg)
    shapes = {}
    for key, tensor in model.state_dict().items():
        if "position_ids" in key or (key.startswith("text_projection") and not with_projection):
            continue
        if not key.startswith(("text_model.", "text_projection")):
            key = "text_model." + key
        shapes[key] = tensor.shape
    return shapes


def _open_clip_text_shapes(width: int, layers: int, mlp: int, output_dim: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an OpenCLIP text tower in open_clip's own layout (``open_clip.transformer.TextTransformer``:
    q, k, v stacked in ``attn.in_proj_*``, ``text_projection`` as width x output_dim), as SDXL files store bigG."""
    shapes = {"token_embedding.weight": (49408, width), "positional_embedding": (77, width),
              "ln_final.weight": (width,), "ln_final.bias": (width,), "text_projection": (width, output_dim)}
    for n in range(layers):
        block = f"transformer.resblocks.{n}."
        shapes.update({block + "attn.in_proj_weight": (3 * width, width), block + "attn.in_proj_bias": (3 * width,),
                       block + "attn.out_proj.weight": (width, width), block + "attn.out_proj.bias": (width,),
                       block + "mlp.c_fc.weight": (mlp, width), block + "mlp.c_fc.bias": (mlp,),
                       block + "mlp.c_proj.weight": (width, mlp), block + "mlp.c_proj.bias": (width,)})
        shapes.update({block + f"{ln}.{p}": (width,) for ln in ("ln_1", "ln_2") for p in ("weight", "bias")})
    return shapes


#: The SDXL stand-in's UNet (LDM names, as ComfyUI's detection reports them). Detection matches model_channels
#: 320, linear transformers, transformer_depth [0, 0, 2, 2, 10, 10], context 2048 and adm 2816; the UNet is shrunk
#: where it does not look: every level at 320 channels (channel_mult [1, 1, 1]) and one block in the output
#: transformers (up blocks deeper-first: none, 1, 1 — diffusers' reverse_transformer_layers_per_block, which the
#: trainer's single-file loader infers). The middle keeps the last level's 10 blocks: diffusers builds the middle
#: with that depth, and the trainer loads this very file through diffusers.
SDXL_STANDIN_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
                         channel_mult=[1, 1, 1], transformer_depth=[0, 0, 2, 2, 10, 10],
                         transformer_depth_output=[1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=10,
                         context_dim=2048, use_linear_in_transformer=True, use_spatial_transformer=True,
                         legacy=False, num_classes="sequential", adm_in_channels=2816, num_head_channels=64,
                         num_heads=-1, use_temporal_attention=False, use_checkpoint=False)


def build_tiny_sdxl_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random-weight single-file checkpoint in the layout of the published SDXL files, which ComfyUI detects as
    SDXL: UNet ``SDXL_STANDIN_UNET``, full-size CLIP-L + OpenCLIP-bigG text encoders and VAE (ComfyUI fixes their
    configs). ~2.2 GB fp16."""
    from safetensors.torch import save_file

    shapes = ldm_unet_vae_shapes(SDXL_STANDIN_UNET)
    # SDXL checkpoint layout: CLIP-L in Hugging Face layout under embedders.0.transformer, bigG in open_clip
    # layout under embedders.1.model (ComfyUI's SDXL.process_clip_state_dict converts it to "clip_g.")
    shapes.update({"conditioner.embedders.0.transformer." + k: s
                   for k, s in _text_encoder_shapes("l", with_projection=False).items()})
    g = CLIP_SHAPES["g"]
    shapes.update({"conditioner.embedders.1.model." + k: s
                   for k, s in _open_clip_text_shapes(g["hidden_size"], g["num_hidden_layers"],
                                                      g["intermediate_size"], g["projection_dim"]).items()})
    gen_ = torch.Generator().manual_seed(seed)
    sd = {key: _random(shape, key, gen_) for key, shape in shapes.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"note": "random weights, LongAlign tests only"})
    return path


class StandinCheckpoints:
    """The SD1.5- and SDXL-shaped single-file stand-ins (0.44 GB and 2.2 GB), each written once per test session
    into ``folder`` and hard-linked wherever a test puts one (a model folder, a test's own directory): a copy per
    user would fill a CI machine's disk. Tests only read them."""

    builders = {"sd15": build_tiny_sd15_checkpoint, "sdxl": build_tiny_sdxl_checkpoint}

    def __init__(self, folder: Path):
        self.folder = folder
        self._built: dict[str, Path] = {}

    def path(self, family: str) -> Path:
        if family not in self._built:
            self._built[family] = self.builders[family](self.folder / f"{family}_standin.safetensors")
        return self._built[family]

    def place(self, family: str, dst: Path) -> Path:
        """``dst`` as a hard link to the ``family`` stand-in (a copy where the file system has no links)."""
        src = self.path(family)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
        return dst
