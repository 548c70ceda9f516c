"""The layout of a trainer run's folder, read by the trainer (resume, rotation) and by the nodes that run it as a
child process (what a stopped run kept): ``checkpoints/checkpoint-NNNNNN/`` holding ``trainer_state.json`` once
complete (an interrupted save leaves only a ``.tmp`` folder)."""

from __future__ import annotations

import os
import re
from pathlib import Path

#: The file a checkpoint folder holds once it is complete (written last).
CHECKPOINT_STATE_FILE = "trainer_state.json"


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of the run in ``run_dir``, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / CHECKPOINT_STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]
