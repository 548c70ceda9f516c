"""Denscore scoring and the decomposition, against independent computations."""

import os

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2 as T

from longalign_core.denscore import (
    batch_common_direction,
    common_direction,
    pin_prompt_features,
    preprocess_images,
    prompt_features,
    reweight_text,
    segment_score,
)
from longalign_core.preference import PreferenceModelError, load_preference_model
from longalign_core.reference_direction import direction_from_prompts
from longalign_core.segmentation import split_segments

PROMPT = "A red fox sits on a mossy rock. Behind it a waterfall drops into a pool! The sky is orange."


@pytest.fixture(scope="module")
def denscore(tiny_clip_dir):
    return load_preference_model(tiny_clip_dir)


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, 40, 48, generator=g)


def independent_hf_score(model_dir, images, prompt):
    """Score through transformers and torchvision directly: the reference's pipeline, centre crop."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(model_dir).eval()
    tok = CLIPTokenizer.from_pretrained(model_dir)
    side = round(min(images.shape[-2:]) * 504 / 512)
    tf = T.Compose([T.CenterCrop(side), T.Resize((32, 32), antialias=True),
                    T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    with torch.no_grad():
        x = model.visual_projection(model.vision_model(pixel_values=tf(images)).pooler_output)
        segs = [s.text for s in split_segments(prompt)]
        ids = tok(segs, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        t = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    x, t = F.normalize(x, dim=-1), F.normalize(t, dim=-1)
    return t.mean(0) @ x.T, t @ x.T, t.mean(0)


def independent_parts(model_dir, images, prompts, v, omega):
    """relevant, irrelevant and S_ω written out from the definitions on transformers + torchvision features
    (differentiable in ``images``): t̄ = mean of normalised segment features, x̂ = normalised image features,
    η = t̄·V, relevant = x̂·t̄ − η(x̂·V), irrelevant = η(x̂·V), S_ω = relevant + ω·irrelevant."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(model_dir).eval()
    tok = CLIPTokenizer.from_pretrained(model_dir)
    side = round(min(images.shape[-2:]) * 504 / 512)
    tf = T.Compose([T.CenterCrop(side), T.Resize((32, 32), antialias=True),
                    T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    x_hat = F.normalize(model.visual_projection(model.vision_model(pixel_values=tf(images)).pooler_output), dim=-1)
    t_bar = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok([s.text for s in split_segments(prompt)], padding="max_length", max_length=77, truncation=True,
                      return_tensors="pt").input_ids
            t_bar.append(F.normalize(model.text_projection(model.text_model(input_ids=ids).pooler_output),
                                     dim=-1).mean(0))
    t_bar = torch.stack(t_bar)
    eta = t_bar @ v
    x_v = x_hat @ v
    relevant = (x_hat * t_bar).sum(-1) - eta * x_v
    irrelevant = eta * x_v
    return relevant, irrelevant, relevant + omega * irrelevant, eta


def test_score_equals_independent_transformers_computation(denscore, tiny_clip_dir, images):
    expected, per_segment, t_bar = independent_hf_score(tiny_clip_dir, images, PROMPT)
    out = segment_score(denscore, images, PROMPT)
    torch.testing.assert_close(out.score, expected, atol=1e-5, rtol=1e-5)
    for b in range(3):
        torch.testing.assert_close(out.segment_scores[b], per_segment[:, b], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.segment_scores[b].mean(), out.score[b])  # per-segment mean = score
    assert len(out.segment_scores[0]) == 3


def test_decomposition_matches_the_definitions(denscore, tiny_clip_dir, images):
    v = direction_from_prompts(denscore)
    prompts = [PROMPT, "A cat. A dog.", "One short sentence"]
    out = segment_score(denscore, images, prompts, direction=v)
    p = out.parts
    relevant, irrelevant, reweighted, eta = independent_parts(tiny_clip_dir, images, prompts, v, 0.3)
    torch.testing.assert_close(p.relevant, relevant.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p.irrelevant, irrelevant.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p.reweighted, reweighted.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p.eta, eta, atol=1e-5, rtol=1e-5)
    assert p.irrelevant.abs().min() > 1e-3 and p.relevant.abs().min() > 1e-4  # both parts are non-trivial
    # per-segment parts average to the image-level parts
    for b in range(3):
        torch.testing.assert_close(out.segment_relevant[b].mean(), p.relevant[b], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.segment_irrelevant[b].mean(), p.irrelevant[b], atol=1e-6, rtol=1e-5)
    # omega = 1 is the plain score; the reference's reweighted text embedding gives S_omega
    one = segment_score(denscore, images, PROMPT, direction=v, omega=1.0).parts
    torch.testing.assert_close(one.reweighted, one.score)
    x_hat = F.normalize(denscore.image_features(preprocess_images(images, 32, denscore.mean, denscore.std)), dim=-1)
    tb = out.prompts[0].mean[None]
    torch.testing.assert_close(segment_score(denscore, images, PROMPT, direction=v).parts.reweighted,
                               (reweight_text(tb, v, 0.3) @ x_hat.T)[0], atol=1e-6, rtol=1e-5)


def test_direction_from_one_prompt_collapses(denscore, images):
    """The reference's per-batch V on a single prompt is the prompt itself: nothing is text-relevant."""
    collapsed = segment_score(denscore, images, PROMPT).parts
    torch.testing.assert_close(collapsed.relevant, torch.zeros(3), atol=1e-6, rtol=0)
    v = direction_from_prompts(denscore)
    spread = segment_score(denscore, images, PROMPT, direction=v).parts
    assert spread.relevant.abs().min() > 1e-4


def test_batch_direction_with_gather():
    torch.manual_seed(0)
    local, other = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    v = batch_common_direction(local, gather=lambda m: torch.cat([m, other.mean(0, keepdim=True)]))
    torch.testing.assert_close(v, F.normalize((local.mean(0) + other.mean(0)) / 2, dim=0))
    torch.testing.assert_close(common_direction(torch.cat([local, other])), v)


def test_reweighted_gradient_matches_the_definitions(denscore, tiny_clip_dir, images):
    """∂S_ω/∂image against autograd of S_ω written out from the definitions on transformers directly; the plain
    score's gradient is far from it (so the check can tell them apart)."""
    v = direction_from_prompts(denscore)
    x = images.clone().requires_grad_(True)
    out = segment_score(denscore, x, PROMPT, direction=v, omega=0.3, crop="center")
    g_rw, = torch.autograd.grad(out.parts.reweighted.sum(), x)
    _, _, reweighted, _ = independent_parts(tiny_clip_dir, x, [PROMPT] * 3, v, 0.3)
    g_expected, = torch.autograd.grad(reweighted.sum(), x, retain_graph=True)
    _, _, plain, _ = independent_parts(tiny_clip_dir, x, [PROMPT] * 3, v, 1.0)
    g_plain, = torch.autograd.grad(plain.sum(), x)
    scale = float(g_expected.abs().max())
    assert torch.isfinite(g_rw).all() and scale > 0
    torch.testing.assert_close(g_rw, g_expected, atol=1e-5 * scale, rtol=1e-4)
    assert float((g_plain - g_expected).abs().max()) > 1e-2 * scale


def test_preprocessing_matches_torchvision_and_random_crop_is_seeded(images):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)
    ours = preprocess_images(images, 24, mean, std, crop="center")
    side = round(40 * 504 / 512)
    ref = T.Compose([T.CenterCrop(side), T.Resize((24, 24), antialias=True), T.Normalize(mean, std)])(images)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    a = preprocess_images(images, 24, mean, std, crop="random", generator=torch.Generator().manual_seed(5))
    b = preprocess_images(images, 24, mean, std, crop="random", generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)


def test_one_forward_per_distinct_segment_and_image_and_text_cache(tiny_clip_dir, images):
    """Each distinct segment text and each image goes through a forward of its own (a score must not depend on
    what is scored beside it: tests/test_score_invariance.py); a prompt seen before costs no text forward."""
    model = load_preference_model(tiny_clip_dir)
    calls = {"text": 0, "image": 0}
    h1 = model.model.text_model.register_forward_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1))
    h2 = model.model.vision_model.register_forward_hook(lambda *a: calls.__setitem__("image", calls["image"] + 1))
    try:
        segment_score(model, images, [PROMPT, "A cat. A dog.", PROMPT], direction=torch.ones(16) / 4)
        assert calls == {"text": 3 + 2, "image": 3}
        segment_score(model, images[:1], PROMPT, direction=torch.ones(16) / 4)
        assert calls == {"text": 5, "image": 4}  # the prompt's segment features came from the cache
        segment_score(model, images[:1], "A cat. A bird.", direction=torch.ones(16) / 4)
        assert calls == {"text": 7, "image": 5}  # a new prompt: both its segments (the cache is per prompt)
    finally:
        h1.remove()
        h2.remove()


