"""The LongSD T5 branch: adapter format, T5 encode without mask, combined conditioning."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from longalign_core import CLIPSegmentEncoder
from longalign_core.t5_branch import TextAdapter, combine_conditioning, load_t5_branch, load_text_adapter

PROMPT = "a red fox sits on a mossy rock. behind it a waterfall drops into a pool."


def test_adapter_folder_is_the_released_format(tiny_adapter_dir):
    cfg = json.loads((tiny_adapter_dir / "config.json").read_text())
    assert (cfg["in_dim"], cfg["int_dim"], cfg["out_dim"]) == (32, 24, 32)
    keys = set(load_file(str(tiny_adapter_dir / "diffusion_pytorch_model.safetensors")))
    assert keys == {f"{ff}.net.{i}.{p}" for ff in ("ff1", "ff2") for i, p in
                    (("0.proj", "weight"), ("0.proj", "bias"), ("2", "weight"), ("2", "bias"))} | \
        {f"norm{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    assert load_file(str(tiny_adapter_dir / "diffusion_pytorch_model.safetensors"))["ff1.net.0.proj.weight"].shape \
        == (2 * 4 * 32, 32)


def adapter_by_hand(sd, x):
    """The adapter written out from its state dict: LN -> GEGLU FF -> LN -> GEGLU FF."""
    def ff(prefix, h):
        a, gate = F.linear(h, sd[f"{prefix}.net.0.proj.weight"], sd[f"{prefix}.net.0.proj.bias"]).chunk(2, -1)
        return F.linear(a * F.gelu(gate), sd[f"{prefix}.net.2.weight"], sd[f"{prefix}.net.2.bias"])

    h = F.layer_norm(x, x.shape[-1:], sd["norm1.weight"], sd["norm1.bias"])
    h = ff("ff1", h)
    h = F.layer_norm(h, h.shape[-1:], sd["norm2.weight"], sd["norm2.bias"])
    return ff("ff2", h)


def test_t5_branch_matches_an_independent_computation(tiny_t5_dir, tiny_adapter_dir):
    from transformers import AutoTokenizer, T5EncoderModel

    branch = load_t5_branch(tiny_t5_dir, tiny_adapter_dir)
    out = branch.encode([PROMPT, ""])
    assert out.shape == (2, 240, 32)
    tok = AutoTokenizer.from_pretrained(tiny_t5_dir)
    ids = tok([PROMPT, ""], max_length=240, padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        states = T5EncoderModel.from_pretrained(tiny_t5_dir).eval()(input_ids=ids).last_hidden_state  # no mask
        expected = adapter_by_hand(load_file(str(tiny_adapter_dir / "diffusion_pytorch_model.safetensors")), states)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    masked = load_t5_branch(tiny_t5_dir, tiny_adapter_dir, attention_mask="padding").encode([PROMPT])
    assert not torch.allclose(masked, out[:1], atol=1e-4)  # the reference's unmasked pads do matter


def test_combined_conditioning_is_clip_then_t5(tiny_t5_dir, tiny_adapter_dir, clip_tokenizer, tiny_text_encoder):
    clip = CLIPSegmentEncoder(clip_tokenizer, tiny_text_encoder).encode([PROMPT, ""]).cond
    t5 = load_t5_branch(tiny_t5_dir, tiny_adapter_dir).encode([PROMPT, ""])
    both = combine_conditioning(clip, t5)
    assert both.shape == (2, 480, 32)
    torch.testing.assert_close(both[:, :240], clip)
    torch.testing.assert_close(both[:, 240:], t5)
    with pytest.raises(ValueError, match="SD1.x only"):
        combine_conditioning(clip, torch.zeros(2, 240, 16))


def test_adapter_errors(tmp_path, tiny_t5_dir):
    with pytest.raises(ValueError, match="config.json is missing"):
        load_text_adapter(tmp_path)
    TextAdapter(in_dim=64, int_dim=24, out_dim=32).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="d_model 32 does not match the adapter's in_dim 64"):
        load_t5_branch(tiny_t5_dir, tmp_path / "wide")
