"""The trainer as a single-GPU user runs it (issue #21): the method stays LongAlign at small batches, nothing falls
back silently, captions are checked at load, the step fits (per-block checkpointing, the decode in pieces),
checkpoints hold what trains, and the reward-hacking flag means something. Each test fails on the trainer as it
was before these changes; expected values are written out here, not taken from the code under test."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from test_trainer_objective import clip_preprocess, tensor_of
from trainer.config import TrainConfig
from trainer.finetune import Trainer, cli
from trainer.seeding import step_generator
from trainer_support import FAST, one_thread, reward_loss  # noqa: F401  (one_thread: autouse fixture)

# Training prompts of plain sentences, their segments written out (independently of the splitter).
SEGMENTS = [["A red fox sits on a mossy rock.", "The sky is orange."],
            ["A lighthouse stands on a cliff.", "Waves crash below.", "Gulls circle the tower."],
            ["An old man reads a newspaper.", "His dog sleeps at his feet."],
            ["A bowl of lemons stands on a table.", "Light falls from the window."]]
PROMPTS = [" ".join(s) for s in SEGMENTS]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "train.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def t_bar_of(clip, segments: list[str]) -> torch.Tensor:
    """t̄ = mean_k normalize(text_features(segment k)), through transformers directly."""
    from longalign_core.clip_vocab import load_clip_tokenizer

    ids = load_clip_tokenizer()(segments, padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids
    with torch.no_grad():
        return F.normalize(tensor_of(clip.get_text_features(input_ids=ids)).float(), dim=-1).mean(0)


def spy_on_decode(monkeypatch):
    """Record every piece of images the reward stage decodes."""
    import trainer.objective as objective

    pieces, real = [], objective.decode

    def spy(vae, latents):
        pieces.append(real(vae, latents))
        return pieces[-1]

    monkeypatch.setattr(objective, "decode", spy)
    return pieces


def trainer_with(tmp_path, prompt_file, *extra) -> Trainer:
    t = Trainer(TrainConfig.from_args(["--output-dir", str(tmp_path / "run"), *FAST, "--train-batch-size", "1",
                                       "--prompts", str(prompt_file), "--validation-prompts", "0",
                                       "--reward-crop", "center", "--train-steps", "1", *extra]))
    t.parts.lora.unet.eval()  # no LoRA dropout: the images are a function of the weights alone
    return t


# ------------------------------------------------------------------------------------------------------------
# 1. V that does not depend on the batch size


def test_at_batch_one_the_text_relevant_part_is_the_decomposition_along_the_training_prompts_v(
        tmp_path, prompt_file, monkeypatch):
    """One process, batch 1: V comes from the training prompts, so the text-relevant part of the one image is
    x̂·(t̄ − (t̄·V)V) with V = normalize(mean of the four prompts' t̄) — not 0, as with the per-batch V."""
    t = trainer_with(tmp_path, prompt_file)
    assert t.parts.scoring.reward_v.mode == "training"  # auto at 1 prompt per step
    pieces = spy_on_decode(monkeypatch)
    prompt = [PROMPTS[1]]
    loss, stats = reward_loss(t, prompt, step_generator(0, 0, 0))
    clip = t.parts.scoring.judge.model
    v = F.normalize(torch.stack([t_bar_of(clip, segs) for segs in SEGMENTS]).mean(0), dim=0)
    t_bar = t_bar_of(clip, SEGMENTS[1])
    pixels = clip_preprocess(pieces[0].detach(), t.parts.scoring.judge.image_size, t.parts.scoring.judge.mean, t.parts.scoring.judge.std)
    with torch.no_grad():
        x_hat = F.normalize(tensor_of(clip.get_image_features(pixel_values=pixels)).float(), dim=-1)[0]
    eta = t_bar @ v
    relevant = float(x_hat @ (t_bar - eta * v))
    irrelevant = float(eta * (x_hat @ v))
    assert abs(relevant) > 1e-3  # the per-batch V makes this exactly 0 (next test)
    assert stats["text_relevant"] == pytest.approx(relevant, abs=1e-6)
    assert stats["text_irrelevant"] == pytest.approx(irrelevant, abs=1e-6)
    assert float(loss.detach()) == pytest.approx(0.5 * (1 - (relevant + 0.3 * irrelevant)), abs=1e-6)


def test_the_per_batch_v_of_the_release_collapses_at_batch_one_and_says_so(tmp_path, prompt_file, capsys):
    from trainer.direction import resolve_direction

    t = trainer_with(tmp_path, prompt_file, "--reward-direction", "batch")
    assert "warning: --reward-direction batch with 1 prompts per optimizer step" in capsys.readouterr().out
    _, stats = reward_loss(t, [PROMPTS[1]], step_generator(0, 0, 0))
    assert abs(stats["text_relevant"]) < 1e-6  # V is the prompt itself: t⊥ = 0
    assert resolve_direction("auto", 48) == ("batch", None)  # the release's 8 × 6 GPUs
    assert resolve_direction("auto", 31)[0] == "training"
    assert resolve_direction("reference", 1) == ("reference", None)


def test_the_per_batch_v_covers_every_micro_batch_of_the_step(tmp_path, prompt_file, monkeypatch):
    """--reward-direction batch with 2 micro-batches of 1: V of the step is normalize(mean t̄) over both
    micro-batches' prompts (the prompts each micro-batch really drew), the same V for both."""
    t = trainer_with(tmp_path, prompt_file, "--reward-direction", "batch", "--gradient-accumulation-steps", "2")
    import inspect

    from trainer import objective

    seen = []
    real = objective.reward_loss

    def spy(*args, **kwargs):
        given = inspect.signature(real).bind(*args, **kwargs).arguments
        seen.append((list(given["prompts"]), given["direction"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(objective, "reward_loss", spy)
    t.optimizer_step(0)
    (p0, v0), (p1, v1) = seen
    clip = t.parts.scoring.judge.model
    t_bars = [t_bar_of(clip, SEGMENTS[PROMPTS.index(p)]) for p in p0 + p1]
    expected = F.normalize(torch.stack(t_bars).mean(0), dim=0)
    torch.testing.assert_close(v0, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(v1, expected, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# 2.–3. No silent fallback; empty captions refused at load


def test_a_real_model_needs_a_reward_model_and_prompts(tmp_path, prompt_file, capsys):
    out = ["--output-dir", str(tmp_path / "run"), "--model", str(tmp_path / "sd15")]
    assert cli(out) == 2
    err = capsys.readouterr().err
    assert "no --reward-model was given" in err and "--reward-model embedded" in err and "Traceback" not in err
    assert cli([*out, "--reward-model", "/models/Denscore"]) == 2
    err = capsys.readouterr().err
    assert "no --prompts were given" in err and "reference set that defines V" in err
    assert not (tmp_path / "run").exists()


def test_empty_captions_are_refused_at_load_with_their_place(tmp_path):
    import datasets

    from longalign_core.errors import BadInputError
    from trainer.data import load_prompts

    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text('{"caption": "A red fox."}\n\n{"caption": "   "}\n')
    with pytest.raises(BadInputError, match=rf"{jsonl}:3: 'caption' is empty \(only spaces\)"):
        load_prompts(str(jsonl))
    datasets.Dataset.from_dict({"caption": ["A red fox.", "", "A cat."]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(BadInputError, match=r"ds: row 1 of column 'caption' is empty"):
        load_prompts(str(tmp_path / "ds"))
    txt = tmp_path / "captions.txt"
    txt.write_text("A red fox.\n\n  \nA cat.\n")
    assert load_prompts(str(txt)) == ["A red fox.", "A cat."]  # a text file's blank lines only separate prompts


# ------------------------------------------------------------------------------------------------------------
# 4. Fit the card


def test_reward_stage_checkpoints_unet_blocks_and_decodes_in_pieces_with_the_same_gradient(
        tmp_path, prompt_file, monkeypatch):
    t = trainer_with(tmp_path, prompt_file, "--train-batch-size", "3", "--decode-batch", "2")
    unet = t.parts.lora.module
    calls = []
    real_eps = t.parts.lora.eps
    monkeypatch.setattr(t.parts.lora, "eps", lambda *a: calls.append((torch.is_grad_enabled(),
                                                                   unet.is_gradient_checkpointing)) or real_eps(*a))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in t.parts.lora.params:
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    pieces = spy_on_decode(monkeypatch)

    def loss_and_grad():
        loss, stats = reward_loss(t, PROMPTS[:3], step_generator(0, 0, 0))
        return loss.detach(), stats, torch.cat([g.flatten() for g in torch.autograd.grad(loss, t.parts.lora.params)])

    in_pieces = loss_and_grad()
    assert [len(p) for p in pieces] == [2, 1]
    # FAST: 4 DDIM steps, gradients at 2. Sampling keeps no activations (the gradient steps too: only their
    # inputs); the backward recomputes the 2 gradient steps with the UNet's blocks checkpointed (then one block's
    # activations at a time; block checkpoints during sampling would keep their inputs for every gradient step).
    assert calls[:6] == [(False, False)] * 4 + [(True, True)] * 2
    assert not unet.is_gradient_checkpointing
    t.cfg = dataclasses.replace(t.cfg, decode_batch=3)
    whole = loss_and_grad()
    assert [len(p) for p in pieces[2:]] == [3]
    torch.testing.assert_close(torch.cat(pieces[:2]), pieces[2], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(in_pieces[0], whole[0], atol=1e-6, rtol=1e-5)
    assert in_pieces[1]["text_relevant"] == pytest.approx(whole[1]["text_relevant"], abs=1e-6)
    scale = float(whole[2].abs().max())
    assert scale > 0
    torch.testing.assert_close(in_pieces[2], whole[2], atol=1e-5 * scale, rtol=1e-4)


def test_default_decode_piece_is_one_512px_image():
    from trainer.objective import decode_batch

    assert [decode_batch(TrainConfig(resolution=r)) for r in (1024, 512, 256, 64)] == [1, 1, 4, 64]
    assert decode_batch(TrainConfig(resolution=512, decode_batch=2)) == 2


# ------------------------------------------------------------------------------------------------------------
# 5. Checkpoints of what trains


def test_checkpoints_hold_the_lora_not_the_unet_and_export_a_lora_file(tmp_path):
    from trainer.checkpoints import checkpoints

    args = [*FAST, "--sample-steps", "2", "--sample-grad-steps", "1", "--seed", "4"]
    one = Trainer(TrainConfig.from_args(["--output-dir", str(tmp_path / "one"), *args, "--train-steps", "1"]))
    lora_params = sum(p.numel() for p in one.parts.lora.params)
    one_file = one.train()
    two = Trainer(TrainConfig.from_args(["--output-dir", str(tmp_path / "two"), *args, "--train-steps", "2",
                                         "--checkpoint-every", "1"]))
    two.train()
    (folder,) = checkpoints(tmp_path / "two")
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    unet_params = sum(p.numel() for p in two.parts.lora.module.parameters())
    # LoRA (fp32) + AdamW's two moments + the kohya export (fp16) + small files; the UNet alone is far larger
    assert sum(files.values()) < 4 * 4 * lora_params + 200_000 < 4 * unet_params, files
    assert "model.safetensors" not in files and "lora_weights.safetensors" in files
    with safe_open(str(folder / "lora_weights.safetensors"), "pt") as f:
        assert all("lora_" in k for k in f.keys())
        assert sum(np.prod(f.get_slice(k).get_shape()) for k in f.keys()) == lora_params
    # the LoRA file of step 1 is the LoRA a 1-step run ends with
    exported, final = load_file(str(folder / "longalign_lora.safetensors")), load_file(str(one_file))
    assert exported.keys() == final.keys()
    for k in final:
        torch.testing.assert_close(exported[k], final[k], msg=k)
    with safe_open(str(folder / "longalign_lora.safetensors"), "pt") as f:
        assert f.metadata()["steps"] == "1" and f.metadata()["longalign"] == "trainer-lora"
    assert json.loads((folder / "trainer_state.json").read_text())["step"] == 1


# ------------------------------------------------------------------------------------------------------------
# 6. A reward-hacking flag that means something


def synthetic(relevant: list[float], irrelevant: list[float], noise: float, seed: int, prompts: int = 8):
    """Per-prompt validation rows: each prompt has its own level, plus fresh noise at every validation."""
    rng = np.random.default_rng(seed)
    base_r, base_i = rng.normal(0.05, 0.02, prompts), rng.normal(0.20, 0.02, prompts)
    rows = []
    for k, (r, i) in enumerate(zip(relevant, irrelevant)):
        for p in range(prompts):
            rows.append({"step": float(k * 100), "prompt": float(p),
                         "text_relevant": base_r[p] + r + rng.normal(0, noise),
                         "text_irrelevant": base_i[p] + i + rng.normal(0, noise)})
    return rows


def test_reward_hacking_flag_on_synthetic_curves():
    from trainer.report import reward_hacking

    sigma, n = 0.005, 10
    flat = [0.0] * n
    for seed in range(20):  # flat noise: never flagged
        assert reward_hacking(synthetic(flat, flat, sigma, seed))[0] is None, seed
    # early hacking (relevant down 5σ, irrelevant up 5σ within three validations), then a flat end
    early_r = [0.0, -0.01, -0.02, -0.025] + [-0.025] * (n - 4)
    early_i = [0.0, 0.01, 0.02, 0.025] + [0.025] * (n - 4)
    for seed in range(5):
        warning, _ = reward_hacking(synthetic(early_r, early_i, sigma, seed))
        assert warning and "from step 0 to step 900" in warning, seed
    # steady alignment: relevant up, irrelevant up too: not hacking
    steady = [0.003 * k for k in range(n)]
    for seed in range(5):
        assert reward_hacking(synthetic(steady, steady, sigma, seed))[0] is None, seed
    # alignment, then hacking from step 500 on, ending below the start: flagged, naming step 500 as the best
    late_r = [0.004 * k for k in range(6)] + [0.02 - 0.01 * k for k in range(1, n - 5)]
    late_i = [0.0] * 6 + [0.01 * k for k in range(1, n - 5)]
    warning, _ = reward_hacking(synthetic(late_r, late_i, sigma, 0))
    assert warning and "from step 0 to step 900" in warning and "validation was step 500" in warning
    # the old check's blind spot, a change of 1e-6 at the end, is noise here
    tiny_r, tiny_i = flat[:-1] + [-1e-6], flat[:-1] + [1e-6]
    assert reward_hacking(synthetic(tiny_r, tiny_i, sigma, 0))[0] is None
    assert "too few" in reward_hacking(synthetic(early_r, early_i, sigma, 0, prompts=1))[1]


def test_report_shows_the_check_and_the_first_and_last_validation(tmp_path):
    import csv

    from trainer.report import PER_PROMPT_FILE, write_report

    rows = synthetic([0.0, -0.02, -0.03], [0.0, 0.02, 0.03], 0.002, 0)
    with (tmp_path / PER_PROMPT_FILE).open("w", newline="") as f:
        w = csv.DictWriter(f, ["step", "prompt", "text_relevant", "text_irrelevant"])
        w.writeheader()
        w.writerows(rows)
    with (tmp_path / "validation.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "denscore", "text_relevant", "text_irrelevant"])
        for step in (0.0, 100.0, 200.0):
            r = np.mean([x["text_relevant"] for x in rows if x["step"] == step])
            i = np.mean([x["text_irrelevant"] for x in rows if x["step"] == step])
            w.writerow([int(step), r + i, r, i])
    write_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    first = np.mean([x["text_relevant"] for x in rows if x["step"] == 0.0]) * 100
    assert f"| text_relevant ×100 | {first:.2f} |" in report
    assert "WARNING: possible reward hacking: from step 0" in report
    assert (tmp_path / "report.png").stat().st_size > 0


def test_eight_held_out_prompts_by_default_when_the_set_allows():
    from trainer.data import split_validation

    assert TrainConfig().validation_prompts is None
    pool = [f"Prompt {i}." for i in range(300)]
    assert len(split_validation(pool, None, 0, "p")[0]) == 8
    assert len(split_validation(pool[:20], None, 0, "p")[0]) == 4  # a fifth of a small set
    assert len(split_validation(pool[:2], None, 0, "p")[0]) == 1
