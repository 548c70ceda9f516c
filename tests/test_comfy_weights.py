"""LongSD LoRA and T5-branch nodes against a real ComfyUI (in-process). Skips unless COMFYUI_PATH is set."""

import logging
import shutil
import sys

import pytest
import torch

from comfy_support import host_clip, import_comfy, load_pack, requires_comfy
from longalign_core.lora import diffusers_config_from_ldm, lora_targets

pytestmark = requires_comfy

SD15_LDM = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                use_linear_in_transformer=False, context_dim=768, num_heads=8,
                transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_attention=False,
                use_temporal_resblock=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory, standin_checkpoints):
    pack = load_pack()
    import folder_paths

    root = tmp_path_factory.mktemp("models")
    for name in ("loras", "text_encoders", "longalign"):
        (root / name).mkdir()
        folder_paths.folder_names_and_paths[name] = ([str(root / name)], {".pt", ".safetensors", ".bin"})
    ckpt = standin_checkpoints.place("sd15", root / "tiny_sd15.safetensors")
    comfy = import_comfy()
    model = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False, output_clip=False)[0]
    return sys.modules[pack.__name__ + ".nodes.weights_nodes"], root, model


def random_pairs(targets, seed, rank=4):
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for t in targets:
        up_shape = (t.weight_shape[0], rank) + ((1, 1) if t.kind == "conv" else ())
        down_shape = (rank,) + tuple(t.weight_shape[1:])
        pairs[t.path] = (torch.randn(up_shape, generator=g) * 0.05, torch.randn(down_shape, generator=g) * 0.05)
    return pairs


def test_every_sd15_lora_key_is_in_comfyui_key_map():
    comfy = import_comfy()
    import comfy.lora
    import comfy.supported_models

    with torch.device("meta"):
        model = comfy.supported_models.SD15(dict(SD15_LDM)).get_model({})
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    targets = lora_targets(diffusers_config_from_ldm(model.model_config.unet_config))
    assert len(targets) == 224
    assert [t.path for t in targets if t.kohya_name not in key_map] == []


def test_longsd_pt_applies_as_patches_equal_to_w_plus_up_down(env, caplog):
    mod, root, model = env
    import comfy.model_management
    import comfy.utils

    unet_config = dict(model.model.model_config.unet_config)
    targets = lora_targets(diffusers_config_from_ldm(unet_config))
    a, b = random_pairs(targets, 1), random_pairs(targets, 2)
    torch.save([t.half() for p in a.values() for t in p], root / "loras" / "stage1.pt")  # the LongSD list format
    from longalign_core.lora import save_kohya

    save_kohya(b, root / "loras" / "reward.safetensors")
    d2c = comfy.utils.unet_to_diffusers(unet_config)
    keys = {t.path: "diffusion_model." + d2c[t.path + ".weight"] for t in targets}
    base = {p: model.model.state_dict()[k].clone() for p, k in keys.items()}
    with caplog.at_level(logging.WARNING):
        m1, = mod.LongAlignLoadLongSDLoRA.execute(model, "stage1.pt", 1.0).args
        m2, = mod.LongAlignLoadLongSDLoRA.execute(m1, "reward.safetensors", 0.5).args
    assert "not loaded" not in caplog.text.lower()
    assert model.patches == {}  # the input model is unchanged
    comfy.model_management.load_models_gpu([m2], force_full_load=True)
    sd = m2.model.state_dict()
    for t in targets:
        delta = sum(s * (up.half().float().flatten(1) @ down.half().float().flatten(1)).reshape(t.weight_shape)
                    for s, (up, down) in ((1.0, a[t.path]), (0.5, b[t.path])))
        torch.testing.assert_close(sd[keys[t.path]].float(), base[t.path].float() + delta, atol=2e-3, rtol=1e-3)
    comfy.model_management.unload_all_models()


