"""Checkpoints of a run and resuming from them. A checkpoint is written to ``checkpoint-NNNNNN.tmp`` and renamed
when complete, so a killed save never replaces a good one; the newest ``keep`` are kept."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from longalign_core.errors import BadConfigError, BadModelFileError

STATE_FILE = "trainer_state.json"


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (an interrupted save leaves only a ``.tmp`` folder, ignored here)."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
                  and not p.name.endswith(".tmp") and (p / STATE_FILE).is_file())


def save_checkpoint(acc, output_dir: Path, step: int, state: dict, keep: int) -> Path:
    """The accelerator's state (``acc.save_state``) plus ``state`` (the step and the run's counters, JSON) as
    ``checkpoints/checkpoint-<step>``; older checkpoints beyond the newest ``keep`` are deleted."""
    folder = Path(output_dir) / "checkpoints"
    final = folder / f"checkpoint-{step:06d}"
    tmp = folder / f"checkpoint-{step:06d}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def find_checkpoint(output_dir: Path, which: str) -> Path:
    """The checkpoint ``which`` names: ``latest`` or a folder. A missing one is a :class:`BadConfigError`."""
    found = checkpoints(output_dir)
    if which == "latest":
        if not found:
            raise BadConfigError(f"--resume latest: no complete checkpoint in {Path(output_dir) / 'checkpoints'}; "
                                 f"start without --resume")
        return found[-1]
    path = Path(which)
    if not (path / STATE_FILE).is_file():
        raise BadConfigError(f"--resume {path}: not a complete LongAlign checkpoint (no {STATE_FILE})"
                             f"; complete ones: {[str(p) for p in found] or 'none'}")
    return path


def load_checkpoint(acc, output_dir: Path, which: str) -> tuple[Path, dict]:
    """Restore the accelerator's state from a checkpoint (``latest`` or a folder); returns the folder and its
    ``trainer_state.json``. A corrupt or incomplete checkpoint is a :class:`BadModelFileError` that names it
    and the previous one."""
    path = find_checkpoint(output_dir, which)
    try:
        state = json.loads((path / STATE_FILE).read_text())
        state["step"] = int(state["step"])
        acc.load_state(str(path))
    except Exception as exc:  # noqa: BLE001 — torch, safetensors and accelerate raise many kinds for a bad file
        earlier = [p for p in checkpoints(output_dir) if p.name < path.name]
        fix = (f"resume from the previous one with --resume {earlier[-1]}" if earlier
               else "there is no earlier checkpoint: start again without --resume")
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise BadModelFileError(f"checkpoint {path} could not be loaded ({type(exc).__name__}: {detail}); it is "
                                f"corrupt or incomplete: {fix}, or delete {path}") from None
    return path, state
