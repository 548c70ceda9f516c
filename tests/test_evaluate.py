"""``python -m trainer.evaluate``: the statistics against values worked out by hand, shared noise across arms
and runs, strength 0 = the base, resume after an interruption, and bad input (issue 19).

The runs use the built-in tiny models at 32 px with 2 DDIM steps and LoRAs of random (up, down) pairs written
in the trainer's kohya format for the embedded UNet (or for the SDXL-shaped one, as a LoRA of another
architecture)."""

from __future__ import annotations

import csv
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO

pytest.importorskip("diffusers")

from trainer_support import one_thread  # noqa: E402,F401  (autouse: one intra-op thread)

FAST = ["--steps", "2", "--resolution", "32", "--seeds", "2", "--batch-size", "2", "--bootstrap", "200"]
PROMPTS = ["A red fox sits on a mossy rock. Behind it a waterfall drops into a pool. The sky is orange.",
           "A lighthouse keeper climbs the stairs. Gulls circle the boats in the harbour.",
           "An old bridge in soft morning light. A heron stands in the river. Willows lean over the water."]


def quiet(*_args, **_kwargs):
    pass


def random_lora(path, unet_dir, seed: int, scale: float = 0.1, metadata: dict | None = None):
    """Random rank-4 pairs on every LongAlign target of the UNet in ``unet_dir``, saved with kohya keys."""
    from longalign_core.lora import lora_targets, save_kohya

    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for t in lora_targets(unet_dir):
        conv = (1, 1) if t.kind == "conv" else ()
        pairs[t.path] = (torch.randn((t.weight_shape[0], 4, *conv), generator=g) * scale,
                         torch.randn((4, *t.weight_shape[1:]), generator=g) * scale)
    return save_kohya(pairs, path, metadata or {"format": "kohya"})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from trainer.loading.embedded import embedded_pipeline_dir, embedded_sdxl_pipeline_dir

    folder = tmp_path_factory.mktemp("eval_inputs")
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    sd = embedded_pipeline_dir(0) / "unet"
    return {"prompts": prompts, "lora_a": random_lora(folder / "a.safetensors", sd, 1),
            "lora_b": random_lora(folder / "b.safetensors", sd, 2),
            "lora_sdxl": random_lora(folder / "xl.safetensors", embedded_sdxl_pipeline_dir(0) / "unet", 3)}


def evaluate(out, files, *args, on_unit=None, announce=quiet):
    from trainer.evaluate import EvalConfig, Evaluation

    cfg = EvalConfig.from_args([*FAST, "--prompts", str(files["prompts"]), "--output-dir", str(out), *args])
    evaluation = Evaluation(cfg, announce=announce)
    evaluation.run(on_unit=on_unit)
    return evaluation


def rows_of(out, arm=None):
    with open(out / "scores.csv", newline="", encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if arm is None or r["arm"] == arm]


def pixels(out, arm, prompt, seed):
    from PIL import Image

    with Image.open(out / "images" / arm / f"p{prompt:03d}-s{seed}.png") as img:
        return np.asarray(img.convert("RGB"))


SCORE_FIELDS = ("prompt", "seed", "sentence", "text", "score", "text_relevant", "text_irrelevant", "reweighted")


def numbers(rows):
    return [tuple(r[k] for k in SCORE_FIELDS) for r in rows]


# ------------------------------------------------------------------------------------------------------------
# Statistics on a hand-made scores.csv
# ------------------------------------------------------------------------------------------------------------

#: base: (prompt, seed) -> per sentence (score, text_relevant, text_irrelevant); image means written beside
BASE = {(0, 0): [(0.20, 0.05, 0.15), (0.30, 0.07, 0.23)],  # 0.25, 0.06, 0.19
        (0, 1): [(0.22, 0.04, 0.18), (0.26, 0.06, 0.20)],  # 0.24, 0.05, 0.19
        (1, 0): [(0.10, 0.02, 0.08)],  # 0.10, 0.02, 0.08
        (1, 1): [(0.14, 0.04, 0.10)],  # 0.14, 0.04, 0.10
        (2, 0): [(0.30, 0.10, 0.20), (0.34, 0.12, 0.22)],  # 0.32, 0.11, 0.21
        (2, 1): [(0.28, 0.08, 0.20), (0.32, 0.10, 0.22)]}  # 0.30, 0.09, 0.21
