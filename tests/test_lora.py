"""LongSD LoRA reader, kohya conversion and merging, on tiny diffusers UNets and the SD1.5 layout."""

import csv
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longalign_core.lora import (
    LoraFormatError,
    diffusers_config_from_ldm,
    from_kohya,
    load_lora,
    lora_targets,
    main,
    merge_lora,
    read_longsd_lora,
    save_kohya,
)

TSV = Path(__file__).with_name("data") / "longsd_lora_order_sd15.tsv"
TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=24, attention_head_dim=4,
                 norm_num_groups=8)


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    """A tiny diffusers UNet saved with save_pretrained and loaded back."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_unet")
    UNet2DConditionModel(**TINY_UNET).save_pretrained(path)
    return path


def load_unet(path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(path).eval()


def reference_style_lora(unet, rank=4, seed=1):
    """A LoRA list exactly as the reference trainer saves it: [up_0, down_0, …] fp16, in its module order."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    g = torch.Generator().manual_seed(seed)
    tensors, layers = [], []
    for module in unet.modules():
        if isinstance(module, (ResnetBlock2D, Attention, GEGLU)):
            for _, layer in module.named_modules():
                if isinstance(layer, torch.nn.Linear):
                    tensors += [torch.randn(layer.out_features, rank, generator=g) * 0.1,
                                torch.randn(rank, layer.in_features, generator=g) * 0.1]
                elif isinstance(layer, torch.nn.Conv2d):
                    tensors += [torch.randn(layer.out_channels, rank, 1, 1, generator=g) * 0.1,
                                torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=g) * 0.1]
                else:
                    continue
                layers.append(layer)
    return [t.half() for t in tensors], layers


def test_sd15_order_matches_the_published_module_list():
    rows = list(csv.reader((line for line in TSV.open() if not line.startswith("#")), delimiter="\t"))
    targets = lora_targets()  # SD1.5 config shipped with the package
    assert len(targets) == len(rows) == 224
    for t, row in zip(targets, rows):
        up, down = eval(row[3]), eval(row[4])  # noqa: S307 - "[320, 32]" lists from our own data file
        assert (t.path, t.kind) == (row[1], row[2])
        assert t.weight_shape[0] == up[0] and tuple(t.weight_shape[1:]) == tuple(down[1:])


def test_read_and_merge_equals_explicit_per_module_computation(tmp_path, tiny_unet):
    unet = load_unet(tiny_unet)
    tensors, layers = reference_style_lora(unet)
    path = tmp_path / "s28750_lora_vis.pt"
    torch.save(tensors, path)
    before = [layer.weight.detach().clone() for layer in layers]
    pairs = read_longsd_lora(path, lora_targets(tiny_unet))
    assert len(pairs) == len(layers) == len(tensors) // 2
    merge_lora(unet, pairs, strength=0.7)
    for k, (layer, w0) in enumerate(zip(layers, before)):
        up, down = tensors[2 * k].float(), tensors[2 * k + 1].float()
        if layer.weight.ndim == 4:
            delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
        else:
            delta = up @ down
        torch.testing.assert_close(layer.weight, w0 + 0.7 * delta, atol=1e-5, rtol=1e-5)


def test_stacking_two_files_adds_both_deltas(tmp_path, tiny_unet):
    targets = lora_targets(tiny_unet)
    a, _ = reference_style_lora(load_unet(tiny_unet), seed=2)
    b, _ = reference_style_lora(load_unet(tiny_unet), seed=3)
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    stacked = load_unet(tiny_unet)
    for f in ("a.pt", "b.pt"):
        merge_lora(stacked, load_lora(tmp_path / f, targets))
    summed = load_unet(tiny_unet)
    pa, pb = load_lora(tmp_path / "a.pt", targets), load_lora(tmp_path / "b.pt", targets)
    with torch.no_grad():
        modules = dict(summed.named_modules())
        for path, (up, down) in pa.items():
            w = modules[path].weight
            d = (up.flatten(1).float() @ down.flatten(1).float() +
                 pb[path][0].flatten(1).float() @ pb[path][1].flatten(1).float()).reshape(w.shape)
            w += d
    for (n, p1), (_, p2) in zip(stacked.named_parameters(), summed.named_parameters()):
        torch.testing.assert_close(p1, p2, atol=1e-5, rtol=1e-5, msg=n)


def test_mismatched_lists_fail_with_the_promised_message(tmp_path, tiny_unet):
    targets = lora_targets(tiny_unet)
    tensors, _ = reference_style_lora(load_unet(tiny_unet))
    torch.save(tensors[:-2], tmp_path / "short.pt")
    with pytest.raises(LoraFormatError, match=rf"has {len(tensors) - 2} tensors .* {len(targets)} LoRA targets"):
        read_longsd_lora(tmp_path / "short.pt", targets)
    bad = list(tensors)
    bad[6] = torch.zeros(bad[6].shape[0], 4, 3)  # pair 3's up with a wrong shape
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(LoraFormatError, match=rf"LoRA pair 3 \({targets[3].path}.*expected up .* found up"):
        read_longsd_lora(tmp_path / "bad.pt", targets)
    torch.save({"a": torch.zeros(1)}, tmp_path / "dict.pt")
    with pytest.raises(LoraFormatError, match="not the LongSD list"):
        read_longsd_lora(tmp_path / "dict.pt", targets)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/longalign_lora_pwned",))


