"""A score is a function of its image and its prompt alone (issue 26.1): not of the images and prompts scored beside
it, of the order they come in, of what the text cache holds, or of a resume.

On some CPUs the last bits of a row of a batched forward depend on the batch (GEMM and attention kernels are chosen
by shape, padding follows the longest text), so a resumed evaluation's scores.csv differed from the uninterrupted
one. Every check runs twice: on the tiny Denscore-shaped model as it is, and on the same model made batch-sensitive
on purpose (each output row shifted by an amount that depends on the batch it was computed in, as such a kernel
would), so that an implementation that batches fails here on every machine, not only on the ones whose kernels
happen to show it."""

from __future__ import annotations

import csv

import pytest
import torch

from longalign_core.denscore import prompt_features, segment_score
from longalign_core.preference import load_preference_model

from trainer_support import one_thread  # noqa: F401  (autouse: one intra-op thread)

PROMPTS = ["A red fox sits on a mossy rock. Behind it a waterfall drops into a pool. The sky is orange.",
           "A lighthouse keeper climbs the stairs. Gulls circle the boats in the harbour.",
           "A red fox sits on a mossy rock. Snow falls on the pines.",
           "An old bridge in soft morning light. A heron stands in the river. Willows lean over the water."]


def make_batch_sensitive(model):
    """Shift every output row by 1e-3 × (rows in the batch − 1) × (the batch's mean): a row's value then depends
    on its batch's size and content, as a shape-chosen kernel's last bits do (only larger, so float32 shows it)."""
    text, image = model.text_features, model.image_features

    def shifted(f):
        def run(x):
            out = f(x)
            return out + 1e-3 * (out.shape[0] - 1) * out.mean(dim=0, keepdim=True)
        return run

    model.text_features, model.image_features = shifted(text), shifted(image)
    return model


@pytest.fixture(params=["as is", "batch-sensitive"])
def judge(request, tiny_clip_dir):
    """A fresh model (cold text cache) each call."""
    def load():
        model = load_preference_model(tiny_clip_dir)
        return make_batch_sensitive(model) if request.param == "batch-sensitive" else model
    return load


@pytest.fixture
def images():
    return torch.rand(len(PROMPTS), 3, 40, 48, generator=torch.Generator().manual_seed(0))


def rows(result):
    """Everything a score row holds, per image: (score, relevant, irrelevant) and the per-segment values."""
    return [(result.parts.score[b], result.parts.relevant[b], result.parts.irrelevant[b],
             result.segment_scores[b], result.segment_relevant[b], result.segment_irrelevant[b])
            for b in range(len(result.segment_scores))]


def assert_same_bytes(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y), (x, y)


def test_a_score_does_not_depend_on_its_batch_its_order_or_the_cache(judge, images):
    direction = torch.nn.functional.normalize(torch.ones(16), dim=0)
    together = rows(segment_score(judge(), images, PROMPTS, direction=direction))
    for b in range(len(PROMPTS)):  # each image alone, on a cold cache
        alone = rows(segment_score(judge(), images[b:b + 1], [PROMPTS[b]], direction=direction))
        assert_same_bytes(alone[0], together[b])
    order = [2, 0, 3, 1]
    reordered = rows(segment_score(judge(), images[order], [PROMPTS[i] for i in order], direction=direction))
    for k, b in enumerate(order):
        assert_same_bytes(reordered[k], together[b])
    warm = judge()
    prompt_features(warm, PROMPTS[::-1], cache_size=len(PROMPTS))  # the cache filled in one call, as a resume does
    for pair in ([0, 1], [2, 3]):
        scored = rows(segment_score(warm, images[pair], [PROMPTS[i] for i in pair], direction=direction))
        for k, b in enumerate(pair):
            assert_same_bytes(scored[k], together[b])


def test_the_training_gradient_of_an_image_does_not_depend_on_its_batch(judge, images):
    """The reward's gradient flows through the per-image forwards the same way (autograd through the stack)."""
    direction = torch.nn.functional.normalize(torch.ones(16), dim=0)
    x = images.clone().requires_grad_(True)
    segment_score(judge(), x, PROMPTS, direction=direction).parts.reweighted.sum().backward()
    y = images[1:2].clone().requires_grad_(True)
    segment_score(judge(), y, [PROMPTS[1]], direction=direction).parts.reweighted.sum().backward()
    assert torch.equal(x.grad[1:2], y.grad)


# -- the evaluation: two orders of the prompts file, and a resume, with a batch-sensitive judge ----------------


@pytest.fixture
def batch_sensitive_evaluation_judge(monkeypatch):
    import longalign_core.preference as preference

    real = preference.load_preference_model
    monkeypatch.setattr(preference, "load_preference_model",
                        lambda *a, **k: make_batch_sensitive(real(*a, **k)))


def evaluate(out, prompts, tmp_path, *args, on_unit=None):
    from trainer.evaluate import EvalConfig, Evaluation

    path = tmp_path / f"{out.name}.txt"
    path.write_text("\n".join(prompts) + "\n")
    cfg = EvalConfig.from_args(["--steps", "2", "--resolution", "32", "--seeds", "2", "--batch-size", "2",
                                "--bootstrap", "200", "--prompts", str(path), "--output-dir", str(out), *args])
    Evaluation(cfg, announce=lambda *_: None).run(on_unit=on_unit)
    with open(out / "scores.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def keyed(rows, prompts):
    """Rows by (arm, prompt text, seed, sentence): what a score is a function of."""
    return {(r["arm"], prompts[int(r["prompt"])], r["seed"], r["sentence"]):
            (r["text"], r["score"], r["text_relevant"], r["text_irrelevant"], r["reweighted"]) for r in rows}


def test_evaluation_scores_are_the_same_in_either_order_and_after_a_resume(tmp_path,
                                                                            batch_sensitive_evaluation_judge):
    """--batch-size 2 with 2 seeds samples one prompt per UNet batch, so the images are the same in either order;
    the scores must be too, and a run stopped after its first prompt group and resumed (which fills the text
    cache with every prompt at once) must give scores.csv byte for byte."""
    forward = evaluate(tmp_path / "forward", PROMPTS, tmp_path)
    backward = evaluate(tmp_path / "backward", PROMPTS[::-1], tmp_path)
    assert keyed(forward, PROMPTS) == keyed(backward, PROMPTS[::-1])
    assert len(forward) == len(backward) > 2 * len(PROMPTS)

    def stop(n):
        if n == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(tmp_path / "cut", PROMPTS, tmp_path, on_unit=stop)
    evaluate(tmp_path / "cut", PROMPTS, tmp_path, "--resume")
    assert (tmp_path / "cut" / "scores.csv").read_bytes() == (tmp_path / "forward" / "scores.csv").read_bytes()


def test_the_trainer_asks_mkl_for_the_same_bits_at_any_alignment():
    """MKL's conditional numerical reproducibility is set by the trainer's package before torch loads (a resumed
    run, torchrun's ranks and the ComfyUI node's child then agree to the bit: tests/test_evaluate_scale.py's
    torchrun comparison fails here without it); a value the user set is kept."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    code = "import os, trainer, torch; print(os.environ['MKL_CBWR'])"
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "AUTO,STRICT"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "MKL_CBWR": "COMPATIBLE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "COMPATIBLE"