#: the LoRA arm: base + these text-relevant changes per sentence (the text-irrelevant part unchanged), so each
#: image's Δscore = Δrelevant: (0,0) +0.01, (0,1) -0.01, (1,0) 0 (a tie), (1,1) +0.04, (2,0) +0.03, (2,1) +0.01
DELTA = {(0, 0): [0.035, -0.015], (0, 1): [-0.01, -0.01], (1, 0): [0.0], (1, 1): [0.04],
         (2, 0): [0.05, 0.01], (2, 1): [0.01, 0.01]}


def write_scores(path, arms: dict[str, dict], omega=0.3):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["arm", "lora", "strength", "prompt", "seed", "sentence", "text",
                                               "score", "text_relevant", "text_irrelevant", "reweighted"])
        writer.writeheader()
        for arm, images in arms.items():
            for (p, s), sentences in images.items():
                for k, (score, rel, irr) in enumerate(sentences, 1):
                    writer.writerow({"arm": arm, "lora": "" if arm == "base" else f"{arm}.safetensors",
                                     "strength": "" if arm == "base" else "1", "prompt": p, "seed": s,
                                     "sentence": k, "text": f"sentence {k} of prompt {p}", "score": repr(score),
                                     "text_relevant": repr(rel), "text_irrelevant": repr(irr),
                                     "reweighted": repr(rel + omega * irr)})


def lora_arm():
    return {key: [(s + d, r + d, i) for (s, r, i), d in zip(sentences, DELTA[key])]
            for key, sentences in BASE.items()}


def test_statistics_match_values_worked_out_by_hand(tmp_path):
    from trainer.evaluate.stats import bootstrap_indices, interval, read_scores, summarize

    write_scores(tmp_path / "scores.csv", {"base": BASE, "lora": lora_arm()})
    summary = summarize(read_scores(tmp_path / "scores.csv"), n_boot=2000, boot_seed=7)
    base, lora = summary.arms
    assert (summary.prompts, summary.seeds, base.name, lora.name, base.images) == (3, 2, "base", "lora", 6)
    # means over prompts of each prompt's mean over seeds: score (0.245 + 0.12 + 0.31) / 3
    assert base.means["score"].mean == pytest.approx(0.225)
    assert base.means["text_relevant"].mean == pytest.approx((0.055 + 0.03 + 0.10) / 3)
    assert base.means["text_irrelevant"].mean == pytest.approx((0.19 + 0.09 + 0.21) / 3)
    # with 3 prompts the bootstrap mean takes its extreme values (all three draws the lowest / the highest
    # prompt) with probability 1/27 = 3.7 % > 2.5 %: the 95 % interval is exactly [min, max] of the prompts
    assert (base.means["score"].lo, base.means["score"].hi) == pytest.approx((0.12, 0.31))
    # paired per-prompt differences: Δscore 0, 0.02, 0.02 -> mean 0.01333, interval [0, 0.02]
    assert lora.diffs["score"].mean == pytest.approx(0.04 / 3)
    assert (lora.diffs["score"].lo, lora.diffs["score"].hi) == pytest.approx((0.0, 0.02))
    assert not lora.diffs["score"].excludes_zero
    assert lora.diffs["text_relevant"].mean == pytest.approx(0.04 / 3)
    assert (lora.diffs["text_irrelevant"].mean, lora.diffs["text_irrelevant"].lo,
            lora.diffs["text_irrelevant"].hi) == pytest.approx((0, 0, 0), abs=1e-12)
    # wins: images win, lose | tie, win | win, win -> per prompt 0.5, 0.75, 1 -> 0.75, interval [0.5, 1]
    for metric in ("score", "text_relevant"):
        w = lora.wins[metric]
        assert (w.mean, w.lo, w.hi) == pytest.approx((0.75, 0.5, 1.0))
    # sentences: mean Δrelevant over the seeds, per (prompt, sentence)
    assert [(c.prompt, c.sentence, round(c.delta, 6)) for c in lora.gained] == \
        [(2, 1, 0.03), (1, 1, 0.02), (0, 1, 0.0125), (2, 2, 0.01)]
    assert [(c.prompt, c.sentence, round(c.delta, 6)) for c in lora.lost] == [(0, 2, -0.0125)]
    assert lora.hacking is None
    # the documented resampling recipe, on per-prompt values written out here
    idx = bootstrap_indices(3, 2000, 7)
    expected = np.random.default_rng(7).integers(0, 3, size=(2000, 3))
    assert (idx == expected).all()
    assert interval(np.array([0.0, 0.02, 0.02]), idx) == pytest.approx((0.0, 0.02))