def test_pt_with_pickled_code_is_refused(tmp_path, tiny_unet):
    if os.path.exists("/tmp/longalign_lora_pwned"):
        os.remove("/tmp/longalign_lora_pwned")
    torch.save([torch.zeros(1), _Payload()], tmp_path / "evil.pt")
    with pytest.raises(LoraFormatError, match="pickled Python objects"):
        read_longsd_lora(tmp_path / "evil.pt", lora_targets(tiny_unet))
    assert not os.path.exists("/tmp/longalign_lora_pwned")


def test_kohya_round_trip_and_alpha(tmp_path, tiny_unet):
    targets = lora_targets(tiny_unet)
    tensors, _ = reference_style_lora(load_unet(tiny_unet))
    torch.save(tensors, tmp_path / "l.pt")
    pairs = read_longsd_lora(tmp_path / "l.pt", targets)
    save_kohya(pairs, tmp_path / "l.safetensors")
    state = load_file(str(tmp_path / "l.safetensors"))
    name = "lora_unet_" + targets[0].path.replace(".", "_")
    assert float(state[name + ".alpha"]) == 4.0 and len(state) == 3 * len(targets)
    back = load_lora(tmp_path / "l.safetensors", targets)
    for path, (up, down) in pairs.items():
        torch.testing.assert_close(back[path][0], up)
        torch.testing.assert_close(back[path][1], down)
    state[name + ".alpha"] = torch.tensor(2.0)  # alpha/rank = 0.5 folds into up
    assert torch.allclose(from_kohya(state, targets)[targets[0].path][0].float(), pairs[targets[0].path][0].float() * 0.5)
    state["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 8)
    with pytest.raises(LoraFormatError, match="match no LongAlign UNet layer.*Load LoRA node"):
        from_kohya(state, targets)


def test_kohya_file_without_alpha_keys_merges_at_scale_one(tmp_path, tiny_unet):
    """No ``.alpha`` key means alpha = rank, scale 1, as the two readers users have do: ComfyUI 0.8.0
    (comfy/weight_adapter/lora.py: ``alpha = v[2] / rank`` if the file has an alpha, else ``alpha = 1.0``) and
    kohya sd-scripts (networks/lora.py, LoRAModule: "if alpha == 0 or None, alpha is rank (no scaling)").
    Expected weights: W + up @ down, from the tensors written here."""
    from safetensors.torch import save_file

    targets = lora_targets(tiny_unet)
    unet = load_unet(tiny_unet)
    modules = dict(unet.named_modules())
    g = torch.Generator().manual_seed(7)
    state, expected = {}, {}
    for t in targets:
        w = modules[t.path].weight.detach().clone()
        up = torch.randn(w.shape[0], 4, *((1, 1) if w.ndim == 4 else ()), generator=g) * 0.1
        down = torch.randn(4, *w.shape[1:], generator=g) * 0.1
        name = "lora_unet_" + t.path.replace(".", "_")
        state[name + ".lora_up.weight"], state[name + ".lora_down.weight"] = up, down
        expected[t.path] = w + (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    save_file(state, str(tmp_path / "no_alpha.safetensors"))
    assert merge_lora(unet, load_lora(tmp_path / "no_alpha.safetensors", targets)) == len(targets)
    for path, w in expected.items():
        torch.testing.assert_close(modules[path].weight, w, atol=1e-5, rtol=1e-5, msg=path)


def test_convert_cli(tmp_path, tiny_unet, capsys):
    tensors, _ = reference_style_lora(load_unet(tiny_unet))
    torch.save(tensors, tmp_path / "reward.pt")
    assert main([str(tmp_path / "reward.pt"), str(tmp_path / "reward.safetensors"), "--unet-config",
                 str(tiny_unet)]) == 0
    assert "LoRA layers, rank 4" in capsys.readouterr().out
    assert len(load_file(str(tmp_path / "reward.safetensors"))) == 3 * len(tensors) // 2


def test_ldm_config_conversion_gives_the_sd15_order():
    sd15_ldm = dict(model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
                    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], context_dim=768, num_heads=8, num_head_channels=-1,
                    use_linear_in_transformer=False, transformer_depth_middle=1, in_channels=4, out_channels=4)
    assert lora_targets(diffusers_config_from_ldm(sd15_ldm)) == lora_targets()
    with pytest.raises(LoraFormatError, match="1024 channels"):  # SD2 unCLIP-style extra conditioning
        diffusers_config_from_ldm(dict(sd15_ldm, adm_in_channels=1024))
