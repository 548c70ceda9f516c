"""Before/after report of a run: curves of loss and reward, validation Denscore at the first and last step."""

from __future__ import annotations

import csv
from pathlib import Path


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{k: float(v) if v not in ("", None) else None for k, v in row.items()} for row in csv.DictReader(f)]


def write_report(output_dir: str | Path) -> Path:
    """``report.png`` (curves) and ``report.md`` (before/after numbers) in ``output_dir``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    out = Path(output_dir)
    train, val = _read(out / "train_log.csv"), _read(out / "validation.csv")
    fig = Figure(figsize=(10, 3.6), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    if train:
        steps = [r["step"] for r in train]
        ax1.plot(steps, [r["loss"] for r in train], label="loss", color="#d1495b")
        if train[0].get("reward") is not None:
            ax1b = ax1.twinx()
            ax1b.plot(steps, [r["reward"] for r in train], label="batch reward (score)", color="#2b7bba")
            ax1b.set_ylabel("reward", fontsize=8)
        ax1.set_xlabel("step", fontsize=8)
        ax1.set_ylabel("loss", fontsize=8)
        ax1.set_title("training", fontsize=9)
    if val:
        steps = [r["step"] for r in val]
        for key, colour in (("denscore", "#222222"), ("text_relevant", "#2b7bba"), ("text_irrelevant", "#999999")):
            ax2.plot(steps, [r[key] for r in val], marker="o", label=key, color=colour)
        ax2.legend(fontsize=7)
        ax2.set_xlabel("step", fontsize=8)
        ax2.set_title("validation (fixed noise, V from the reference prompts)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "report.png")
    lines = ["# LongAlign training report", ""]
    if val:
        first, last = val[0], val[-1]
        lines += ["| validation | step {:.0f} | step {:.0f} |".format(first["step"], last["step"]), "|---|---|---|"]
        for key in ("denscore", "text_relevant", "text_irrelevant"):
            lines.append(f"| {key} ×100 | {first[key] * 100:.2f} | {last[key] * 100:.2f} |")
    if train:
        lines += ["", f"training steps logged: {len(train)}; final loss {train[-1]['loss']:.4f}"]
    lines += ["", "![curves](report.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.png"
