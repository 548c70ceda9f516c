"""What a run logs: ``train_log.csv`` (one row per step, combined over processes), ``validation.csv``, and the
same numbers to TensorBoard when it is installed."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

#: Columns of ``train_log.csv`` and how each is combined over processes.
TRAIN_STATS = {
    "loss": "mean", "reward": "mean", "reward_std": "first", "reweighted": "mean", "text_relevant": "mean",
    "text_irrelevant": "mean", "grad_offset": "first", "prompts_cut": "sum", "tokens_lost": "sum",
    "t5_tokens_lost": "sum", "reward_tokens_lost": "sum", "cond_length": "max",
}
TRAIN_COLUMNS = ["step", *TRAIN_STATS, "prompts_cut_total", "tokens_lost_total", "lr", "seconds"]
VALIDATION_COLUMNS = ["step", "denscore", "text_relevant", "text_irrelevant", "prompts_cut", "tokens_lost"]


class CSVLog:
    """Append-only CSV on the main process (flushed each row, so a killed run keeps its log)."""

    def __init__(self, path: Path, fields: list[str], enabled: bool):
        self.enabled, self.fields, self.path = enabled, fields, path
        if enabled and not path.exists():
            with path.open("w", newline="") as f:
                csv.DictWriter(f, fieldnames=fields).writeheader()

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))

    def keep_until(self, step: int) -> list[dict]:
        """Drop rows logged after ``step`` (a resumed run logs them again); returns the rows kept."""
        kept = [r for r in self.rows() if r.get("step") and float(r["step"]) <= step]
        if self.enabled:
            from longalign_core.io_utils import atomic_path

            with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(kept)
        return kept

    def write(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields).writerow({k: row.get(k, "") for k in self.fields})


def reduce_stats(acc, stats: dict) -> dict:
    """Combine a step's statistics over all processes (mean / sum / max / rank 0's, per :data:`TRAIN_STATS`)."""
    keys = [k for k in TRAIN_STATS if k in stats]
    local = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=acc.device)
    every = acc.gather(local[None]).reshape(-1, len(keys)).cpu()
    how = {"mean": lambda c: c.mean(), "sum": lambda c: c.sum(), "max": lambda c: c.max(),
           "first": lambda c: c[0]}
    return {k: float(how[TRAIN_STATS[k]](every[:, i])) for i, k in enumerate(keys)}
