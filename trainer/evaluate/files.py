"""What an evaluation reads and writes as it goes: each image's noise, the prompt groups it works in, the rows of
``scores.csv``, the images, and on ``--resume`` the groups that were complete."""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from longalign_core.errors import BadConfigError

from .stats import SCORE_COLUMNS, read_scores_text

SETTINGS_FILE = "evaluation.json"
SCORES_FILE = "scores.csv"
#: The file names of the prompts of a folder of .txt files, by number (as prompts.txt).
PROMPT_NAMES_FILE = "prompt_files.txt"
#: What the token budget did to the prompts (:class:`~trainer.evaluate.report.PromptTokens`).
TOKENS_FILE = "prompt_tokens.json"


def image_seed(seed: int, prompt: str) -> int:
    """The noise seed of one image: from the image's seed and the prompt's text (not its position in the file),
    so a prompt gets the same noise in every arm, run and prompts file."""
    from ..seeding import step_seed

    return step_seed(seed, int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12], 16), 0)


def image_noise(seed: int, prompt: str, side: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(image_seed(seed, prompt))
    return torch.randn(4, side, side, generator=g)


def plan_units(n_prompts: int, seeds: int, batch_size: int) -> list[list[int]]:
    """Consecutive prompt groups, each sampled and written as one piece (all its seeds): about ``batch_size``
    images. A resumed run redoes only the groups that were not complete."""
    per = max(1, batch_size // seeds)
    return [list(range(i, min(i + per, n_prompts))) for i in range(0, n_prompts, per)]


def format_rows(arm, prompt_index: int, seed: int, result, b: int, omega: float) -> list[dict]:
    """The rows of image ``b`` of a :class:`~longalign_core.denscore.ScoreResult`: one per sentence."""
    rows = []
    segs = result.prompts[b].segments
    s, r, i = (t.detach().double().cpu().numpy() for t in
               (result.segment_scores[b], result.segment_relevant[b], result.segment_irrelevant[b]))
    for k, seg in enumerate(segs):
        rows.append({"arm": arm.name, "lora": arm.lora, "strength": f"{arm.strength:g}" if arm.lora else "",
                     "prompt": prompt_index, "seed": seed, "sentence": k + 1, "text": seg.text,
                     "score": repr(float(s[k])), "text_relevant": repr(float(r[k])),
                     "text_irrelevant": repr(float(i[k])), "reweighted": repr(float(r[k] + omega * i[k]))})
    return rows


def csv_text(rows: list[dict], header: bool = False) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SCORE_COLUMNS, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def save_png(array: np.ndarray, path: Path) -> None:
    """A PNG with light compression (level 1: several times faster than the default, the files a little larger),
    written atomically. A group's images are written before its rows of scores.csv, and a group without its rows
    is done again on --resume, its images rewritten."""
    from PIL import Image

    from longalign_core.io_utils import atomic_path

    with atomic_path(path) as tmp:  # a full disk is named with the path; no partial file is left
        Image.fromarray(array).save(tmp, format="PNG", compress_level=1)


def arm_folder(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)


def start_files(out: Path, prompts: list[str], settings: dict, names: list[str] | None = None,
                tokens=None) -> None:
    """A fresh evaluation's folder: the prompts by number (and their files' names), an empty scores.csv, the
    settings, and what the token budget did to the prompts (:class:`~trainer.evaluate.report.PromptTokens`)."""
    from longalign_core.io_utils import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    files = [("prompts.txt", "".join(p + "\n" for p in prompts)), (SCORES_FILE, csv_text([], True)),
             (SETTINGS_FILE, json.dumps(settings, indent=2))]
    if names:
        files.append((PROMPT_NAMES_FILE, "".join(n + "\n" for n in names)))
    if tokens is not None:
        files.append((TOKENS_FILE, json.dumps(tokens.to_json(), indent=2)))
    for name, text in files:
        with atomic_path(out / name) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")


def read_evaluation_prompts(cfg) -> tuple[list[str], list[str] | None, str]:
    """(prompts, their files' names or None, source) of an evaluation's ``--prompts`` (the pack's evaluation
    prompts by default), the first ``--num-prompts``; a prompt given twice is refused."""
    from longalign_core.errors import BadInputError, check_input_file

    from ..data import read_prompts
    from .config import EVALUATION_PROMPTS

    source = cfg.prompts or str(EVALUATION_PROMPTS)
    path = Path(source).expanduser()
    if not path.exists():
        raise BadInputError(f"--prompts {source}: no such prompts file or folder (a typo in the path?); give a "
                            f".txt with one prompt per line, a folder of .txt files with one prompt each, or a "
                            f".jsonl (its prompt field named by --prompt-field)")
    if path.is_file():
        check_input_file(path, "prompts file", "--prompts")
    prompts, names = read_prompts(str(path), field=cfg.prompt_field)
    if cfg.num_prompts is not None:
        if cfg.num_prompts > len(prompts):
            raise BadConfigError(f"--num-prompts {cfg.num_prompts}: {source} has only {len(prompts)} prompts")
        prompts, names = prompts[:cfg.num_prompts], names and names[:cfg.num_prompts]
    first: dict[str, int] = {}
    for i, p in enumerate(prompts):
        if p in first:
            which = (f"{names[i]} repeats {names[first[p]]}" if names else
                     f"prompt {i + 1} repeats prompt {first[p] + 1}")
            raise BadInputError(f"{source}: {which} ({p[:60]!r}…): a prompt counted twice weighs twice in every "
                                f"mean; remove the copy")
        first[p] = i
    return prompts, names, source


def read_settings(out: Path) -> dict:
    """The settings an evaluation in ``out`` was made with (``evaluation.json``); a damaged file is one message."""
    from longalign_core.io_utils import read_json_file

    return read_json_file(out / SETTINGS_FILE, "the evaluation's settings file",
                          f"it records the settings the scores in {out} were made with, so they cannot be checked: "
                          f"restore it from a copy, or start again in another --output-dir")


def check_settings(out: Path, settings: dict) -> None:
    """``--resume``: the settings the scores in ``out`` were made with must be today's."""
    saved = read_settings(out)
    differ = [f"{k}: {saved.get(k)!r} then, {v!r} now" for k, v in settings.items() if saved.get(k) != v]
    if differ:
        raise BadConfigError(f"--resume: {out} was evaluated with other settings ({'; '.join(differ)}); resume "
                             f"with the same ones, or choose another --output-dir")


def sentence_counts(reward, prompts: list[str], split_mode: str, long_segments: str) -> list[int]:
    """The rows each image of each prompt has in ``scores.csv``: its segments as the judge scores them (the
    splitter and the text window alone; no text features are computed, so nothing the scores use is touched)."""
    from longalign_core.denscore import judge_segments

    count = functools.lru_cache(maxsize=None)(reward.count_tokens)
    return [len(judge_segments(reward, p, split_mode, long_segments, count)) for p in prompts]


def part_file(out: Path, rank: int, world: int) -> Path:
    """Where a process appends the rows of its prompt groups: ``scores.csv`` itself when it is the only one,
    else ``scores.partR.csv`` beside it (the main process merges them into ``scores.csv`` at the end)."""
    return out / SCORES_FILE if world == 1 else out / f"scores.part{rank}.csv"


def score_files(out: Path) -> list[Path]:
    """``scores.csv`` and the part files an interrupted run of any number of processes left."""
    return [out / SCORES_FILE, *sorted(out.glob("scores.part*.csv"))]


def _read_rows(path: Path) -> list[dict]:
    text = read_scores_text(path, header=path.name == SCORES_FILE) if path.exists() else ""
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # the last line was cut mid-write
    if not text:
        return []
    header = csv_text([], header=True)
    if not text.startswith(header):  # a part file is written without one
        text = header + text
    return list(csv.DictReader(io.StringIO(text)))


def complete_units(files: list[Path], arms: list[str], units: list[list[int]], seeds: list[int],
                   sentences: list[int]) -> tuple[list[dict], set[tuple[str, int]]]:
    """The rows of ``files`` whose unit (arm × prompt group: every seed, every one of the prompt's ``sentences``)
    is complete, in the canonical order (arm as in ``arms``, prompt, seed, sentence; a row written twice counted
    once), and those units as (arm, unit index). Which process wrote a row, and in which file, does not matter."""
    rows: dict[tuple[str, int, int, int], dict] = {}
    for path in files:
        for r in _read_rows(path):
            try:
                key = (r["arm"], int(r["prompt"]), int(r["seed"]), int(r["sentence"]))
            except (KeyError, TypeError, ValueError):
                continue
            if None not in r and None not in r.values() and 0 <= key[1] < len(sentences) and 1 <= key[3] <= sentences[key[1]]:
                rows.setdefault(key, r)
    count: dict[tuple, int] = {}
    for arm, p, s, _ in rows:
        count[arm, p, s] = count.get((arm, p, s), 0) + 1
    done = {(arm, u) for arm in arms for u, unit in enumerate(units)
            if all(count.get((arm, p, s)) == sentences[p] for p in unit for s in seeds)}
    unit_of = {p: u for u, unit in enumerate(units) for p in unit}
    order = {arm: k for k, arm in enumerate(arms)}
    kept = sorted((key for key in rows if (key[0], unit_of[key[1]]) in done), key=lambda k: (order[k[0]], *k[1:]))
    return [rows[key] for key in kept], done


def write_scores(out: Path, rows: list[dict]) -> None:
    """``scores.csv`` holding ``rows`` (written whole, atomically), then the part files are removed: their rows
    are in it or were not complete."""
    from longalign_core.io_utils import atomic_path

    with atomic_path(out / SCORES_FILE) as tmp:
        Path(tmp).write_text(csv_text(rows, header=True), encoding="utf-8")
    for part in score_files(out)[1:]:
        part.unlink(missing_ok=True)
