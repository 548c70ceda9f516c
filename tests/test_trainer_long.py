"""Long captions (~300 and ~700 merged tokens, past the 240 budget) through every stage and branch of the
trainer: no crash, and the conditioning length and the tokens lost are exactly what the overflow policy says."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from trainer.config import TrainConfig
from trainer.finetune import Trainer
from trainer_support import FAST, long_caption, merged_tokens, one_thread, run_module  # noqa: F401

BUDGET = 240
QUICK = [*FAST, "--sample-steps", "2", "--sample-grad-steps", "1", "--train-steps", "1", "--dump-debug"]


@pytest.fixture(scope="module")
def captions():
    return {"300": long_caption(300), "700": long_caption(700, offset=1), "val": long_caption(700, offset=2),
            "300b": long_caption(300, offset=3), "700b": long_caption(700, offset=4)}


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory, captions):
    folder = tmp_path_factory.mktemp("long_prompts")
    (folder / "train.txt").write_text(captions["300"] + "\n" + captions["700"] + "\n")
    (folder / "val.txt").write_text(captions["val"] + "\n")
    return folder


def t5_lost(tiny_t5_dir, caption: str) -> int:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(tiny_t5_dir))(caption)["input_ids"]
    return max(0, len(ids) - 240)


def rows(path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def t5_args(t5: bool, tiny_t5_dir, tiny_adapter_dir) -> list[str]:
    return ["--t5-model", str(tiny_t5_dir), "--t5-adapter", str(tiny_adapter_dir)] if t5 else []


def test_the_captions_are_long(captions):
    counts = {k: merged_tokens(v) for k, v in captions.items()}
    assert 280 <= counts["300"] <= 330 and 280 <= counts["300b"] <= 330
    assert all(680 <= counts[k] <= 720 for k in ("700", "700b", "val"))


@pytest.mark.parametrize("t5", [False, True], ids=["clip", "clip+t5"])
@pytest.mark.parametrize("overflow", ["truncate", "extend"])
def test_reward_stage(tmp_path, prompt_files, captions, overflow, t5, tiny_t5_dir, tiny_adapter_dir):
    out = tmp_path / "run"
    cfg = TrainConfig.from_args(["--output-dir", str(out), *QUICK, "--prompts", str(prompt_files / "train.txt"),
                                 "--validation-prompts", str(prompt_files / "val.txt"), "--overflow", overflow,
                                 *t5_args(t5, tiny_t5_dir, tiny_adapter_dir)])
    Trainer(cfg).train()
    m300, m700 = merged_tokens(captions["300"]), merged_tokens(captions["700"])
    clip_len = BUDGET if overflow == "truncate" else BUDGET * math.ceil(max(m300, m700) / BUDGET)
    length = clip_len + (240 if t5 else 0)
    dump = torch.load(out / "debug" / "rank0-step000000.pt", weights_only=True)
    assert dump["cond_length"] == dump["uncond_length"] == length
    (row,) = rows(out / "train_log.csv")
    assert float(row["cond_length"]) == length
    if overflow == "truncate":
        lost = (m300 - BUDGET) + (m700 - BUDGET)
        assert (float(row["prompts_cut"]), float(row["tokens_lost"])) == (2, lost)
        assert f"2 training prompts were cut, {lost} conditioning tokens lost" in (out / "report.md").read_text()
    else:
        assert (float(row["prompts_cut"]), float(row["tokens_lost"])) == (0, 0)
    expected_t5 = sum(t5_lost(tiny_t5_dir, captions[k]) for k in ("300", "700")) if t5 else 0
    assert float(row["t5_tokens_lost"]) == expected_t5
    val = rows(out / "validation.csv")
    assert [r["step"] for r in val] == ["0", "1"]
    assert float(val[0]["tokens_lost"]) == (merged_tokens(captions["val"]) - BUDGET if overflow == "truncate" else 0)


@pytest.fixture(scope="module")
def pairs_folder(tmp_path_factory, captions):
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("long_pairs")
    for length in ("300", "700"):
        caps = [captions[length], captions[length + "b"], long_caption(int(length), offset=5)]
        ds = datasets.Dataset.from_dict(
            {"image": [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in caps],
             "caption": caps},
            features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}))
        ds.save_to_disk(str(folder / length))
    return folder


@pytest.mark.parametrize("t5,overflow,length", [(False, "extend", "700"), (True, "extend", "300"),
                                                (False, "truncate", "700"), (True, "truncate", "700")])
def test_align_stage(tmp_path, pairs_folder, captions, t5, overflow, length, tiny_t5_dir, tiny_adapter_dir):
    out = tmp_path / "run"
    cfg = TrainConfig.from_args(["--output-dir", str(out), *QUICK, "--stage", "align", "--prompts",
                                 str(pairs_folder / length), "--caption-dropout", "0", "--overflow", overflow,
                                 *t5_args(t5, tiny_t5_dir, tiny_adapter_dir)])
    trainer = Trainer(cfg)
    held_out = trainer.parts.data.validation_prompts
    assert len(held_out) == 1 and len(trainer.parts.data.align_rows) == 2
    training = [trainer.parts.data.align.captions[i] for i in trainer.parts.data.align_rows]
    assert held_out[0] not in training
    trainer.train()
    merged = [merged_tokens(c) for c in training]
    (row,) = rows(out / "train_log.csv")
    extra = 240 if t5 else 0
    if overflow == "extend":
        clip_lengths = {BUDGET * math.ceil(m / BUDGET) for m in merged}
        assert len(clip_lengths) == 1  # both training captions round up to the same multiple
        assert float(row["cond_length"]) == clip_lengths.pop() + extra
        assert float(row["tokens_lost"]) == 0
    else:
        assert float(row["cond_length"]) == BUDGET + extra
        assert float(row["prompts_cut"]) == 2  # two rows drawn (with replacement), both over the budget
        assert float(row["tokens_lost"]) in {2 * (merged[0] - BUDGET), sum(merged) - 2 * BUDGET,
                                             2 * (merged[1] - BUDGET)}
    assert float(row["loss"]) > 0


def test_overflow_error_names_the_prompt(tmp_path, prompt_files):
    from longalign_core.errors import BadInputError

    cfg = TrainConfig.from_args(["--output-dir", str(tmp_path / "run"), *QUICK, "--prompts",
                                 str(prompt_files / "train.txt"), "--validation-prompts",
                                 str(prompt_files / "val.txt"), "--overflow", "error"])
    with pytest.raises(BadInputError, match=r"needs \d+ tokens but --token-budget is 240 and --overflow is error"):
        Trainer(cfg).train()


@pytest.mark.parametrize("overflow,t5", [("extend", True), ("truncate", False)])
def test_two_processes_with_captions_of_different_lengths(tmp_path, prompt_files, captions, overflow, t5,
                                                          tiny_t5_dir, tiny_adapter_dir):
    """torchrun, 2 CPU processes (gloo), batch 1 each: one rank gets the ~300-token caption, the other the
    ~700-token one. Each rank's CFG rows share one length; logged statistics are reduced over both. The truncate
    run keeps gradients at 2 steps of its chain (DDP reduces the gradient of two checkpointed UNet calls)."""
    out = tmp_path / "ddp"
    chain = ["--sample-steps", "4", "--sample-grad-steps", "2"] if overflow == "truncate" else []
    proc = run_module(["--output-dir", str(out), *QUICK, *chain, "--train-batch-size", "1", "--prompts",
                       str(prompt_files / "train.txt"), "--validation-prompts", str(prompt_files / "val.txt"),
                       "--overflow", overflow, "--reward-direction", "batch", *t5_args(t5, tiny_t5_dir, tiny_adapter_dir)],
                      nproc=2, port=29533 if t5 else 29534)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "processes = 2" in proc.stdout
    r0 = torch.load(out / "debug" / "rank0-step000000.pt", weights_only=True)
    r1 = torch.load(out / "debug" / "rank1-step000000.pt", weights_only=True)
    assert r0["lora_checksum"] == pytest.approx(r1["lora_checksum"], rel=1e-9)
    m300, m700 = merged_tokens(captions["300"]), merged_tokens(captions["700"])
    extra = 240 if t5 else 0
    for r in (r0, r1):
        assert r["cond_length"] == r["uncond_length"]
    # V of the step: the mean of both ranks' prompt embeddings (all-gathered), normalised, on both ranks.
    assert not torch.allclose(r0["t_bar_mean"], r1["t_bar_mean"])  # each rank saw its own caption
    gathered = torch.nn.functional.normalize((r0["t_bar_mean"] + r1["t_bar_mean"]) / 2, dim=0)
    torch.testing.assert_close(r0["direction"], gathered, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(r1["direction"], gathered, atol=1e-6, rtol=1e-5)
    (row,) = rows(out / "train_log.csv")
    if overflow == "extend":
        assert {r0["cond_length"], r1["cond_length"]} == {480 + extra, 720 + extra}
        assert float(row["cond_length"]) == 720 + extra and float(row["tokens_lost"]) == 0
    else:
        assert r0["cond_length"] == r1["cond_length"] == BUDGET
        assert float(row["prompts_cut"]) == 2  # summed over the two processes
        assert float(row["tokens_lost"]) == (m300 - BUDGET) + (m700 - BUDGET)
    assert [r["step"] for r in rows(out / "validation.csv")] == ["0", "1"]  # validated once, not per rank
