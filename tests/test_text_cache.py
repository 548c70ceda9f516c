"""``--cache-text-embeddings`` (trainer/text_cache.py): a step's conditioning read from the cache equals the batch
encode it replaces, for any batch make-up (row lengths, padding, extend vs truncate, SD and SDXL), the text
encoders really leave memory, a run trains the same LoRA with and without it, and a cache that cannot fit is
refused before it is built."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from safetensors.torch import load_file

from trainer.conditioning import StepEncoder
from trainer.config import TrainConfig
from trainer.finetune import Trainer, cli, main
from trainer.loading.models import load_base_model
from trainer_support import FAST, SENTENCES, one_thread  # noqa: F401  (autouse fixture)

BUDGET = 32  # small, so that a few sentences overflow it
SHORT = "A red fox."
MEDIUM = SENTENCES[0] + ". " + SENTENCES[1] + "."  # about 24 tokens: under the budget
LONG = ". ".join(SENTENCES) + "."  # about 65 tokens: extend makes it 64 -> 96, truncate cuts it


def step_encoder(family: str, overflow: str) -> StepEncoder:
    base = load_base_model("embedded-sdxl" if family == "sdxl" else "embedded", 0, torch.float32)
    cfg = TrainConfig.from_args(["--token-budget", str(BUDGET), "--overflow", overflow])
    if family == "sdxl":
        from longalign_core.sdxl_text import SDXLSegmentEncoder

        encoder = SDXLSegmentEncoder(base.tokenizer, base.text_encoder, base.tokenizer_2, base.text_encoder_2)
    else:
        from longalign_core.clip_text import CLIPSegmentEncoder

        encoder = CLIPSegmentEncoder(base.tokenizer, base.text_encoder)
    return StepEncoder(cfg, encoder, None, torch.float32, torch.device("cpu"), family == "sdxl")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("overflow", ["extend", "truncate"])
def test_cached_conditioning_equals_the_batch_encode(family, overflow):
    live, cached = step_encoder(family, overflow), step_encoder(family, overflow)
    cached.cache_prompts([SHORT, MEDIUM, LONG, SHORT])
    assert cached.encoder is None and len(cached.cache) == 4  # three prompts and the empty one
    long_len = 96 if overflow == "extend" else BUDGET
    for batch, with_uncond in [([SHORT], True), ([LONG], True), ([SHORT, LONG, MEDIUM], True),
                               ([MEDIUM, SHORT], False), ([LONG, LONG], False)]:
        want, got = live.encode(batch, with_uncond), cached.encode(batch, with_uncond)
        length = long_len if LONG in batch else BUDGET
        assert got.cond.shape == want.cond.shape == (len(batch), length, want.cond.shape[-1]), batch
        torch.testing.assert_close(got.cond, want.cond, rtol=1e-5, atol=1e-5)
        if with_uncond:  # the empty prompt's row padded to the step's length, like the batch encode pads it
            torch.testing.assert_close(got.uncond, want.uncond, rtol=1e-5, atol=1e-5)
        else:
            assert got.uncond is None
        if family == "sdxl":
            torch.testing.assert_close(got.pooled, want.pooled, rtol=1e-5, atol=1e-5)
        assert (got.prompts_cut, got.tokens_lost) == (want.prompts_cut, want.tokens_lost), batch
    # the counts are the batch's own: the long prompt is cut only by truncate, and cut once per occurrence
    lost = cached.encode([LONG, LONG, SHORT], with_uncond=False)
    assert (lost.prompts_cut > 0) == (overflow == "truncate") and lost.tokens_lost % 2 == 0
    with pytest.raises(KeyError, match="not in the text embedding cache"):
        cached.encode(["a prompt that the run never gave"])


def test_a_run_frees_the_text_encoders_and_trains_the_same_lora(tmp_path, monkeypatch):
    import trainer.parts as parts

    refs, alive_when_the_reward_model_loads = [], []

    def loading(*args, **kwargs):
        base = load_base_model(*args, **kwargs)
        refs.append(weakref.ref(base.text_encoder))
        return base

    def loading_reward(*args, **kwargs):  # the memory must be free by then, not only once set-up returns
        gc.collect()
        alive_when_the_reward_model_loads.append(refs[-1]() is not None)
        return load_preference_model(*args, **kwargs)

    from longalign_core.preference import load_preference_model

    monkeypatch.setattr(parts, "load_base_model", loading)
    monkeypatch.setattr(parts, "load_preference_model", loading_reward)
    args = ["--train-steps", "2", *FAST, "--validation-prompts", "2"]
    plain = Trainer(TrainConfig.from_args(["--output-dir", str(tmp_path / "plain"), *args]))
    cached = Trainer(TrainConfig.from_args(["--output-dir", str(tmp_path / "cached"), *args,
                                            "--cache-text-embeddings"]))
    assert alive_when_the_reward_model_loads == [True, False]
    gc.collect()
    assert refs[1]() is None and cached.parts.text.encoder is None and cached.parts.base.text_encoder is None
    # every training and validation prompt and the empty prompt are cached
    assert set(cached.parts.text.cache.rows) == set(cached.parts.data.prompts) | set(cached.parts.data.validation_prompts) | {""}
    # the preference model scores against pinned features: its text tower is gone, its image tower stays
    assert cached.parts.scoring.judge.text_tower_dropped and cached.parts.scoring.judge.model.text_model is None
    assert not plain.parts.scoring.judge.text_tower_dropped and plain.parts.scoring.judge.model.text_model is not None
    assert {k[0] for k in cached.parts.scoring.judge._longalign_pinned_text} == set(cached.parts.data.prompts) | set(cached.parts.data.validation_prompts)
    tower = sum(p.numel() for m in (plain.parts.scoring.judge.model.text_model, plain.parts.scoring.judge.model.text_projection)
                for p in m.parameters())
    assert sum(p.numel() for p in cached.parts.scoring.judge.model.parameters()) == \
        sum(p.numel() for p in plain.parts.scoring.judge.model.parameters()) - tower
    a, b = load_file(str(plain.train())), load_file(str(cached.train()))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    logs = [(tmp_path / run / "train_log.csv").read_text().splitlines() for run in ("plain", "cached")]
    header = logs[0][0].split(",")
    assert logs[1][0] == logs[0][0] and len(logs[0]) == len(logs[1]) == 3
    for row_a, row_b in zip(logs[0][1:], logs[1][1:]):  # the same loss at every step
        loss_a, loss_b = (float(r.split(",")[header.index("loss")]) for r in (row_a, row_b))
        assert loss_b == pytest.approx(loss_a, rel=1e-4, abs=1e-6)


def test_dry_run_lists_the_cache_instead_of_the_encoders(tmp_path, capsys):
    assert main(["--dry-run", "--output-dir", str(tmp_path / "run"), *FAST, "--train-steps", "4",
                 "--cache-text-embeddings"]) == 0
    report = capsys.readouterr().out
    assert "| text embeddings of " in report and "(cached on the CPU; text encoders freed)" in report
    assert "| text encoder |" not in report
    assert "image tower only, text features cached)" in report


def test_a_cache_that_cannot_fit_is_refused_in_one_paragraph(tmp_path, monkeypatch, capsys):
    import psutil

    class Tight:
        available = 2**20  # 1 MiB free: the embeddings of the built-in prompts need more

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tight())
    out = tmp_path / "run"
    assert cli(["--output-dir", str(out), *FAST, "--train-steps", "1", "--cache-text-embeddings"]) == 2
    err = capsys.readouterr().err
    assert "--cache-text-embeddings: the embeddings of the run's" in err and "GiB is available" in err
    assert "drop --cache-text-embeddings" in err and "Traceback" not in err
    assert not (out / "longalign_lora.safetensors").exists() and not list(out.glob("checkpoint*"))
