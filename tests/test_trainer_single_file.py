"""The trainer's single-file SD1.5 loader, offline, on an LDM-layout checkpoint written here without ComfyUI:
random diffusers/transformers models renamed to the original Stable Diffusion keys by the mapping tables of the
original-SD layout (diffusers' ``convert_diffusers_to_original_stable_diffusion.py`` tables, written out)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from trainer_support import one_thread  # noqa: F401  (autouse fixture)

NRB = 1  # res blocks per level of the shrunken UNet (one level, model_channels 320: what SD1.5 detection needs)


def unet_to_ldm(key: str) -> str:
    """diffusers UNet key -> ``model.diffusion_model.*`` for a one-level UNet with NRB res blocks."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
              ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
    out = key
    for hf, sd in fixed.items():
        if key.startswith(hf + "."):
            out = sd + key[len(hf):]
    parts = key.split(".")
    if parts[0] == "down_blocks":  # level 0 only: input_blocks.{j+1}.{0 resnet | 1 attention}
        j = int(parts[3])
        out = f"input_blocks.{j + 1}.{0 if parts[2] == 'resnets' else 1}." + ".".join(parts[4:])
    elif parts[0] == "up_blocks":  # output_blocks.{j}.{0 resnet | 1 attention}
        j = int(parts[3])
        out = f"output_blocks.{j}.{0 if parts[2] == 'resnets' else 1}." + ".".join(parts[4:])
    elif parts[0] == "mid_block":
        sub = "1" if parts[1] == "attentions" else str(2 * int(parts[2]))
        out = f"middle_block.{sub}." + ".".join(parts[3:])
    if parts[0] in ("down_blocks", "up_blocks") and parts[2] == "resnets" or parts[0] == "mid_block" \
            and parts[1] == "resnets":
        for hf, sd in resnet:
            out = out.replace(f".{hf}.", f".{sd}.")
    return "model.diffusion_model." + out


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


def test_single_file_checkpoint_loads_offline(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from longalign_core.lora import diffusers_config_from_ldm
    from trainer.single_file import load_single_file, sd15_config_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    unet_cfg = diffusers_config_from_ldm(dict(model_channels=320, channel_mult=[1], num_res_blocks=[NRB],
                                              transformer_depth=[1], context_dim=768, num_heads=8,
                                              num_head_channels=-1, transformer_depth_middle=1))
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(unet_cfg)
    configs = sd15_config_dir(unet_cfg)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))
    sd = {unet_to_ldm(k): v.half() for k, v in unet.state_dict().items()}
    for k, v in vae.state_dict().items():
        name, value = vae_to_ldm(k, v)
        sd[name] = value.half()
    for k, v in text.state_dict().items():
        if "position_ids" not in k:
            sd["cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v.half()
    path = tmp_path / "tiny_sd15.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))

    base = load_single_file(str(path), unet_cfg)
    sd = load_file(str(path))
    loaded_unet = base.unet.state_dict()
    for k, v in unet.state_dict().items():  # every UNet weight arrived where diffusers keeps it
        torch.testing.assert_close(loaded_unet[k].float(), v.half().float(), msg=k)
    torch.testing.assert_close(base.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.float(),
                               sd["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"].float())
    loaded_vae = base.vae.state_dict()
    for k, v in vae.state_dict().items():
        torch.testing.assert_close(loaded_vae[k].float().reshape(v.shape), v.half().float(), msg=k)
    text_w = sd["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"].float()
    text_model = getattr(base.text_encoder, "text_model", base.text_encoder)
    torch.testing.assert_close(text_model.encoder.layers[0].mlp.fc1.weight.float(), text_w)
    assert base.vae.config.scaling_factor == 0.18215
