"""The numbers of an evaluation (``python -m trainer.evaluate``), computed from ``scores.csv`` alone.

``scores.csv`` has one row per arm, prompt, seed and sentence. An image's value is the mean over its sentences
(exactly the image-level Denscore and parts: they are linear in the segment embeddings). Every arm saw the same
prompts from the same noise, so an arm and the base are compared image by image (paired by prompt and seed).

Intervals are 95 % percentile bootstraps **over prompts**: a prompt's seeds stay together (they share the text,
so they are not independent), each resample draws the prompts with replacement and averages their per-prompt
means. The resampled prompt indices are ``numpy.random.default_rng(seed).integers(0, P, size=(B, P))``, drawn
once and used for every arm and number, so the intervals of one report are coherent and reproducible.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from longalign_core.errors import BadInputError

from ..hacking import hacking_verdict

#: The per-sentence values in scores.csv, in the order of the report's tables.
METRICS = ("score", "text_relevant", "text_irrelevant", "reweighted")
#: Columns of scores.csv.
SCORE_COLUMNS = ["arm", "lora", "strength", "prompt", "seed", "sentence", "text", *METRICS]
BASE_ARM = "base"
DEFAULT_BOOTSTRAP = 2000


def read_scores_text(path: Path, header: bool = True) -> str:
    """``scores.csv`` as text, its header checked (``header=False``: a process's part file, written without one);
    a damaged file (not UTF-8, NUL bytes a crash can leave, another
    header) is one message naming the line and what to do."""
    from longalign_core.errors import BadInputError

    data = path.read_bytes()
    fix = (f"delete that line and every one after it (--resume redoes their prompt groups), or delete {path.parent} "
           f"and start again")
    bad = data.find(b"\x00")
    try:
        text = data[:bad if bad >= 0 else len(data)].decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise BadInputError(f"{path}:{line}: scores.csv is damaged (not UTF-8 text at byte {exc.start}); {fix}") \
            from None
    if bad >= 0:
        raise BadInputError(f"{path}:{text.count(chr(10)) + 1}: scores.csv is damaged (NUL bytes, as a crash or a "
                            f"full disk can leave); {fix}")
    first = text.split("\n", 1)[0].strip()
    if text and header and first != ",".join(SCORE_COLUMNS):
        raise BadInputError(f"{path}:1: scores.csv is damaged (its header is {first[:80]!r}, not the evaluation's "
                            f"columns {','.join(SCORE_COLUMNS)}); restore the header line, or delete {path.parent} "
                            f"and start again")
    return text


def read_scores(path: str | Path) -> list[dict]:
    """The rows of a ``scores.csv``, numbers parsed; a malformed file is a :class:`BadInputError` naming the line."""
    import io

    path = Path(path)
    rows = []
    with io.StringIO(read_scores_text(path), newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in SCORE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise BadInputError(f"{path} is not an evaluation's scores.csv: columns {missing} are missing")
        for row in reader:
            try:
                rows.append({"arm": row["arm"], "lora": row["lora"], "strength": row["strength"],
                             "prompt": int(row["prompt"]), "seed": int(row["seed"]),
                             "sentence": int(row["sentence"]), "text": row["text"],
                             **{m: float(row[m]) for m in METRICS}})
            except (TypeError, ValueError):
                raise BadInputError(f"{path}:{reader.line_num}: not a complete row of numbers ({row})") from None
    return rows


def image_values(rows: list[dict]) -> dict[str, dict[tuple[int, int], np.ndarray]]:
    """``{arm: {(prompt, seed): [score, relevant, irrelevant, reweighted]}}``: each image's sentence means."""
    sums: dict[str, dict[tuple[int, int], list]] = {}
    for r in rows:
        entry = sums.setdefault(r["arm"], {}).setdefault((r["prompt"], r["seed"]), [np.zeros(len(METRICS)), 0])
        entry[0] += [r[m] for m in METRICS]
        entry[1] += 1
    return {arm: {key: total / n for key, (total, n) in images.items()} for arm, images in sums.items()}


def per_prompt(images: dict[tuple[int, int], np.ndarray], prompts: list[int]) -> np.ndarray:
    """``(P, ...)``: each prompt's mean over its seeds."""
    out = []
    for p in prompts:
        values = [v for (q, _), v in images.items() if q == p]
        out.append(np.mean(values, axis=0))
    return np.array(out)


def bootstrap_indices(n_prompts: int, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """``(B, P)`` prompt indices drawn with replacement (see the module docstring)."""
    return np.random.default_rng(seed).integers(0, n_prompts, size=(n_boot, n_prompts))


def interval(values: np.ndarray, indices: np.ndarray) -> tuple[float, float]:
    """The 95 % percentile interval of the mean of ``values`` ``(P,)`` over the resamples ``indices``."""
    lo, hi = np.percentile(values[indices].mean(axis=1), [2.5, 97.5])
    return float(lo), float(hi)


@dataclass
class Estimate:
    """A mean with its 95 % bootstrap interval (cosines; the report shows ×100)."""

    mean: float
    lo: float
    hi: float

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


def estimate(values: np.ndarray, indices: np.ndarray) -> Estimate:
    return Estimate(float(values.mean()), *interval(values, indices))


@dataclass
class SentenceChange:
    """How one sentence's text-relevant part moved, arm minus base, mean over the seeds."""

    delta: float
    prompt: int
    sentence: int
    text: str


@dataclass
class ArmSummary:
    name: str
    lora: str
    strength: str
    images: int
    means: dict[str, Estimate]
    #: against the base (absent for the base itself): paired differences, win rates, the hacking check
    diffs: dict[str, Estimate] = field(default_factory=dict)
    wins: dict[str, Estimate] = field(default_factory=dict)
    hacking: str | None = None
    hacking_checked: str = ""
    gained: list[SentenceChange] = field(default_factory=list)
    lost: list[SentenceChange] = field(default_factory=list)


@dataclass
class Summary:
    prompts: int
    seeds: int
    n_boot: int
    boot_seed: int
    arms: list[ArmSummary]


def win_values(arm: np.ndarray, base: np.ndarray) -> np.ndarray:
    """1 where the arm's value beats the base's, 0.5 for a tie, 0 where it loses (elementwise)."""
    return np.where(arm > base, 1.0, np.where(arm == base, 0.5, 0.0))


def sentence_changes(rows: list[dict], arm: str, base: str = BASE_ARM) -> list[SentenceChange]:
    """Every (prompt, sentence): the arm's text-relevant part minus the base's, averaged over the seeds both
    have; sorted from the largest gain to the largest loss."""
    rel: dict[tuple[str, int, int, int], float] = {}
    text: dict[tuple[int, int], str] = {}
    for r in rows:
        if r["arm"] in (arm, base):
            rel[(r["arm"], r["prompt"], r["seed"], r["sentence"])] = r["text_relevant"]
            text[(r["prompt"], r["sentence"])] = r["text"]
    deltas: dict[tuple[int, int], list[float]] = {}
    for (a, p, s, k), value in rel.items():
        if a == arm and (base, p, s, k) in rel:
            deltas.setdefault((p, k), []).append(value - rel[(base, p, s, k)])
    changes = [SentenceChange(float(np.mean(d)), p, k, text[(p, k)]) for (p, k), d in deltas.items()]
    return sorted(changes, key=lambda c: (-c.delta, c.prompt, c.sentence))


def summarize(rows: list[dict], n_boot: int = DEFAULT_BOOTSTRAP, boot_seed: int = 0, top: int = 5) -> Summary:
    """Per arm: the means with their intervals; per LoRA arm against the base, paired by prompt and seed: the
    differences with their intervals, the win rates (score and text-relevant; ties count half) with theirs,
    the reward-hacking check, and the ``top`` sentences whose text-relevant part gained and lost most."""
    if not rows:
        raise BadInputError("scores.csv holds no rows: nothing was evaluated yet")
    values = image_values(rows)
    if BASE_ARM not in values:
        raise BadInputError(f"scores.csv has no {BASE_ARM!r} arm to compare against (arms: {sorted(values)})")
    order = [BASE_ARM] + [a for a in dict.fromkeys(r["arm"] for r in rows) if a != BASE_ARM]  # as written
    meta = {r["arm"]: (r["lora"], r["strength"]) for r in rows}
    base = values[BASE_ARM]
    prompts = sorted({p for p, _ in base})
    seeds = len({s for _, s in base})
    idx = bootstrap_indices(len(prompts), n_boot, boot_seed)
    col = {m: i for i, m in enumerate(METRICS)}
    arms = []
    for name in order:
        images = values[name]
        arm_prompts = sorted({p for p, _ in images})
        own = idx if arm_prompts == prompts else bootstrap_indices(len(arm_prompts), n_boot, boot_seed)
        pp = per_prompt(images, arm_prompts)
        summary = ArmSummary(name, *meta[name], len(images), {m: estimate(pp[:, col[m]], own) for m in METRICS})
        if name != BASE_ARM:
            keys = sorted(set(images) & set(base))
            paired_prompts = sorted({p for p, _ in keys})
            pidx = idx if paired_prompts == prompts else bootstrap_indices(len(paired_prompts), n_boot, boot_seed)
            diff = {k: images[k] - base[k] for k in keys}
            dpp = per_prompt(diff, paired_prompts)
            summary.diffs = {m: estimate(dpp[:, col[m]], pidx) for m in METRICS}
            for m in ("score", "text_relevant"):
                wins = {k: win_values(images[k][col[m]], base[k][col[m]]) for k in keys}
                summary.wins[m] = estimate(per_prompt(wins, paired_prompts), pidx)
            verdict = hacking_verdict(dpp[:, col["text_relevant"]], dpp[:, col["text_irrelevant"]],
                                      "the arm against the base")
            summary.hacking_checked = verdict.checked + (f"; {verdict.explained}" if verdict.explained and
                                                         not verdict.flagged else "")
            if verdict.flagged:
                summary.hacking = f"possible reward hacking: {verdict.checked}. {verdict.explained.capitalize()}"
            changes = sentence_changes(rows, name)
            summary.gained = [c for c in changes[:top] if c.delta > 0]
            summary.lost = [c for c in reversed(changes[-top:]) if c.delta < 0]
        arms.append(summary)
    return Summary(len(prompts), seeds, n_boot, boot_seed, arms)