def test_bootstrap_interval_agrees_with_the_normal_approximation():
    """Many prompts: the percentile interval of a mean is about mean ± 1.96 standard errors."""
    from trainer.evaluate.stats import bootstrap_indices, interval

    values = np.random.default_rng(3).normal(0.5, 2.0, size=400)
    lo, hi = interval(values, bootstrap_indices(400, 4000, 1))
    se = values.std(ddof=1) / np.sqrt(400)
    assert lo == pytest.approx(values.mean() - 1.96 * se, abs=0.15 * se)
    assert hi == pytest.approx(values.mean() + 1.96 * se, abs=0.15 * se)


def test_reward_hacking_flag(tmp_path):
    """Text-relevant down and text-irrelevant up, prompt after prompt, beyond 3 standard errors: flagged; the
    same fall in the relevant part with the irrelevant part flat is not."""
    from trainer.evaluate.stats import read_scores, summarize

    d_rel = [-0.020, -0.021, -0.019, -0.022, -0.018, -0.020]
    d_irr = [0.030, 0.031, 0.029, 0.032, 0.028, 0.030]
    base = {(p, 0): [(0.3, 0.1, 0.2)] for p in range(6)}
    hacked = {(p, 0): [(0.3 + d_rel[p] + d_irr[p], 0.1 + d_rel[p], 0.2 + d_irr[p])] for p in range(6)}
    flat = {(p, 0): [(0.3 + d_rel[p], 0.1 + d_rel[p], 0.2 + (0.001 if p % 2 else -0.001))] for p in range(6)}
    write_scores(tmp_path / "scores.csv", {"base": base, "hacked": hacked, "flat": flat})
    _, hacked_arm, flat_arm = summarize(read_scores(tmp_path / "scores.csv")).arms
    assert hacked_arm.hacking and "reward hacking" in hacked_arm.hacking
    assert "-2.00 ±" in hacked_arm.hacking_checked and "+3.00 ±" in hacked_arm.hacking_checked
    assert flat_arm.hacking is None


