"""The reward-hacking rule (trainer/hacking.py; issue 27 point 4): one rule for the trainer's report and
trainer.evaluate; paired over prompts, the last validation against the start; a false-alarm rate that does not
grow with the number of validations (measured by simulation, seeded); a floor on the effect; a sentence when
the gain is explained by the text-irrelevant part."""

import csv

import numpy as np
import pytest

from trainer.hacking import EFFECT_FLOOR, FALSE_ALARM_RATE, hacking_verdict, t_quantile
from trainer.report import PER_PROMPT_FILE, reward_hacking, write_report


def rows_of(relevant: np.ndarray, irrelevant: np.ndarray, every: int = 15) -> list[dict]:
    """Per-prompt validation rows from ``(validations, prompts)`` arrays."""
    return [{"step": float(k * every), "prompt": float(p), "text_relevant": float(relevant[k, p]),
             "text_irrelevant": float(irrelevant[k, p])}
            for k in range(relevant.shape[0]) for p in range(relevant.shape[1])]


def with_mean_and_se(mean: float, se: float, n: int, seed: int) -> np.ndarray:
    """``n`` per-prompt differences with exactly this mean and standard error (ddof 1)."""
    z = np.random.default_rng(seed).normal(size=n)
    z = (z - z.mean()) / z.std(ddof=1)
    return mean + z * se * np.sqrt(n)


@pytest.mark.parametrize("dof, exact", [(3, 4.541), (7, 2.998), (30, 2.457), (10**6, 2.326)])
def test_t_quantile_matches_the_table(dof, exact):
    assert t_quantile(0.99, dof) == pytest.approx(exact, abs=0.02)


def test_the_standard_error_is_the_sample_one():
    d_rel = np.array([0.010, -0.030, 0.020, 0.004])
    d_irr = np.array([0.050, 0.010, 0.070, 0.030])
    v = hacking_verdict(d_rel, d_irr, "x")
    assert v.relevant.se == pytest.approx(np.std(d_rel, ddof=1) / 2, rel=1e-12)
    assert v.irrelevant.se == pytest.approx(np.std(d_irr, ddof=1) / 2, rel=1e-12)


# ------------------------------------------------------------------------------------------------------------
# The demo's case: the whole gain is text-irrelevant (step 0 -> 30: +4.19 ± 0.40 against +0.0075 ± 0.23, ×100)


def demo_rows(prompts: int = 8) -> list[dict]:
    rng = np.random.default_rng(5)
    level_r, level_i = rng.normal(0.05, 0.02, prompts), rng.normal(0.20, 0.02, prompts)
    d_rel = with_mean_and_se(0.000075, 0.0023, prompts, 1)
    d_irr = with_mean_and_se(0.0419, 0.0040, prompts, 2)
    # mid-run the text-relevant part was a little higher than at the end (what the old rule compared against)
    relevant = np.stack([level_r, level_r + d_rel + 0.0005, level_r + d_rel])
    irrelevant = np.stack([level_i, level_i + d_irr / 2, level_i + d_irr])
    return rows_of(relevant, irrelevant)


def test_the_demo_case_is_flagged(tmp_path):
    warning, checked = reward_hacking(demo_rows())
    assert warning and "possible reward hacking" in warning
    assert "from step 0 to step 30" in warning and "+4.19 ± 0.40" in warning and "+0.01 ± 0.23" in warning
    assert "explained by the text-irrelevant part" in warning
    with (tmp_path / PER_PROMPT_FILE).open("w", newline="") as f:
        w = csv.DictWriter(f, ["step", "prompt", "text_relevant", "text_irrelevant"])
        w.writeheader()
        w.writerows(demo_rows())
    (tmp_path / "validation.csv").write_text("step,denscore,text_relevant,text_irrelevant\n0,0.25,0.05,0.2\n"
                                            "30,0.29,0.05,0.24\n")
    write_report(tmp_path)
    assert "**WARNING: possible reward hacking" in (tmp_path / "report.md").read_text()