@pytest.mark.parametrize("bad, message", [
    (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
    (torch.rand(0, 3, 32, 32), "empty"),
    (torch.rand(1, 3, 1, 1), "too small"),
    (torch.rand(1, 4, 32, 32), "alpha"),
    (torch.rand(1, 1, 32, 32), "grey"),
    (torch.rand(3, 32, 32), r"\(B, 3, H, W\)"),
])
def test_bad_images_are_refused_clearly(denscore, bad, message):
    with pytest.raises(ValueError, match=message):
        segment_score(denscore, bad, PROMPT)


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt_is_refused(denscore, images, prompt):
    with pytest.raises(ValueError, match="prompt is empty"):
        segment_score(denscore, images, prompt)


def test_prompt_count_must_match(denscore, images):
    with pytest.raises(ValueError, match="3 images"):
        segment_score(denscore, images, ["a", "b"])


def test_long_segment_is_truncated_with_a_warning(denscore, images):
    long = " ".join(["word"] * 100) + "."
    out = segment_score(denscore, images, long)
    assert out.warnings and "cut" in out.warnings[0]
    split = segment_score(denscore, images, long, long_segments="split")
    assert not split.warnings and len(split.segment_scores[0]) == 2


def test_direction_cache_file(denscore, tmp_path):
    cache = tmp_path / "v.safetensors"
    prompts = ["A cat on a mat. It sleeps.", "A dog runs. The sun sets.", "A boat. A sea."]
    v1 = direction_from_prompts(denscore, prompts, cache_file=cache)
    assert cache.is_file()
    # read back without encoding anything
    orig = denscore.text_features
    denscore.text_features = lambda texts: (_ for _ in ()).throw(AssertionError("re-encoded"))
    try:
        torch.testing.assert_close(direction_from_prompts(denscore, prompts, cache_file=cache), v1)
    finally:
        denscore.text_features = orig
    expected = common_direction(torch.stack([f.mean for f in prompt_features(denscore, prompts)]))
    torch.testing.assert_close(v1, expected)
    v2 = direction_from_prompts(denscore, prompts[:2], cache_file=cache)  # other prompts: recomputed
    assert not torch.allclose(v1, v2)


def test_open_clip_checkpoint_scores_like_open_clip(tiny_open_clip, images):
    import open_clip

    ckpt, cfg = tiny_open_clip
    model = load_preference_model(ckpt, arch=str(cfg))
    assert model.kind == "open_clip"
    out = segment_score(model, images, PROMPT)
    ref = open_clip.create_model("tiny-hps-ViT", pretrained=None)
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    ref.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})
    ref.eval()
    tok = open_clip.get_tokenizer("tiny-hps-ViT")
    with torch.no_grad():
        pixels = preprocess_images(images, 32, model.mean, model.std)
        x = F.normalize(ref.encode_image(pixels), dim=-1)
        t = F.normalize(ref.encode_text(tok([s.text for s in split_segments(PROMPT)])), dim=-1)
    torch.testing.assert_close(out.score, t.mean(0) @ x.T, atol=1e-5, rtol=1e-5)


