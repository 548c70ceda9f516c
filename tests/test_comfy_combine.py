"""Positive and negative conditionings of different lengths always combine in ComfyUI's sampler, for every
overflow mode (other long-prompt packs fail here with "Expected size 154 but got size 77"). In-process, on a tiny
SD1.5 checkpoint; skips unless COMFYUI_PATH is set."""

import sys

import pytest
import torch

from comfy_support import import_comfy, load_pack, requires_comfy

pytestmark = requires_comfy

LONG = " ".join(f"Detail {i} shows a small brass lantern hanging beside a blue wooden door." for i in range(45))


@pytest.fixture(scope="module")
def env(standin_checkpoints):
    pack = load_pack()
    comfy = import_comfy()
    ckpt = standin_checkpoints.path("sd15")
    model, clip, _ = comfy.sd.load_checkpoint_guess_config(
        str(ckpt), output_vae=False, output_clip=True, te_model_options={"dtype": torch.float32})[:3]
    node = sys.modules[pack.__name__ + ".nodes.text_encode"].LongAlignTextEncode
    return model, clip, node


def _encode(node, clip, text, overflow):
    out = node.execute(clip=clip, text=text, token_budget=240, overflow=overflow, split_mode="sentence",
                       long_sentences="split")
    return out.args[0]


def _sample(model, positive, negative):
    import nodes

    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    return nodes.common_ksampler(model, 7, 2, 7.5, "euler", "normal", positive, negative, latent)[0]["samples"]


def _repeat_to(conditioning, length):
    """The same conditioning with its tokens repeated to ``length`` (exact for unmasked cross-attention)."""
    (cond, extra), = conditioning
    return [[cond.repeat(1, length // cond.shape[1], 1), dict(extra)]]


@pytest.mark.parametrize("overflow", ["extend", "truncate", "error"])
def test_long_positive_and_short_negatives_combine(env, overflow):
    import nodes

    model, clip, node = env
    if overflow == "error":
        with pytest.raises(ValueError, match="token budget"):
            _encode(node, clip, LONG, overflow)
        return
    positive = _encode(node, clip, LONG, overflow)
    negative = _encode(node, clip, "blurry, low quality", overflow)
    stock_negative = nodes.CLIPTextEncode().encode(clip, "blurry, low quality")[0]
    p_len, n_len = positive[0][0].shape[1], negative[0][0].shape[1]
    assert n_len == 240 and p_len == (720 if overflow == "extend" else 240)  # 710 merged tokens → 3 × 240
    sample = _sample(model, positive, negative)
    assert torch.isfinite(sample).all()
    # the sampler's own length handling is exact: the same as a negative repeated to the positive's length
    torch.testing.assert_close(sample, _sample(model, positive, _repeat_to(negative, p_len)), atol=1e-4, rtol=1e-4)
    # and a stock 77-token negative (no common multiple within 4×) still samples
    assert torch.isfinite(_sample(model, positive, stock_negative)).all()