def test_evaluate_flags_the_same_numbers(tmp_path):
    """trainer.evaluate's arm-against-base verdict is the same rule on the same differences."""
    from test_evaluate import write_scores
    from trainer.evaluate.stats import read_scores, summarize

    n = 8
    d_rel, d_irr = with_mean_and_se(0.000075, 0.0023, n, 1), with_mean_and_se(0.0419, 0.0040, n, 2)
    base = {(p, 0): [(0.25, 0.05, 0.2)] for p in range(n)}
    arm = {(p, 0): [(float(0.25 + d_rel[p] + d_irr[p]), float(0.05 + d_rel[p]), float(0.2 + d_irr[p]))]
           for p in range(n)}
    write_scores(tmp_path / "scores.csv", {"base": base, "demo": arm})
    _, demo = summarize(read_scores(tmp_path / "scores.csv"), n_boot=100).arms
    assert demo.hacking and "explained by the text-irrelevant part" in demo.hacking
    assert "+4.19 ± 0.40" in demo.hacking


def test_below_the_floor_is_not_flagged_however_many_prompts():
    """A text-irrelevant rise smaller than the floor is not reported even when it is 'significant'."""
    n = 400
    d_irr = with_mean_and_se(EFFECT_FLOOR * 0.8, EFFECT_FLOOR / 50, n, 3)
    d_rel = with_mean_and_se(-0.001, EFFECT_FLOOR / 50, n, 4)
    assert not hacking_verdict(d_rel, d_irr, "x").flagged
    assert hacking_verdict(d_rel, d_irr + EFFECT_FLOOR, "x").flagged


def test_alignment_with_some_drift_is_not_hacking_but_the_share_is_said():
    d_rel, d_irr = with_mean_and_se(0.03, 0.002, 8, 1), with_mean_and_se(0.01, 0.001, 8, 2)
    v = hacking_verdict(d_rel, d_irr, "x")
    assert not v.flagged and "carries 25% of the score's gain" in v.explained


def test_too_few_prompts_is_said():
    v = hacking_verdict(np.zeros(3), np.ones(3), "x")
    assert not v.flagged and "too few" in v.checked


# ------------------------------------------------------------------------------------------------------------
# False alarms under a null with common drift


def null_run(rng, validations: int, prompts: int, end_drift: float) -> list[dict]:
    """No hacking: the text-irrelevant part ends ``end_drift`` (at most the floor) from where it started. On the
    way, every validation moves all prompts together (a common drift, a random walk bridged to its end,
    steps of 1 point ×100: twice the floor) and the text-relevant part moves against it (an image shifted along
    V gains in one part what it loses in the other), plus each prompt's own noise."""
    walk = np.concatenate([[0.0], np.cumsum(rng.normal(0, 0.01, validations - 1))])
    common = walk - np.linspace(0, 1, validations) * (walk[-1] - end_drift)
    level_r, level_i = rng.normal(0.05, 0.02, prompts), rng.normal(0.20, 0.02, prompts)
    relevant = level_r - common[:, None] + rng.normal(0, 0.01, (validations, prompts))
    irrelevant = level_i + common[:, None] + rng.normal(0, 0.01, (validations, prompts))
    return rows_of(relevant, irrelevant)


@pytest.mark.parametrize("validations", [3, 10, 60])
def test_false_alarms_stay_at_the_stated_rate(validations):
    rng = np.random.default_rng(validations)
    runs = 1500
    flags = sum(reward_hacking(null_run(rng, validations, 8, rng.uniform(-EFFECT_FLOOR, EFFECT_FLOOR)))[0]
                is not None for _ in range(runs))
    assert flags / runs <= FALSE_ALARM_RATE
    # the worst null: the text-irrelevant part ends exactly at the floor (the rate is then alpha itself)
    flags = sum(reward_hacking(null_run(rng, validations, 8, EFFECT_FLOOR))[0] is not None for _ in range(runs))
    assert flags / runs <= FALSE_ALARM_RATE + 3 * np.sqrt(FALSE_ALARM_RATE * (1 - FALSE_ALARM_RATE) / runs)
