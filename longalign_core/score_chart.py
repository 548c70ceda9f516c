"""Pictures and tables of Denscore results: which sentences each image misses."""

from __future__ import annotations

import csv
import io
from typing import Sequence

import numpy as np

from .denscore import ScoreResult

RELEVANT_COLOUR = "#2b7bba"
IRRELEVANT_COLOUR = "#b9b9b9"


def render_segment_chart(result: ScoreResult, labels: Sequence[str] | None = None, max_images: int = 8,
                         scale: float = 100.0, width_px: int = 1200) -> np.ndarray:
    """Per-segment stacked bars for each image (text-irrelevant part at the bottom, text-relevant part on top,
    ×``scale`` like the paper), one row per image. Returns an ``(H, W, 3)`` uint8 RGB array."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    n = min(len(result.segment_scores), max_images)
    k_max = max(len(s) for s in result.segment_scores[:n])
    height_in = 1.0 + 1.9 * n
    fig = Figure(figsize=(width_px / 100, height_in), dpi=100)
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    parts = result.parts
    for b, ax in enumerate(axes):
        irr = result.segment_irrelevant[b].detach().float().cpu().numpy() * scale
        rel = result.segment_relevant[b].detach().float().cpu().numpy() * scale
        x = np.arange(1, len(irr) + 1)
        ax.bar(x, irr, color=IRRELEVANT_COLOUR, label="text-irrelevant")
        ax.bar(x, rel, bottom=irr, color=RELEVANT_COLOUR, label="text-relevant")
        ax.axhline(float(parts.score[b]) * scale, color="#d1495b", lw=1, ls="--", label="image score")
        name = labels[b] if labels is not None else f"image {b}"
        ax.set_title(f"{name}: score {float(parts.score[b]) * scale:.2f} = relevant "
                     f"{float(parts.relevant[b]) * scale:.2f} + irrelevant {float(parts.irrelevant[b]) * scale:.2f}"
                     f"   (η {float(parts.eta[b]):.3f})", fontsize=9, loc="left")
        ax.set_xlim(0.4, k_max + 0.6)
        ax.set_xticks(np.arange(1, k_max + 1))
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3)
        if b == n - 1:
            ax.set_xlabel("segment (sentence)", fontsize=8)
    axes[0].legend(fontsize=7, loc="upper right", ncol=3)
    if len(result.segment_scores) > n:
        fig.suptitle(f"first {n} of {len(result.segment_scores)} images", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    from PIL import Image

    buf.seek(0)
    return np.array(Image.open(buf).convert("RGB"))


def result_rows(result: ScoreResult, labels: Sequence[str]) -> list[dict]:
    """One row per image and segment (plus an image-level row with ``segment`` = "all") for CSV output."""
    rows = []
    p = result.parts
    for b, label in enumerate(labels):
        rows.append({"image": label, "segment": "all", "text": "", "score": float(p.score[b]),
                     "text_relevant": float(p.relevant[b]), "text_irrelevant": float(p.irrelevant[b]),
                     "eta": float(p.eta[b]), "reweighted": float(p.reweighted[b])})
        segs = result.prompts[b].segments
        for k, seg in enumerate(segs):
            rows.append({"image": label, "segment": k + 1, "text": seg.text,
                         "score": float(result.segment_scores[b][k]),
                         "text_relevant": float(result.segment_relevant[b][k]),
                         "text_irrelevant": float(result.segment_irrelevant[b][k]), "eta": "", "reweighted": ""})
    return rows


def write_csv(rows: list[dict], path) -> None:
    from .io_utils import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def format_report(result: ScoreResult, labels: Sequence[str], scale: float = 100.0, max_chars: int = 50) -> str:
    """A text table: per image the score and its parts, then its weakest segments."""
    p = result.parts
    lines = [f"Denscore x{scale:g}: score = text-relevant + text-irrelevant   (eta = projection on V)"]
    for b, label in enumerate(labels):
        lines.append(f"{label}: {float(p.score[b]) * scale:6.2f} = {float(p.relevant[b]) * scale:6.2f} + "
                     f"{float(p.irrelevant[b]) * scale:6.2f}   eta {float(p.eta[b]):.3f}   "
                     f"reweighted {float(p.reweighted[b]) * scale:6.2f}")
        segs = result.prompts[b].segments
        rel = result.segment_relevant[b]
        order = rel.argsort()[: min(3, len(segs))].tolist() if len(segs) > 1 else []
        for k in order:
            text = segs[k].text if len(segs[k].text) <= max_chars else segs[k].text[: max_chars - 1] + "…"
            lines.append(f"    weakest: #{k + 1} relevant {float(rel[k]) * scale:6.2f}  {text!r}")
    lines += ["WARNING: " + w for w in result.warnings]
    return "\n".join(lines)
