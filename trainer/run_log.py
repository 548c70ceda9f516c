"""What a run logs: ``train_log.csv`` (one row per step, combined over processes), ``validation.csv``, and the
same numbers to TensorBoard when it is installed."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .parts import RunParts

#: Columns of ``train_log.csv`` and how each is combined over processes.
TRAIN_STATS = {
    "loss": "mean", "reward": "mean", "reward_std": "first", "reweighted": "mean", "text_relevant": "mean",
    "text_irrelevant": "mean", "grad_offset": "first", "prompts_cut": "sum", "tokens_lost": "sum",
    "t5_tokens_lost": "sum", "reward_tokens_lost": "sum", "cond_length": "max",
}
TRAIN_COLUMNS = ["step", *TRAIN_STATS, "prompts_cut_total", "tokens_lost_total", "lr", "seconds"]
VALIDATION_COLUMNS = ["step", "denscore", "text_relevant", "text_irrelevant", "text_relevant_se",
                      "text_irrelevant_se", "prompts_cut", "tokens_lost"]
PER_PROMPT_COLUMNS = ["step", "prompt", "denscore", "text_relevant", "text_irrelevant"]


class CSVLog:
    """Append-only CSV on the main process (each row written whole and flushed, so a killed run keeps its log)."""

    def __init__(self, path: Path, fields: list[str], enabled: bool):
        self.enabled, self.fields, self.path = enabled, fields, path
        if enabled and not path.exists():
            self._append(fields)

    def rows(self) -> list[dict]:
        """The rows logged so far (a resume keeps them); a damaged file is one message naming it."""
        if not self.path.is_file():
            return []
        try:
            with self.path.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        except (UnicodeDecodeError, csv.Error) as exc:
            from longalign_core.errors import BadInputError

            raise BadInputError(f"{self.path} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}), so "
                                f"the resumed run cannot keep its rows: delete it (the rows before the checkpoint are "
                                f"lost, the run goes on) or restore it from a copy, then resume again") from None

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
            self._append([row.get(k, "") for k in self.fields])

    def _append(self, values: list) -> None:
        from longalign_core.io_utils import append_text

        buf = io.StringIO()
        csv.writer(buf).writerow(values)
        append_text(self.path, buf.getvalue())


def reduce_stats(acc, stats: dict) -> dict:
    """Combine a step's statistics over all processes (mean / sum / max / rank 0's, per :data:`TRAIN_STATS`)."""
    keys = [k for k in TRAIN_STATS if k in stats]
    local = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=acc.device)
    every = acc.gather(local[None]).reshape(-1, len(keys)).cpu()
    how = {"mean": lambda c: c.mean(), "sum": lambda c: c.sum(), "max": lambda c: c.max(),
           "first": lambda c: c[0]}
    return {k: float(how[TRAIN_STATS[k]](every[:, i])) for i, k in enumerate(keys)}


def print_run_summary(cfg, acc, parts: RunParts, start: int) -> None:
    """The "Running training" banner: models, data, processes, LoRA, text options and sampling."""
    data, base, lora, scoring = parts.data, parts.base, parts.lora, parts.scoring
    repeats = data.align.describe() if cfg.stage == "align" else None
    print(f"***** Running training ({cfg.stage} stage) *****\n"
          f"  base model = {base.source} ({'SDXL' if base.is_sdxl else 'SD1.x'}, {base.prediction_type})\n"
          f"  reward model = {scoring.source}"
          f"{'' if cfg.stage != 'reward' else ', V from ' + scoring.reward_v.describe()}\n"
          f"  training prompts = {len(data)}, held-out validation prompts = {len(data.validation_prompts)}\n"
          + (f"  {repeats}\n" if repeats else "") +
          f"  processes = {acc.num_processes}, batch per process = "
          f"{cfg.train_batch_size}, accumulation = {cfg.gradient_accumulation_steps}\n"
          f"  steps = {start} -> {cfg.train_steps}, LoRA rank = {cfg.lora_rank} on {len(lora.targets)} "
          f"layers (dropout {cfg.lora_dropout} on the branch output), trainable parameters = "
          f"{sum(p.numel() for p in lora.params):,} (fp32), frozen weights {cfg.mixed_precision}\n"
          f"  text: budget {cfg.token_budget}, overflow {cfg.overflow}, split {cfg.split_mode}, long "
          f"segments {cfg.long_segments}{', + T5 branch' if parts.t5 is not None else ''}\n"
          f"  DDIM {cfg.sample_steps} steps, gradients at {cfg.sample_grad_steps}, CFG "
          f"{cfg.sample_guidance}, ω = {cfg.reward_omega}, {cfg.resolution}px", flush=True)


def dump_debug(out: Path, process_index: int, params: list[torch.nn.Parameter], step: int, dump: dict) -> None:
    """``--dump-debug``: this process's diagnostics of a step (V, batch text means, checksum of the trained
    ``params``) as ``out/debug/rank<process_index>-step<step>.pt``."""
    folder = out / "debug"
    folder.mkdir(exist_ok=True)
    checksum = sum(float(p.detach().double().sum()) for p in params)
    torch.save({**dump, "lora_checksum": checksum, "step": step}, folder / f"rank{process_index}-step{step:06d}.pt")
