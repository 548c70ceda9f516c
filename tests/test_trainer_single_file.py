"""The trainer's single-file SD1.5 loader, offline, on an LDM-layout checkpoint (built with ComfyUI's shapes, so
this runs only with COMFYUI_PATH)."""

import torch
from safetensors.torch import load_file

from comfy_support import build_tiny_sd15_checkpoint, requires_comfy

pytestmark = requires_comfy


def test_single_file_checkpoint_loads_offline(tmp_path, monkeypatch):
    from longalign_core.lora import diffusers_config_from_ldm
    from trainer.models import _load_single_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = build_tiny_sd15_checkpoint(tmp_path / "tiny_sd15.safetensors")
    unet_cfg = diffusers_config_from_ldm(dict(model_channels=320, channel_mult=[1], num_res_blocks=[1],
                                              transformer_depth=[1], context_dim=768, num_heads=8,
                                              num_head_channels=-1, transformer_depth_middle=1))
    base = _load_single_file(str(path), unet_cfg)
    sd = load_file(str(path))
    unet_w = sd["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"].float()
    torch.testing.assert_close(base.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.float(),
                               unet_w)
    text_w = sd["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"].float()
    text_model = getattr(base.text_encoder, "text_model", base.text_encoder)
    torch.testing.assert_close(text_model.encoder.layers[0].mlp.fc1.weight.float(), text_w)
    assert base.vae.config.scaling_factor == 0.18215
