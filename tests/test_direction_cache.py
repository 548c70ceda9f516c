"""V from a prompt set (issue 27 points 1–2): segmented like the scores it decomposes, and cached under a key of
everything it depends on (the preference model's weights and dtype, the prompts, the split and long-segment
rules), named by one function for every caller."""

import copy

import pytest
import torch
import torch.nn.functional as F

from longalign_core.preference import load_preference_model
from longalign_core.reference_direction import (
    cached_direction,
    direction_cache_file,
    direction_from_prompts,
    direction_key,
)
from longalign_core.segmentation import fit_segments, split_segments

RUN_ON = "A market square where " + " ".join(["lanterns and awnings and stalls"] * 24) + " glow at dusk."
PROMPTS = ["A cat on a mat. It sleeps.", RUN_ON, "A boat on a grey sea. Gulls circle above it."]


@pytest.fixture(scope="module")
def denscore(tiny_clip_dir):
    return load_preference_model(tiny_clip_dir)


@pytest.fixture(scope="module")
def other_model(denscore):
    """Another preference model of the same architecture: the text projection perturbed."""
    other = copy.copy(denscore)
    other.model = copy.deepcopy(denscore.model)
    with torch.no_grad():
        proj = other.model.text_projection.weight
        proj.add_(torch.randn(proj.shape, generator=torch.Generator().manual_seed(1)) * proj.std())
    return other


def independent_v(model, prompts, long_segments):
    """V written out: each prompt split into sentences, an over-long sentence fitted to the 75-token window by
    ``long_segments``, each segment encoded alone, normalised, averaged per prompt; the mean over prompts,
    normalised."""
    means = []
    for p in prompts:
        segs = fit_segments(split_segments(p, "sentence"), model.count_tokens, model.context_length - 2,
                            long_segments)
        t = torch.cat([F.normalize(model.text_features([s.text]).float(), dim=-1) for s in segs])
        means.append(t.mean(0))
    return F.normalize(torch.stack(means).mean(0), dim=0)


def test_the_run_on_sentence_is_long(denscore):
    assert denscore.count_tokens(RUN_ON) > 100


@pytest.mark.parametrize("long_segments", ["split", "truncate"])
def test_v_is_segmented_like_the_scores(denscore, long_segments):
    with torch.no_grad():
        expected = independent_v(denscore, PROMPTS, long_segments)
        v = direction_from_prompts(denscore, PROMPTS, "sentence", long_segments)
    torch.testing.assert_close(v, expected, atol=2e-6, rtol=0)


def test_split_and_truncate_give_different_v(denscore):
    split = direction_from_prompts(denscore, PROMPTS, "sentence", "split")
    truncate = direction_from_prompts(denscore, PROMPTS, "sentence", "truncate")
    assert (split - truncate).norm() > 1e-3


def test_trainer_builds_training_v_with_its_long_segment_rule(denscore):
    from trainer.config import TrainConfig
    from trainer.direction import RewardDirection

    cfg = TrainConfig(long_segments="split", reward_direction_prompts=8)
    built = RewardDirection.build("training", denscore, cfg, PROMPTS, 1, None, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(built.fixed, independent_v(denscore, PROMPTS, "split"), atol=2e-6, rtol=0)


def test_another_model_does_not_reuse_the_cache(denscore, other_model, tmp_path):
    v1 = cached_direction(denscore, PROMPTS, fallback_dir=tmp_path)
    v2 = cached_direction(other_model, PROMPTS, fallback_dir=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(v2, independent_v(other_model, PROMPTS, "truncate"), atol=2e-6, rtol=0)
    assert (v1 - v2).norm() > 1e-2
    assert len(list(tmp_path.glob("longalign_direction-*.safetensors"))) == 2


def test_the_key_covers_every_input(denscore, other_model):
    base = direction_key(denscore, PROMPTS, "sentence", "truncate")
    assert base == direction_key(denscore, list(PROMPTS), "sentence", "truncate")  # stable
    others = {direction_key(other_model, PROMPTS, "sentence", "truncate"),
              direction_key(denscore, PROMPTS[:2], "sentence", "truncate"),
              direction_key(denscore, PROMPTS, "clause", "truncate"),
              direction_key(denscore, PROMPTS, "sentence", "split")}
    half = copy.copy(denscore)
    half.model = copy.deepcopy(denscore.model).to(torch.bfloat16)
    others.add(direction_key(half, PROMPTS, "sentence", "truncate"))
    assert len(others) == 5 and base not in others


def test_a_cache_with_another_key_is_not_read(denscore, tmp_path):
    cache = tmp_path / "v.safetensors"
    direction_from_prompts(denscore, PROMPTS, "sentence", "truncate", cache_file=cache)
    v = direction_from_prompts(denscore, PROMPTS, "sentence", "split", cache_file=cache)  # same file, other rule
    with torch.no_grad():
        torch.testing.assert_close(v, independent_v(denscore, PROMPTS, "split"), atol=2e-6, rtol=0)


def test_one_naming(tiny_clip_dir, tmp_path):
    model_file = tmp_path / "model.safetensors"
    model_file.write_bytes(b"")
    assert direction_cache_file(tiny_clip_dir, "k1") == tiny_clip_dir / "longalign_direction-k1.safetensors"
    assert direction_cache_file(model_file, "k1") == tmp_path / "longalign_direction-k1.safetensors"
    assert direction_cache_file(None, "k1", tmp_path / "out") == tmp_path / "out" / "longalign_direction-k1.safetensors"
    assert direction_cache_file(tmp_path / "absent", "k1") is None


def test_per_step_v_is_segmented_like_the_scores(denscore):
    """--reward-direction batch: the step's V uses the run's long-segment rule too."""
    from trainer.config import TrainConfig
    from trainer.direction import RewardDirection

    cfg = TrainConfig(long_segments="split")
    v = RewardDirection("batch", denscore, cfg, PROMPTS, 1, None).for_prompts(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(v, independent_v(denscore, PROMPTS, "split"), atol=2e-6, rtol=0)
