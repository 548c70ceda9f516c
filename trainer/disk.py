"""The disk a run needs: a checkpoint's size worked out from what trains (before one is written), the refusal of a
run whose output folder cannot hold one checkpoint and the LoRA, and the dry run's estimate of the whole run.

A checkpoint (trainer/checkpoints.py) holds the trained parameters in fp32 (4 bytes each), AdamW's two moments
(8 bytes each), the LoRA file of that step (fp16 kohya pairs: 2 bytes each) and a few small files (RNG states,
the schedule, the step) and about 1 KB of headers per tensor: about 14 bytes per trained parameter. On the
embedded model at rank 4 (63,232 parameters in 130 tensors) this gives 1.12 MB for a checkpoint of 1.05 MB
(tests/test_disk.py measures it). ``checkpoints_keep`` of them are kept, and a new
one is written before the oldest is deleted."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from longalign_core.errors import DiskFullError, format_bytes, free_space

if TYPE_CHECKING:
    from .parts import LoRAUNet

#: Room left over for the logs, a validation image and the report (bytes).
MARGIN = 16 * 2**20
#: Each checkpoint's small files (RNG states per process, the schedule, trainer_state.json, headers), rounded up.
SMALL_FILES = 64 * 2**10


def lora_file_bytes(lora: LoRAUNet) -> int:
    """The LoRA file (kohya keys, fp16 up/down pairs and an alpha per layer): 2 bytes a LoRA parameter, plus its
    header (about 200 bytes of JSON a tensor)."""
    return 2 * lora.lora_parameters + 3 * 200 * len(lora.targets) + 2 * len(lora.targets) + 4096


def checkpoint_bytes(lora: LoRAUNet, processes: int) -> int:
    """One checkpoint of a run on ``processes`` processes: fp32 parameters, AdamW's moments, the LoRA file and the
    small files."""
    n = sum(p.numel() for p in lora.params)
    return 12 * n + lora_file_bytes(lora) + SMALL_FILES * processes + 1000 * len(lora.params)


def check_free_space(out: Path, lora: LoRAUNet, processes: int, keep: int) -> None:
    """Refuse to start (every process alike) when the output folder ``out`` cannot hold one checkpoint, the LoRA
    and :data:`MARGIN`: a run that would fail at its first checkpoint, hours in. ``keep``: ``--checkpoints-keep``."""
    one, lora_bytes = checkpoint_bytes(lora, processes), lora_file_bytes(lora)
    need = one + lora_bytes + MARGIN
    folder, free = free_space(out)
    if free < need:
        raise DiskFullError(f"--output-dir {out}: {folder} has {format_bytes(free)} free, and this run needs at "
                            f"least {format_bytes(need)} (one checkpoint, about {format_bytes(one)}; the LoRA, "
                            f"{format_bytes(lora_bytes)}; {format_bytes(MARGIN)} for logs and images), and "
                            f"{format_bytes((keep + 1) * one + lora_bytes + MARGIN)} to keep {keep} checkpoint(s) "
                            f"(--checkpoints-keep). Free space there or choose another --output-dir; refused before "
                            f"the first step")


#: Bytes a logged step adds (a train_log.csv row and its TensorBoard scalars); measured on the embedded run:
#: about 600 bytes, rounded up.
LOG_BYTES_PER_STEP = 1024


def run_disk_bytes(cfg, checkpoint: int, lora: int, image: int, validations: int) -> dict[str, int]:
    """The disk a whole run will use at most, from a measured checkpoint, LoRA file and validation image: the
    kept checkpoints (one more while the newest is written), the LoRA, the validation images and the logs."""
    written = (cfg.train_steps - 1) // cfg.checkpoint_every
    parts = {"checkpoints": min(cfg.checkpoints_keep + 1, written) * checkpoint, "LoRA": lora,
             "validation images": validations * image, "logs": cfg.train_steps // cfg.log_every * LOG_BYTES_PER_STEP}
    return {**parts, "total": sum(parts.values())}
