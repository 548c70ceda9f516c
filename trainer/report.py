"""Report of a run: ``report.png`` (training curves; text-relevant and text-irrelevant on the held-out prompts
over the steps) and ``report.md`` (first vs last validation, what overflow cut, and a reward-hacking flag)."""

from __future__ import annotations

import csv
from pathlib import Path

#: How many of the last validations the reward-hacking check looks at.
HACKING_WINDOW = 3


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            out.append({k: float(v) if v not in ("", None) else None for k, v in row.items() if k is not None})
    return out


def reward_hacking(validation: list[dict], window: int = HACKING_WINDOW) -> str | None:
    """A warning when, over the last ``window`` validations (at least two), the text-irrelevant part rose while
    the text-relevant part fell: the reward went up through what every prompt shares (aesthetics-like drift),
    not through alignment with the prompts. None otherwise."""
    rows = [r for r in validation if r.get("text_relevant") is not None and r.get("text_irrelevant") is not None]
    last = rows[-window:]
    if len(last) < 2:
        return None
    d_rel = last[-1]["text_relevant"] - last[0]["text_relevant"]
    d_irr = last[-1]["text_irrelevant"] - last[0]["text_irrelevant"]
    if d_irr > 0 and d_rel < 0:
        return (f"possible reward hacking: from step {last[0]['step']:.0f} to {last[-1]['step']:.0f} the "
                f"text-irrelevant part rose by {d_irr * 100:+.2f} while the text-relevant part fell by "
                f"{d_rel * 100:+.2f} (×100, held-out prompts). The reward grows through what all prompts share, "
                f"not through alignment: lower --reward-omega, the learning rate, or stop at an earlier checkpoint.")
    return None


def write_report(output_dir: str | Path) -> Path:
    """``report.png`` (curves) and ``report.md`` (before/after numbers) in ``output_dir``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    out = Path(output_dir)
    train, val = _read(out / "train_log.csv"), _read(out / "validation.csv")
    fig = Figure(figsize=(13, 3.6), dpi=100)
    ax1, ax2, ax3 = fig.subplots(1, 3)
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
    for ax, key, colour in ((ax2, "text_relevant", "#2b7bba"), (ax3, "text_irrelevant", "#999999")):
        if val:
            ax.plot([r["step"] for r in val], [r[key] * 100 for r in val], marker="o", color=colour)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("×100", fontsize=8)
        ax.set_title(f"{key.replace('_', '-')} (held-out prompts, V from the reference set)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "report.png")

    lines = ["# LongAlign training report", ""]
    if val:
        first, last = val[0], val[-1]
        lines += ["Validation on the held-out prompts (fixed noise, V from the reference prompt set):", "",
                  "| validation | step {:.0f} | step {:.0f} |".format(first["step"], last["step"]), "|---|---|---|"]
        for key in ("denscore", "text_relevant", "text_irrelevant"):
            lines.append(f"| {key} ×100 | {first[key] * 100:.2f} | {last[key] * 100:.2f} |")
        warning = reward_hacking(val)
        lines += ["", f"**WARNING: {warning}**" if warning else
                  "Reward-hacking check: the text-irrelevant part did not rise while the text-relevant part fell "
                  f"over the last {min(len(val), HACKING_WINDOW)} validations."]
    else:
        lines += ["No validation (--validation-prompts 0)."]
    if train:
        final = train[-1]
        cut, lost = final.get("prompts_cut_total"), final.get("tokens_lost_total")
        lines += ["", f"Training steps logged: {len(train)}; final loss {final['loss']:.4f}."]
        if cut is not None:
            t5 = sum(r.get("t5_tokens_lost") or 0 for r in train)
            rw = sum(r.get("reward_tokens_lost") or 0 for r in train)
            lines += ["", f"Token budget: {cut:.0f} training prompts were cut, {lost:.0f} conditioning tokens lost "
                          f"over the run (all processes; --overflow truncate cuts at the budget, --long-segments "
                          f"truncate at the text window). Logged steps also lost {t5:.0f} T5-branch tokens (fixed "
                          f"240) and {rw:.0f} reward-model segment tokens."]
    lines += ["", "![curves](report.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.png"