def test_lora_for_another_model_is_refused(env, tmp_path):
    mod, root, model = env
    torch.save([torch.zeros(3, 4), torch.zeros(4, 3)], root / "loras" / "other.pt")
    with pytest.raises(ValueError, match="LoRA targets"):  # the pack's LoraFormatError
        mod.LongAlignLoadLongSDLoRA.execute(model, "other.pt", 1.0)


def test_lora_node_checks_matches_before_building_the_patched_model(env, monkeypatch):
    """A model whose LoRA key map lacks one LongSD layer: refused with the count, and no patched model built."""
    mod, root, model = env
    import comfy.lora
    import comfy.sd

    targets = lora_targets(diffusers_config_from_ldm(dict(model.model.model_config.unet_config)))
    torch.save([t for p in random_pairs(targets, 3).values() for t in p], root / "loras" / "check.pt")
    full_map = comfy.lora.model_lora_keys_unet
    monkeypatch.setattr(comfy.lora, "model_lora_keys_unet",
                        lambda m, km=None: {k: v for k, v in full_map(m, {} if km is None else km).items()
                                            if k != targets[5].kohya_name})
    built = []
    monkeypatch.setattr(comfy.sd, "load_lora_for_models", lambda *a, **kw: built.append(a) or (None, None))
    with pytest.raises(ValueError, match=f"only {len(targets) - 1} of {len(targets)} LoRA layers"):
        mod.LongAlignLoadLongSDLoRA.execute(model, "check.pt", 1.0)
    assert built == []


def test_t5_branch_appends_to_text_encode(env, tiny_t5_dir):
    mod, root, _ = env
    from longalign_core.t5_branch import TextAdapter, load_t5_branch

    shutil.copytree(tiny_t5_dir, root / "text_encoders" / "t5-tiny")
    torch.manual_seed(6)
    TextAdapter(in_dim=32, int_dim=24, out_dim=768).save_pretrained(root / "longalign" / "adapter-tiny")
    schema = mod.LongAlignLoadT5Adapter.GET_SCHEMA()
    assert schema.inputs[0].options == ["t5-tiny"] and schema.inputs[1].options == ["adapter-tiny"]
    branch, = mod.LongAlignLoadT5Adapter.execute("t5-tiny", "adapter-tiny", "none").args
    text_encode = sys.modules[load_pack().__name__ + ".nodes.text_encode"].LongAlignTextEncode
    clip = host_clip("l")
    prompt = "a red fox sits on a mossy rock. behind it a waterfall drops into a pool."
    (cond, _), = text_encode.execute(clip, prompt, 240, "extend", "sentence", "split", longalign_t5=branch).args[0]
    plain = text_encode.execute(clip, prompt, 240, "extend", "sentence", "split").args[0][0][0]
    expected_t5 = load_t5_branch(root / "text_encoders" / "t5-tiny", root / "longalign" / "adapter-tiny").encode(prompt)
    assert cond.shape == (1, 480, 768)
    torch.testing.assert_close(cond[:, :240], plain)
    torch.testing.assert_close(cond[:, 240:], expected_t5, atol=1e-5, rtol=1e-5)
    # loaded through ComfyUI's memory manager: a ModelPatcher ComfyUI lists among its loaded models
    import comfy.model_management
    import comfy.model_patcher

    assert isinstance(branch.patcher, comfy.model_patcher.ModelPatcher)
    assert any(m.model is branch.patcher for m in comfy.model_management.current_loaded_models)
    assert next(branch.branch.encoder.parameters()).dtype == torch.float32  # auto on the CPU
    # precision option: bf16 weights and compute, close to fp32
    bf16, = mod.LongAlignLoadT5Adapter.execute("t5-tiny", "adapter-tiny", "none", "bf16").args
    assert next(bf16.branch.encoder.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(bf16.encode(prompt).float(), expected_t5, atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match="precision 'fp8'"):
        mod.LongAlignLoadT5Adapter.execute("t5-tiny", "adapter-tiny", "none", "fp8")
