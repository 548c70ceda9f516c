"""LongAlign LoRAs on SDXL UNets: the module order from ComfyUI's SDXL config equals diffusers' own SDXL UNet, every
kohya key resolves in ComfyUI's SDXL key map, and the patches are W + up@down through the stock loader and
Load LongSD LoRA. The ComfyUI parts skip unless COMFYUI_PATH is set."""

from __future__ import annotations

import logging
import math
import sys

import pytest
import torch

from comfy_support import import_comfy, load_pack, requires_comfy
from longalign_core.lora import diffusers_config_from_ldm, lora_targets, save_kohya

#: SDXL base as ComfyUI's detection describes it (LDM names).
SDXL_LDM = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320,
                num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4],
                transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
                num_heads=-1, transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                use_temporal_attention=False, use_temporal_resblock=False)

#: stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that shape the model).
SDXL_DIFFUSERS = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "in_channels": 4,
    "layers_per_block": 2, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_num_groups": 32, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}

TINY_SDXL_LDM = dict(SDXL_LDM, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
                     transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1], transformer_depth_middle=1,
                     num_head_channels=16)


def test_sdxl_module_order_from_comfy_config_equals_diffusers_sdxl_unet():
    ours = lora_targets(diffusers_config_from_ldm(SDXL_LDM))
    theirs = lora_targets(SDXL_DIFFUSERS)
    assert ours == theirs
    for layer in ("attn2.to_k", "attn1.to_out.0", "ff.net.0.proj", "resnets.0.time_emb_proj", "conv_shortcut"):
        assert any(t.path.endswith(layer) for t in ours), layer
    # 70 transformer blocks (2·2 + 2·10 down, 3·2 + 3·10 up, 10 mid) × (4 + 4 attention projections + GEGLU)
    assert sum(1 for t in ours if ".transformer_blocks." in t.path) == 70 * 9


def test_other_extra_conditioning_is_refused():
    with pytest.raises(ValueError, match="1024 channels"):
        diffusers_config_from_ldm(dict(SDXL_LDM, adm_in_channels=1024))


