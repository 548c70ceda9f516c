"""Random diffusers / transformers models renamed to the original Stable Diffusion / SDXL single-file layouts, by
the mapping tables of those layouts written out here (diffusers' ``convert_diffusers_to_original_stable_diffusion.py``
and ``convert_diffusers_to_original_sdxl.py`` tables; OpenCLIP-bigG in open_clip's own layout). The trainer's
single-file loader tests and ``bench/load.py`` build their checkpoints with them."""

from __future__ import annotations

import torch


def unet_to_ldm(key: str, layers_per_block: int, up_attention: list[bool]) -> str:
    """diffusers UNet key -> ``model.diffusion_model.*``: res blocks and attentions of level i, layer j at
    input_blocks[(n+1)·i + j + 1], output_blocks[(n+1)·i + j]; the downsampler of level i at
    input_blocks[(n+1)·(i+1)].0.op; the upsampler of up block i after its last layer (index 1, or 2 behind an
    attention); ``up_attention[i]``: whether up block i has attentions."""
    n = layers_per_block
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
              ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
    out = key
    for hf, sd in fixed.items():
        if key.startswith(hf + "."):
            out = sd + key[len(hf):]
    parts = key.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        i, kind, rest = int(parts[1]), parts[2], ".".join(parts[4:])
        if kind == "downsamplers":
            out = f"input_blocks.{(n + 1) * (i + 1)}.0.op.{rest.removeprefix('conv.')}"
        elif kind == "upsamplers":
            out = f"output_blocks.{(n + 1) * i + n}.{2 if up_attention[i] else 1}.{rest}"
        else:
            j, sub = int(parts[3]), 0 if kind == "resnets" else 1
            block = (n + 1) * i + j + 1 if parts[0] == "down_blocks" else (n + 1) * i + j
            out = f"{'input' if parts[0] == 'down_blocks' else 'output'}_blocks.{block}.{sub}.{rest}"
    elif parts[0] == "mid_block":
        sub = "1" if parts[1] == "attentions" else str(2 * int(parts[2]))
        out = f"middle_block.{sub}." + ".".join(parts[3:])
    if "resnets" in parts:
        for hf, sd in resnet:
            out = out.replace(f".{hf}.", f".{sd}.")
    return "model.diffusion_model." + out


def unet_ldm_shapes(config: dict) -> dict:
    """LDM key -> shape of a diffusers UNet of ``config``, built on the meta device (nothing allocated)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    up_attention = [t.startswith("CrossAttn") for t in unet.config.up_block_types]
    return {unet_to_ldm(k, unet.config.layers_per_block, up_attention): tuple(v.shape)
            for k, v in unet.state_dict().items()}


def vae_to_ldm(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """diffusers AutoencoderKL key -> ``first_stage_model.*`` (attention projections become 1x1 convs)."""
    out = key
    for i in range(4):
        for j in range(3):
            out = out.replace(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.")
            out = out.replace(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{3 - i}.block.{j}.")
        out = out.replace(f"down_blocks.{i}.downsamplers.0.", f"down.{i}.downsample.")
        out = out.replace(f"up_blocks.{i}.upsamplers.0.", f"up.{3 - i}.upsample.")
    for i in range(2):
        out = out.replace(f"mid_block.resnets.{i}.", f"mid.block_{i + 1}.")
    out = out.replace("mid_block.attentions.0.", "mid.attn_1.").replace("conv_shortcut", "nin_shortcut")
    out = out.replace("conv_norm_out", "norm_out")
    if ".attn_1." in out:
        for hf, sd in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                       ("to_out.0.", "proj_out.")):
            out = out.replace(".attn_1." + hf, ".attn_1." + sd)
        if out.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
    return "first_stage_model." + out, value


def clip_hf_layout(model, prefix: str) -> dict:
    """A transformers CLIP text encoder's weights under ``prefix`` in Hugging Face layout (``text_model.*``)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in model.state_dict().items() if "position_ids" not in k and not k.startswith("text_projection")}


def clip_open_clip_layout(model, prefix: str) -> dict:
    """A transformers ``CLIPTextModelWithProjection`` in open_clip's layout, as SDXL checkpoints store bigG:
    q, k, v stacked into ``attn.in_proj_*``, the projection stored transposed (``x @ text_projection``)."""
    sd = {k.removeprefix("text_model."): v for k, v in model.state_dict().items() if "position_ids" not in k}
    out = {"token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": sd.pop("final_layer_norm.weight"), "ln_final.bias": sd.pop("final_layer_norm.bias"),
           "text_projection": sd.pop("text_projection.weight").T}
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")}
    names = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for n in layers:
        src, dst = f"encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for p in ("weight", "bias"):
            out[dst + f"attn.in_proj_{p}"] = torch.cat([sd.pop(src + f"self_attn.{x}_proj.{p}") for x in "qkv"])
            for hf, oc in names.items():
                out[dst + f"{oc}.{p}"] = sd.pop(src + f"{hf}.{p}")
    assert not sd, f"unmapped bigG weights: {sorted(sd)}"
    return {prefix + k: v for k, v in out.items()}


#: The SD VAE as published (SD1.x and SDXL share it).
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                  layers_per_block=2, norm_num_groups=32)
