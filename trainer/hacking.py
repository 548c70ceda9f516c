"""The reward-hacking rule, one for the trainer's report (final validation against the start) and for
``trainer.evaluate`` (a LoRA arm against the base).

Reward hacking is a reward gain that comes from what every prompt shares (the text-irrelevant part η x̂·V:
aesthetics-like drift) rather than from following the text (the text-relevant part x̂·t⊥). The rule takes one
comparison, so its false-alarm rate does not grow with the number of validations: the per-prompt paired
differences ``d = after − before`` (the same prompts, the same noise) of both parts, and

* the text-irrelevant part **rose by more than** :data:`EFFECT_FLOOR` — a one-sided t-test of
  ``mean(d_irr) > floor`` at :data:`FALSE_ALARM_RATE` (with ``n − 1`` degrees of freedom over ``n`` prompts);
* and the text-relevant part did **not** gain by more than the floor by the same test.

Both together flag it: the reward gain is then explained by the text-irrelevant part. A run whose
text-irrelevant part truly moved by at most the floor — whatever common drift its validations went through on the
way, and however many there were — is flagged with probability at most :data:`FALSE_ALARM_RATE` (the first test
alone has that rate; the second only removes flags). tests/test_hacking.py measures it by simulation.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

#: Probability of flagging a run whose text-irrelevant part did not rise by more than the floor.
FALSE_ALARM_RATE = 0.01
#: Smallest change that counts, as a cosine (0.5 on the ×100 scale the reports print): a shift the size of the
#: validation's rounding is not worth a warning, however many prompts make it "significant".
EFFECT_FLOOR = 0.005
#: Fewest prompts for which the noise of a paired difference is estimated (3 degrees of freedom).
MIN_PROMPTS = 4


def t_quantile(p: float, dof: int) -> float:
    """Student's t quantile: the Cornish–Fisher expansion around the normal one (Abramowitz & Stegun 26.7.5;
    within 0.02 of the exact value from 3 degrees of freedom at p = 0.99)."""
    z = NormalDist().inv_cdf(p)
    g = [(z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96, (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
         (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160]
    return z + sum(gi / dof ** (i + 1) for i, gi in enumerate(g))


@dataclass
class Change:
    """Mean paired difference over the prompts and its standard error (ddof 1), as cosines."""

    mean: float
    se: float

    @classmethod
    def of(cls, d: np.ndarray) -> "Change":
        d = np.asarray(d, dtype=np.float64)
        return cls(float(d.mean()), max(float(d.std(ddof=1)) / np.sqrt(len(d)), 1e-9))

    def beyond(self, floor: float, critical: float) -> bool:
        """The true mean exceeds ``floor`` at the rule's confidence."""
        return self.mean - floor > critical * self.se

    def __str__(self) -> str:
        return f"{self.mean * 100:+.2f} ± {self.se * 100:.2f}"


@dataclass
class Verdict:
    flagged: bool
    checked: str  # the numbers and the rule, one sentence
    explained: str | None = None  # when the gain is explained by the text-irrelevant part (or a share of it)
    relevant: Change | None = None
    irrelevant: Change | None = None


def hacking_verdict(d_relevant, d_irrelevant, compared: str, alpha: float = FALSE_ALARM_RATE,
                    floor: float = EFFECT_FLOOR) -> Verdict:
    """The rule (module docstring) on per-prompt paired differences; ``compared`` names the two sides
    ("from step 0 to step 30", "the arm against the base")."""
    n = len(d_relevant)
    if n < MIN_PROMPTS:
        return Verdict(False, f"{n} prompt(s): too few to measure the noise of the difference (the check needs "
                              f"at least {MIN_PROMPTS}; use --validation-prompts 8)")
    rel, irr = Change.of(d_relevant), Change.of(d_irrelevant)
    critical = t_quantile(1 - alpha, n - 1)
    checked = (f"{compared}: text-relevant {rel}, text-irrelevant {irr} (×100, mean ± standard error of the "
               f"paired difference over {n} prompts; a change counts when it exceeds {floor * 100:g} at a "
               f"{alpha:.0%} false-alarm rate, one-sided t, whatever the number of validations)")
    irrelevant_rose, relevant_gained = irr.beyond(floor, critical), rel.beyond(floor, critical)
    verdict = Verdict(irrelevant_rose and not relevant_gained, checked, None, rel, irr)
    if verdict.flagged:
        verdict.explained = ("the score's gain is explained by the text-irrelevant part (what every prompt shares), "
                             "not by following the text")
    elif irrelevant_rose:
        share = irr.mean / (irr.mean + rel.mean)
        verdict.explained = (f"both parts rose; the text-irrelevant part carries {share:.0%} of the score's gain")
    return verdict