def _tiny_sdxl_patcher(seed=0, ldm=TINY_SDXL_LDM):
    """A ComfyUI SDXL model of the LDM config ``ldm`` with random weights, in a ModelPatcher on the CPU."""
    comfy = import_comfy()
    import comfy.model_patcher
    import comfy.supported_models

    model = comfy.supported_models.SDXL(dict(ldm)).get_model({})
    g = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(v.shape, generator=g) / math.sqrt(max(1, math.prod(v.shape[1:])))) if v.ndim > 1
             else torch.zeros(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


@requires_comfy
def test_every_sdxl_kohya_key_is_in_comfyui_sdxl_key_map():
    import_comfy()
    import comfy.lora
    import comfy.supported_models

    with torch.device("meta"):
        model = comfy.supported_models.SDXL(dict(SDXL_LDM)).get_model({})
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    targets = lora_targets(diffusers_config_from_ldm(model.model_config.unet_config))
    assert targets == lora_targets(SDXL_DIFFUSERS)
    assert [t.kohya_name for t in targets if t.kohya_name not in key_map] == []



#: A distilled-SDXL-like layout (SSD-1B style): output transformer depths that differ from the input ones and
#: within a level (deepest up level 3 then 1 blocks; ComfyUI reads transformer_depth_output from the end).
ASYMMETRIC_LDM = dict(TINY_SDXL_LDM, transformer_depth=[0, 2], transformer_depth_output=[0, 0, 1, 3],
                      transformer_depth_middle=2)


@requires_comfy
def test_asymmetric_sdxl_layout_targets_every_layer_comfyui_has():
    """Up blocks deeper or shallower than the down blocks: the LoRA layers derived from ComfyUI's config (what the
    Load LongSD LoRA node does) are exactly the Linear/Conv layers of ComfyUI's own model in LongAlign's target
    modules, each in its key map."""
    import_comfy()
    import comfy.lora
    import comfy.supported_models
    import comfy.utils

    with torch.device("meta"):
        model = comfy.supported_models.SDXL(dict(ASYMMETRIC_LDM)).get_model({})
    unet_config = dict(model.model_config.unet_config)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    targets = lora_targets(diffusers_config_from_ldm(unet_config))
    assert [t.kohya_name for t in targets if t.kohya_name not in key_map] == []
    # every attention projection and GEGLU input projection ComfyUI's UNet has is targeted, no more, no fewer
    # (the feed-forward's output Linear, ff.net.2, sits outside the GEGLU module and is not a LongAlign target)
    d2c = comfy.utils.unet_to_diffusers(unet_config)
    comfy_attn = {k for k in model.state_dict() if ".transformer_blocks." in k and k.endswith(".weight")
                  and (".attn1." in k or ".attn2." in k or ".ff.net.0.proj." in k) and "norm" not in k}
    ours = {"diffusion_model." + d2c[t.path + ".weight"] for t in targets if ".transformer_blocks." in t.path}
    assert ours == comfy_attn
    # the deepest up level really has 3 then 1 transformer blocks
    assert sum(1 for t in targets if t.path.startswith("up_blocks.0.attentions.0.") and t.path.endswith("attn1.to_q")) == 3
    assert sum(1 for t in targets if t.path.startswith("up_blocks.0.attentions.1.") and t.path.endswith("attn1.to_q")) == 1


def _random_pairs(targets, seed, rank=4):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in targets:
        up_shape = (t.weight_shape[0], rank) + ((1, 1) if t.kind == "conv" else ())
        out[t.path] = (torch.randn(up_shape, generator=g) * 0.05,
                       torch.randn((rank,) + tuple(t.weight_shape[1:]), generator=g) * 0.05)
    return out


@requires_comfy
def test_sdxl_lora_patches_equal_w_plus_up_down_in_stock_loader_and_node(tmp_path, caplog):
    comfy = import_comfy()
    import comfy.model_management
    import comfy.utils
    import folder_paths

    pack = load_pack()
    node = sys.modules[pack.__name__ + ".nodes.weights_nodes"].LongAlignLoadLongSDLoRA
    patcher = _tiny_sdxl_patcher()
    unet_config = dict(patcher.model.model_config.unet_config)
    targets = lora_targets(diffusers_config_from_ldm(unet_config))
    pairs = _random_pairs(targets, 3)
    (tmp_path / "loras").mkdir()
    path = save_kohya(pairs, tmp_path / "loras" / "xl_longalign.safetensors")
    folder_paths.folder_names_and_paths["loras"] = ([str(tmp_path / "loras")], {".safetensors", ".pt"})

    d2c = comfy.utils.unet_to_diffusers(unet_config)
    keys = {t.path: "diffusion_model." + d2c[t.path + ".weight"] for t in targets}
    base = {p: patcher.model.state_dict()[k].clone() for p, k in keys.items()}
    expected = {t.path: base[t.path] + 0.5 * (pairs[t.path][0].half().float().flatten(1)
                                             @ pairs[t.path][1].half().float().flatten(1)).reshape(t.weight_shape)
                for t in targets}

    from safetensors.torch import load_file

    with caplog.at_level(logging.WARNING):
        stock, _ = comfy.sd.load_lora_for_models(patcher, None, load_file(str(path)), 0.5, 0.0)
        ours, = node.execute(patcher, "xl_longalign.safetensors", 0.5).args
    assert "not loaded" not in caplog.text.lower()
    for patched in (stock, ours):
        comfy.model_management.load_models_gpu([patched], force_full_load=True)
        sd = patched.model.state_dict()
        for t in targets:
            torch.testing.assert_close(sd[keys[t.path]].float(), expected[t.path], atol=2e-3, rtol=1e-3)
        comfy.model_management.unload_all_models()


@requires_comfy
def test_trained_sdxl_lora_loads_in_stock_lora_loader_with_no_unloaded_key(tmp_path, caplog):
    """``python -m trainer.finetune --model embedded-sdxl`` writes a LoRA that ComfyUI's stock LoRA loader applies
    to an SDXL model of the same UNet shape: every key is loaded and each weight becomes W + up@down."""
    from safetensors.torch import load_file

    from trainer_support import run_module

    out = tmp_path / "run"
    proc = run_module(["--model", "embedded-sdxl", "--output-dir", str(out), "--train-steps", "1",
                       "--resolution", "32", "--sample-steps", "2", "--sample-grad-steps", "1",
                       "--validation-prompts", "0", "--train-batch-size", "1"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    lora = load_file(str(out / "longalign_lora.safetensors"))

    import_comfy()
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    from diffusers import UNet2DConditionModel

    from trainer.loading.embedded import embedded_sdxl_pipeline_dir

    # the embedded SDXL UNet in ComfyUI's terms: the same levels, depths and widths, context 32 + 32
    ldm = dict(TINY_SDXL_LDM, context_dim=64)
    theirs = UNet2DConditionModel.load_config(embedded_sdxl_pipeline_dir(), subfolder="unet")
    ours = diffusers_config_from_ldm(ldm)
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "cross_attention_dim", "projection_class_embeddings_input_dim", "addition_time_embed_dim"):
        norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
        assert norm(ours[key]) == norm(theirs[key]), key
    patcher = _tiny_sdxl_patcher(seed=1, ldm=ldm)
    model = patcher.model
    targets = lora_targets(diffusers_config_from_ldm(ldm))
    assert len(lora) == 3 * len(targets)
    d2c = comfy.utils.unet_to_diffusers(dict(model.model_config.unet_config))
    keys = {t.path: "diffusion_model." + d2c[t.path + ".weight"] for t in targets}
    base = {p: model.state_dict()[k].clone().float() for p, k in keys.items()}
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    assert "not loaded" not in caplog.text.lower(), caplog.text[:2000]
    comfy.model_management.load_models_gpu([patched], force_full_load=True)
    sd = patched.model.state_dict()
    for t in targets:
        name = t.kohya_name
        up, down = lora[name + ".lora_up.weight"].float(), lora[name + ".lora_down.weight"].float()
        scale = float(lora[name + ".alpha"]) / down.shape[0]
        expected = base[t.path] + scale * (up.flatten(1) @ down.flatten(1)).reshape(t.weight_shape)
        torch.testing.assert_close(sd[keys[t.path]].float(), expected, atol=2e-3, rtol=1e-3, msg=t.path)
    comfy.model_management.unload_all_models()
