"""Report of a run: ``report.png`` (training curves; text-relevant and text-irrelevant on the held-out prompts
over the steps) and ``report.md`` (first vs last validation, what overflow cut, and a reward-hacking flag)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .hacking import hacking_verdict

#: Per-prompt values of each validation (step, prompt, text_relevant, text_irrelevant, denscore).
PER_PROMPT_FILE = "validation_per_prompt.csv"


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            out.append({k: float(v) if v not in ("", None) else None for k, v in row.items() if k is not None})
    return out


def _by_step(per_prompt: list[dict]) -> dict[float, dict[str, np.ndarray]]:
    """{step: {"text_relevant": (n,), "text_irrelevant": (n,)}} with the prompts in the same order every step."""
    steps: dict[float, dict[int, tuple[float, float]]] = {}
    for r in per_prompt:
        steps.setdefault(r["step"], {})[int(r["prompt"])] = (r["text_relevant"], r["text_irrelevant"])
    out = {}
    for step, rows in sorted(steps.items()):
        order = sorted(rows)
        out[step] = {"text_relevant": np.array([rows[i][0] for i in order]),
                     "text_irrelevant": np.array([rows[i][1] for i in order])}
    return out


def reward_hacking(per_prompt: list[dict]) -> tuple[str | None, str]:
    """(a warning or None, what was checked) over the whole run: the last validation against the first (step
    0), prompt by prompt (validation uses the same held-out prompts and the same noise every time, so the
    differences are paired), by the rule :func:`trainer.hacking.hacking_verdict` that ``trainer.evaluate`` uses
    for a LoRA against the base. One comparison whatever the number of validations: a stated false-alarm rate."""
    steps = _by_step(per_prompt)
    if len(steps) < 2:
        return None, "fewer than two validations: nothing to compare"
    start, last = min(steps), max(steps)
    n = min(len(steps[start]["text_relevant"]), len(steps[last]["text_relevant"]))
    d = {k: steps[last][k][:n] - steps[start][k][:n] for k in ("text_relevant", "text_irrelevant")}
    verdict = hacking_verdict(d["text_relevant"], d["text_irrelevant"], f"from step {start:.0f} to step {last:.0f}")
    checked = verdict.checked + (f"; {verdict.explained}" if verdict.explained and not verdict.flagged else "")
    if verdict.flagged:
        best = max(steps, key=lambda s: steps[s]["text_relevant"].mean())
        return (f"possible reward hacking: {verdict.checked}. {verdict.explained[0].upper()}"
                f"{verdict.explained[1:]}: use an earlier checkpoint (the best text-relevant validation was step "
                f"{best:.0f}; checkpoints/*/longalign_lora.safetensors), or lower --reward-omega or the learning "
                f"rate."), checked
    return None, checked


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
    from longalign_core.io_utils import atomic_path, atomic_write_text

    with atomic_path(out / "report.png") as tmp:
        fig.savefig(tmp, format="png")

    lines = ["# LongAlign training report", ""]
    if val:
        first, last = val[0], val[-1]
        lines += ["Validation on the held-out prompts (fixed noise, V from the reference prompt set):", "",
                  "| validation | step {:.0f} | step {:.0f} |".format(first["step"], last["step"]), "|---|---|---|"]
        for key in ("denscore", "text_relevant", "text_irrelevant"):
            lines.append(f"| {key} ×100 | {first[key] * 100:.2f} | {last[key] * 100:.2f} |")
        warning, checked = reward_hacking(_read(out / PER_PROMPT_FILE))
        lines += ["", f"**WARNING: {warning}**" if warning else f"Reward-hacking check: no sign ({checked})."]
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
    atomic_write_text(out / "report.md", "\n".join(lines))
    return out / "report.png"
