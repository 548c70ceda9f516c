"""What an evaluation reads and writes as it goes: each image's noise, the prompt groups it works in, the rows of
``scores.csv``, the images, and on ``--resume`` the groups that were complete."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from longalign_core.errors import BadConfigError

from .eval_stats import SCORE_COLUMNS, read_scores_text

SETTINGS_FILE = "evaluation.json"
SCORES_FILE = "scores.csv"


def image_seed(seed: int, prompt: str) -> int:
    """The noise seed of one image: from the image's seed and the prompt's text (not its position in the file),
    so a prompt gets the same noise in every arm, run and prompts file."""
    from .seeding import step_seed

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


def start_files(out: Path, prompts: list[str], settings: dict) -> None:
    """A fresh evaluation's folder: the prompts by number, an empty scores.csv and the settings."""
    from longalign_core.io_utils import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("prompts.txt", "".join(p + "\n" for p in prompts)), (SCORES_FILE, csv_text([], True)),
                       (SETTINGS_FILE, json.dumps(settings, indent=2))):
        with atomic_path(out / name) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")


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


def keep_complete_units(scores_file: Path, arms: list[str], units: list[list[int]], seeds: list[int],
                        sentences: list[int]) -> tuple[list[dict], set[tuple[str, int]]]:
    """The rows of ``scores_file`` whose unit (arm × prompt group: every seed, every one of the prompt's
    ``sentences``) is complete, and those units as (arm, unit index); the file is rewritten with only those rows
    (a kill may have cut it anywhere, even mid-line)."""
    from longalign_core.io_utils import atomic_path

    text = read_scores_text(scores_file) if scores_file.exists() else ""
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # the last line was cut mid-write
    rows = list(csv.DictReader(io.StringIO(text))) if text else []
    count: dict[tuple, int] = {}
    for r in rows:
        try:
            key = (r["arm"], int(r["prompt"]), int(r["seed"]))
        except (KeyError, TypeError, ValueError):
            continue
        count[key] = count.get(key, 0) + 1
    done = {(arm, u) for arm in arms for u, unit in enumerate(units)
            if all(count.get((arm, p, s)) == sentences[p] for p in unit for s in seeds)}
    unit_of = {p: u for u, unit in enumerate(units) for p in unit}
    kept = [r for r in rows if (r.get("prompt") or "").isdigit() and int(r["prompt"]) in unit_of
            and (r["arm"], unit_of[int(r["prompt"])]) in done]
    with atomic_path(scores_file) as tmp:
        Path(tmp).write_text(csv_text(kept, header=True), encoding="utf-8")
    return kept, done
