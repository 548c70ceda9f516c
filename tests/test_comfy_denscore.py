"""Denscore nodes against a real ComfyUI (in-process). Skips unless COMFYUI_PATH is set."""

import shutil
import sys

import pytest
import torch

import torch.nn.functional as F

from comfy_support import load_pack, requires_comfy

pytestmark = requires_comfy

PROMPT = "A red fox sits on a mossy rock. Behind it a waterfall drops into a pool! The sky is orange."
SEGMENTS = ["A red fox sits on a mossy rock.", "Behind it a waterfall drops into a pool!", "The sky is orange."]
#: A small reference prompt set for V, and its sentences written out.
REFERENCE = "A cat sleeps on a sofa. The room is dark.\nTwo boats drift on a lake.\nA city at night! Neon signs glow."
REFERENCE_SEGMENTS = [["A cat sleeps on a sofa.", "The room is dark."], ["Two boats drift on a lake."],
                      ["A city at night!", "Neon signs glow."]]
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def independent_scores(model_dir, images, omega=0.3):
    """Denscore written out on transformers' CLIPModel (paper Eq. 6-7, SPEC §4): segment embeddings t_k,
    t̄ = mean of normalised t_k, V = normalised mean of the reference prompts' t̄, x̂ from a centred 504/512 crop
    resized to the model's 32 px; S = t̄·x̂, η = t̄·V, irrelevant = η (x̂·V), relevant = S − irrelevant."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(model_dir).eval()
    tok = CLIPTokenizer.from_pretrained(model_dir)

    def features(out):
        return out if torch.is_tensor(out) else out.pooler_output

    def t_bar(sentences):
        ids = tok(sentences, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        with torch.no_grad():
            t = F.normalize(features(model.get_text_features(input_ids=ids.input_ids)).float(), dim=-1)
        return t.mean(0)

    v = F.normalize(torch.stack([t_bar(p) for p in REFERENCE_SEGMENTS]).mean(0), dim=0)
    t = t_bar(SEGMENTS)
    x = images.permute(0, 3, 1, 2)  # ComfyUI IMAGE (B, H, W, C) → (B, C, H, W)
    h, w = x.shape[-2:]
    side = round(min(h, w) * 504 / 512)
    x = x[..., (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        x_hat = F.normalize(features(model.get_image_features(pixel_values=x)).float(), dim=-1)
    score = x_hat @ t
    eta = t @ v
    irrelevant = eta * (x_hat @ v)
    relevant = score - irrelevant
    return {"score": score, "text_relevant": relevant, "text_irrelevant": irrelevant,
            "reweighted": relevant + omega * irrelevant, "eta": eta}


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, tiny_clip_dir):
    pack = load_pack()
    import folder_paths

    models = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_clip_dir, models / "denscore" / "tiny-denscore")
    folder_paths.folder_names_and_paths["denscore"] = ([str(models / "denscore")], {".safetensors", ".pt"})
    folder_paths.set_temp_directory(str(tmp_path_factory.mktemp("temp")))
    return sys.modules[pack.__name__ + ".nodes.denscore_nodes"], models


@pytest.fixture
def images():
    return torch.rand(3, 40, 48, 3, generator=torch.Generator().manual_seed(0))  # ComfyUI IMAGE: B, H, W, C


def test_loader_lists_and_loads_model_folders(nodes):
    mod, _ = nodes
    schema = mod.LongAlignPreferenceModelLoader.GET_SCHEMA()
    assert schema.inputs[0].options == ["tiny-denscore"]
    assert all(i.tooltip for s in (schema, mod.LongAlignDenscoreScore.GET_SCHEMA(),
                                   mod.LongAlignDenscoreBestOfN.GET_SCHEMA()) for i in s.inputs)
    bundle, = mod.LongAlignPreferenceModelLoader.execute("tiny-denscore", "auto", "fp32").args
    assert bundle.model.kind == "hf_clip"


def test_score_node_outputs_and_uses_the_reference_direction(nodes, images, tiny_clip_dir):
    mod, models = nodes
    bundle, = mod.LongAlignPreferenceModelLoader.execute("tiny-denscore", "auto", "fp32").args
    out = mod.LongAlignDenscoreScore.execute(bundle, images, PROMPT, 0.3, REFERENCE, "sentence")
    scores, relevant, irrelevant, eta, report, chart = out.args
    want = independent_scores(tiny_clip_dir, images)
    torch.testing.assert_close(torch.tensor(scores), want["score"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(relevant), want["text_relevant"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(irrelevant), want["text_irrelevant"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(eta), want["eta"].expand(3), atol=1e-5, rtol=1e-5)
    assert min(abs(r) for r in relevant) > 1e-5  # not the collapsed single-prompt V
    assert chart.ndim == 4 and chart.shape[0] == 1 and chart.shape[-1] == 3 and 0 <= chart.min() <= chart.max() <= 1
    assert "image 2" in report and "weakest" in report
    assert out.ui["images"] and out.ui["text"] == [report]
    assert list((models / "denscore" / "tiny-denscore").glob("longalign_direction-*.safetensors"))


def test_score_node_default_reference_set_gives_a_direction(nodes, images):
    mod, _ = nodes
    bundle, = mod.LongAlignPreferenceModelLoader.execute("tiny-denscore", "auto", "fp32").args
    relevant = mod.LongAlignDenscoreScore.execute(bundle, images, PROMPT, 0.3, "", "sentence").args[1]
    assert min(abs(r) for r in relevant) > 1e-5  # the shipped prompt set, not the collapsed single-prompt V


@pytest.mark.parametrize("rank_by", ["score", "text_relevant", "reweighted"])
def test_best_of_n_ranks_by_the_chosen_column(nodes, images, tiny_clip_dir, rank_by):
    mod, _ = nodes
    bundle, = mod.LongAlignPreferenceModelLoader.execute("tiny-denscore", "auto", "fp32").args
    best_image, best, values, report = mod.LongAlignDenscoreBestOfN.execute(
        bundle, images, PROMPT, 0.3, REFERENCE, "sentence", rank_by).args
    columns = independent_scores(tiny_clip_dir, images)
    want = columns[rank_by]
    # the columns differ, so ranking by a wrong one shows in the values
    assert all(not torch.allclose(columns[k], want, atol=1e-4) for k in ("score", "text_relevant", "reweighted")
               if k != rank_by)
    torch.testing.assert_close(torch.tensor(values), want, atol=1e-5, rtol=1e-5)
    assert best == int(want.argmax())
    torch.testing.assert_close(best_image, images[best:best + 1])
    assert f"best: image {best} by {rank_by}" in report


def test_bad_inputs(nodes):
    mod, _ = nodes
    bundle, = mod.LongAlignPreferenceModelLoader.execute("tiny-denscore", "auto", "fp32").args
    with pytest.raises(ValueError, match="no images"):
        mod.LongAlignDenscoreScore.execute(bundle, torch.zeros(0, 32, 32, 3), PROMPT, 0.3, "", "sentence")
    with pytest.raises(ValueError, match="prompt is empty"):
        mod.LongAlignDenscoreScore.execute(bundle, torch.rand(1, 32, 32, 3), "  ", 0.3, "", "sentence")
    with pytest.raises(FileNotFoundError, match="models/denscore|denscore"):
        mod.LongAlignPreferenceModelLoader.execute("missing-model", "auto", "fp32")
