"""Denscore nodes against a real ComfyUI (in-process). Skips unless COMFYUI_PATH is set."""

import shutil
import sys

import pytest
import torch

from comfy_support import load_pack, requires_comfy
from longalign_core.denscore import default_reference_prompts, direction_from_prompts, segment_score
from longalign_core.preference import load_preference_model

pytestmark = requires_comfy

PROMPT = "A red fox sits on a mossy rock. Behind it a waterfall drops into a pool! The sky is orange."


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
    out = mod.LongAlignDenscoreScore.execute(bundle, images, PROMPT, 0.3, "", "sentence")
    scores, relevant, irrelevant, eta, report, chart = out.args
    assert len(scores) == len(relevant) == len(irrelevant) == len(eta) == 3
    # independent: the core on a freshly loaded model with V from the shipped prompt set
    model = load_preference_model(tiny_clip_dir)
    v = direction_from_prompts(model, default_reference_prompts())
    expected = segment_score(model, images.permute(0, 3, 1, 2), PROMPT, direction=v).parts
    torch.testing.assert_close(torch.tensor(scores), expected.score, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(relevant), expected.relevant, atol=1e-5, rtol=1e-5)
    assert min(abs(r) for r in relevant) > 1e-5  # not the collapsed single-prompt V
    assert chart.ndim == 4 and chart.shape[0] == 1 and chart.shape[-1] == 3 and 0 <= chart.min() <= chart.max() <= 1
    assert "image 2" in report and "weakest" in report
    assert out.ui["images"] and out.ui["text"] == [report]
    assert list((models / "denscore" / "tiny-denscore").glob("longalign_direction-*.safetensors"))


def test_best_of_n_picks_the_highest(nodes, images):
    mod, _ = nodes
    bundle, = mod.LongAlignPreferenceModelLoader.execute("tiny-denscore", "auto", "fp32").args
    for rank_by in ("score", "text_relevant", "reweighted"):
        best_image, best, values, report = mod.LongAlignDenscoreBestOfN.execute(
            bundle, images, PROMPT, 0.3, "", "sentence", rank_by).args
        assert best == max(range(3), key=lambda i: values[i])
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