def test_wrong_or_corrupt_model_files(tmp_path, tiny_clip_dir):
    with pytest.raises(PreferenceModelError, match="config.json is missing"):
        load_preference_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(PreferenceModelError, match="expected a CLIPModel"):
        load_preference_model(tmp_path)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(PreferenceModelError, match="not a valid safetensors"):
        load_preference_model(bad)
    with pytest.raises(PreferenceModelError, match="is a file"):
        load_preference_model(bad, kind="hf_clip")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_carrying_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(marker)}, evil)
    with pytest.raises(PreferenceModelError, match="pickled Python objects"):
        load_preference_model(evil)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["hf_clip", "open_clip"])
def test_pinned_prompts_score_the_same_after_the_text_tower_is_freed(kind, tiny_clip_dir, tiny_open_clip, images):
    if kind == "hf_clip":
        model, towers = load_preference_model(tiny_clip_dir), ("text_model", "text_projection")
    else:
        ckpt, cfg = tiny_open_clip
        model = load_preference_model(ckpt, arch=str(cfg))
        towers = ("transformer", "token_embedding", "ln_final", "positional_embedding", "text_projection")
    other = "A cat. A dog."
    v = torch.ones(16) / 4
    before = [segment_score(model, images, p, direction=v) for p in (PROMPT, other)]
    tower = sum(t.numel() * t.element_size() for n in towers for t in
                (getattr(model.model, n).parameters() if isinstance(getattr(model.model, n), torch.nn.Module)
                 else [getattr(model.model, n)]))
    everything = sum(p.numel() * p.element_size() for p in model.model.parameters())
    fresh = load_preference_model(tiny_clip_dir) if kind == "hf_clip" else load_preference_model(ckpt, arch=str(cfg))
    held = pin_prompt_features(fresh, [PROMPT, PROMPT, other])  # a fresh model: nothing cached by the scoring above
    assert held == 4 * 16 * 5  # fp32 features of 3 + 2 segments, 16 wide
    prompt_features(fresh, [f"A house number {i}." for i in range(300)])  # more than the LRU cache keeps
    assert fresh.drop_text_tower() == tower
    assert sum(p.numel() * p.element_size() for p in fresh.model.parameters()) == everything - tower
    for n in towers:
        assert getattr(fresh.model, n) is None
    for p, want in zip((PROMPT, other), before):  # pinned, never evicted: the same numbers without the tower
        got = segment_score(fresh, images, p, direction=v)
        torch.testing.assert_close(got.score, want.score, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got.parts.relevant, want.parts.relevant, atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="text tower of preference model .* was freed.*'A horse"):
        segment_score(fresh, images, "A horse. A barn.", direction=v)