def test_report_only_writes_the_hand_made_numbers(tmp_path, capsys):
    from longalign_core.errors import run_cli
    from trainer.evaluate import main

    write_scores(tmp_path / "scores.csv", {"base": BASE, "lora": lora_arm()})
    assert run_cli(main, ["--report-only", "--output-dir", str(tmp_path), "--bootstrap-seed", "7"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| base | 6 | 22.50 [12.00, 31.00] |" in report
    assert "| lora | +1.33 [+0.00, +2.00] | +1.33 [+0.00, +2.00] | +0.00 [+0.00, +0.00] |" in report
    assert "75% [50%, 100%] | 75% [50%, 100%] |" in report
    assert "**no measurable difference**" in report
    assert "| gained | +3.00 | 2 | sentence 1 of prompt 2 |" in report
    assert (tmp_path / "report.png").stat().st_size > 1000
    assert "lora: Denscore" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------------
# Runs on the tiny models
# ------------------------------------------------------------------------------------------------------------


def test_arms_share_noise_across_runs_and_loras(tmp_path, files):
    """The base arm's images and scores are the same in a run with LoRA a and a run with LoRA b; each LoRA arm
    differs from the base (the LoRA is really applied) and from the other LoRA."""
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    evaluate(run_a, files, "--lora", str(files["lora_a"]))
    evaluate(run_b, files, "--lora", str(files["lora_b"]))
    assert numbers(rows_of(run_a, "base")) == numbers(rows_of(run_b, "base"))
    assert len(rows_of(run_a, "base")) == 2 * (3 + 2 + 3)  # seeds × sentences
    for p in range(3):
        for s in (0, 1):
            base = pixels(run_a, "base", p, s)
            assert (base == pixels(run_b, "base", p, s)).all()
            assert (base != pixels(run_a, "a@1", p, s)).any()
            assert (pixels(run_a, "a@1", p, s) != pixels(run_b, "b@1", p, s)).any()
        assert (pixels(run_a, "base", p, 0) != pixels(run_a, "base", p, 1)).any()  # seeds differ
    report = (run_a / "report.md").read_text()
    assert "## Against the base" in report and "| a@1 |" in report
    assert len(list((run_a / "grids").glob("p*.jpg"))) == 3


def test_strength_zero_is_the_base(tmp_path, files):
    """A LoRA at strength 0 gives the base arm's images and scores, also right after the same LoRA at
    strength 1 (the base weights are restored exactly between arms)."""
    out = tmp_path / "zero"
    evaluate(out, files, "--lora", str(files["lora_a"]), "--lora", f"{files['lora_a']}:0")
    assert [a for a in dict.fromkeys(r["arm"] for r in rows_of(out))] == ["base", "a@1", "a@0"]
    assert numbers(rows_of(out, "a@0")) == numbers(rows_of(out, "base"))
    assert numbers(rows_of(out, "a@1")) != numbers(rows_of(out, "base"))
    for p in range(3):
        assert (pixels(out, "a@0", p, 1) == pixels(out, "base", p, 1)).all()


def test_resume_after_an_interruption_gives_the_same_scores(tmp_path, files):
    """Interrupted after 3 of 6 prompt groups, the last row cut mid-number as a kill during the write would leave
    it (every row of the group is there, one value is wrong): --resume keeps the 2 intact groups, redoes the
    other 4, and scores.csv is byte for byte the uninterrupted one."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    lora = ["--lora", str(files["lora_a"]), "--batch-size", "2"]  # 2 seeds per group: one prompt a group
    evaluate(whole, files, *lora)

    def stop(n):
        if n == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(cut, files, *lora, on_unit=stop)
    written = (cut / "scores.csv").read_text()
    full = (whole / "scores.csv").read_text()
    assert full.startswith(written) and written != full
    assert written.endswith("\n") and written[-5:-1].isdigit()
    (cut / "scores.csv").write_text(written[:-5])  # killed mid-write: "…,0.0123456789\n" -> "…,0.012345"
    redone = []
    from longalign_core.errors import BadConfigError

    with pytest.raises(BadConfigError, match="--resume"):
        evaluate(cut, files, *lora)  # the folder holds an evaluation: not without --resume
    with pytest.raises(BadConfigError, match="seeds: 2 then, 3 now"):
        evaluate(cut, files, *lora, "--resume", "--seeds", "3")
    evaluate(cut, files, *lora, "--resume", on_unit=redone.append)
    assert redone == [1, 2, 3, 4]
    assert (cut / "scores.csv").read_text() == full
    for arm in ("base", "a@1"):
        for p in range(3):
            assert (pixels(cut, arm, p, 0) == pixels(whole, arm, p, 0)).all()
    assert (cut / "report.md").read_text().split("## Time")[0] == (whole / "report.md").read_text().split("## Time")[0]


def test_no_arguments_picks_up_the_demo_lora(tmp_path, monkeypatch, files):
    """Without arguments the embedded model is evaluated with the LoRA ./dev run leaves in
    outputs/longalign-demo/, or alone when there is none (set-up only: the run itself is the benchmark's)."""
    from trainer.evaluate import EvalConfig, Evaluation

    monkeypatch.chdir(tmp_path)
    assert [a.name for a in Evaluation(EvalConfig(), announce=quiet).arms] == ["base"]
    demo = tmp_path / "outputs" / "longalign-demo" / "longalign_lora.safetensors"
    demo.parent.mkdir(parents=True)
    demo.write_bytes(files["lora_a"].read_bytes())
    evaluation = Evaluation(EvalConfig(), announce=quiet)
    assert [a.name for a in evaluation.arms] == ["base", "longalign_lora@1"]
    assert len(evaluation.prompts) == 64 and evaluation.cfg.steps == 10 and evaluation.cfg.resolution == 64
    assert not (tmp_path / "outputs" / "longalign-eval").exists()  # set-up writes nothing


def test_sdxl_shaped_model_and_the_lora_metadata_note(tmp_path, files):
    """The SDXL-shaped embedded model (two text encoders, size ids) runs; a LoRA trained with other text
    options than the evaluation's is evaluated, with a note saying so."""
    from trainer.loading.embedded import embedded_sdxl_pipeline_dir

    lora = random_lora(tmp_path / "xl.safetensors", embedded_sdxl_pipeline_dir(0) / "unet", 4,
                       metadata={"longalign": "trainer-lora", "split_mode": "reference", "token_budget": "240"})
    said = []
    out = tmp_path / "xl"
    evaluate(out, files, "--model", "embedded-sdxl", "--lora", str(lora), "--num-prompts", "1", "--seeds", "1",
             announce=said.append)
    assert any("trained with split_mode reference (now sentence)" in s for s in said)
    assert {r["arm"] for r in rows_of(out)} == {"base", "xl@1"}
    assert numbers(rows_of(out, "xl@1")) != numbers(rows_of(out, "base"))


def test_shipped_evaluation_prompts_are_held_out_and_long():
    from longalign_core.clip_vocab import load_clip_tokenizer
    from longalign_core.reference_direction import default_reference_prompts
    from trainer.evaluate import EVALUATION_PROMPTS

    prompts = [p for p in EVALUATION_PROMPTS.read_text(encoding="utf-8").splitlines() if p.strip()]
    assert len(prompts) >= 50 and len(set(prompts)) == len(prompts)
    assert not set(prompts) & set(default_reference_prompts())  # not the set that defines V
    tok = load_clip_tokenizer()
    lengths = [len(tok(p, add_special_tokens=False, verbose=False)["input_ids"]) for p in prompts]
    assert min(lengths) > 75  # every one is longer than CLIP's window
    assert all(p.count(". ") >= 4 for p in prompts)  # several sentences each


# ------------------------------------------------------------------------------------------------------------
# Bad input: one paragraph naming the option or file, exit 2, nothing written
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["other_architecture", "missing_prompts", "seeds_0", "arm_twice", "bad_strength"])
def test_bad_input_is_one_message_and_writes_nothing(tmp_path, files, case, capsys):
    from longalign_core.errors import run_cli
    from trainer.evaluate import main

    out = tmp_path / "out"
    a = str(files["lora_a"])
    args, expected = {
        "other_architecture": (["--lora", str(files["lora_sdxl"])],
                               r"--lora .*xl\.safetensors: LoRA pair \d+ .*expected up .* The base model here is "
                               r".*tiny-sd-v1.* \(SD1\.x\): give a LoRA made for it, not for another architecture"),
        "missing_prompts": (["--prompts", str(tmp_path / "nope.txt")], r"--prompts .*nope\.txt: no such prompts "
                                                                       r"file"),
        "seeds_0": (["--seeds", "0"], r"--seeds must be >= 1"),
        "arm_twice": (["--lora", a, "--lora", f"{a}:1"], r"--lora .*a\.safetensors:1 is given twice"),
        "bad_strength": (["--lora", f"{a}:nan"], r"--lora .*: the strength must be a finite number"),
    }[case]
    argv = [*FAST, "--output-dir", str(out)] + (["--prompts", str(files["prompts"])] if case != "missing_prompts"
                                                else []) + args
    assert run_cli(main, argv, prog="python -m trainer.evaluate") == 2
    err = capsys.readouterr().err
    assert re.search(expected, err), err
    assert err.startswith("python -m trainer.evaluate: error: ") and err.count("\n") == 1  # one paragraph
    assert "Traceback" not in err
    assert not out.exists()


def test_the_command_line_exits_2_on_a_mistake(tmp_path):
    """The real ``python -m trainer.evaluate``: exit code 2 and no traceback."""
    proc = subprocess.run([sys.executable, "-m", "trainer.evaluate", "--seeds", "0", "--output-dir",
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--seeds must be >= 1" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
