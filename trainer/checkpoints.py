"""Checkpoints of a run and resuming from them.

A checkpoint holds what trains and nothing else: the LoRA's fp32 weights (``lora_weights.safetensors``; the frozen
UNet is never written, so a checkpoint is megabytes, not gigabytes), the trained T5 adapter if any, AdamW's state,
the LR schedule, every process's RNG states (accelerate's files) and ``trainer_state.json`` (the step: the data
order is a function of it). Next to them, ``longalign_lora.safetensors`` is the LoRA of that step as a file
ComfyUI loads, so a run can be stopped at any kept checkpoint. A checkpoint is written to
``checkpoint-NNNNNN.tmp`` and renamed when complete, so a killed save never replaces a good one; the newest
``keep`` are kept."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from longalign_core.errors import BadConfigError, BadModelFileError, disk_error, is_disk_error
from longalign_core.run_folder import CHECKPOINT_STATE_FILE, complete_checkpoints

STATE_FILE = CHECKPOINT_STATE_FILE
#: The trainable parameters of the UNet (the LoRA), by parameter name, fp32: what resume restores exactly.
LORA_WEIGHTS = "lora_weights.safetensors"


def save_only_what_trains(acc, unet) -> None:
    """Make ``acc.save_state`` / ``acc.load_state`` write and read only ``unet``'s trainable parameters (the
    LoRA) instead of its whole state dict (accelerate's pre-hooks; the pattern of diffusers' LoRA scripts)."""
    from safetensors.torch import save_file

    from longalign_core.errors import read_safetensors

    def is_unet(model) -> bool:
        return acc.unwrap_model(model) is unet

    def save(models, weights, output_dir):
        for i in reversed(range(len(models))):
            if is_unet(models[i]):
                weights.pop(i)  # accelerate then writes no model.safetensors for the UNet
                if acc.is_main_process:
                    trainable = {n: p.detach().float().cpu().contiguous() for n, p in unet.named_parameters()
                                 if p.requires_grad}
                    save_file(trainable, str(Path(output_dir) / LORA_WEIGHTS))

    def load(models, input_dir):
        for model in [m for m in models if is_unet(m)]:
            models.remove(model)
            state, _ = read_safetensors(Path(input_dir) / LORA_WEIGHTS, "checkpoint LoRA weights")
            trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
            if set(state) != trainable:
                missing, extra = sorted(trainable - set(state)), sorted(set(state) - trainable)
                raise BadModelFileError(f"{Path(input_dir) / LORA_WEIGHTS} does not hold this run's LoRA "
                                        f"({len(missing)} layers missing, e.g. {missing[:2]}; {len(extra)} "
                                        f"unknown, e.g. {extra[:2]}): was it written with another --lora-rank or "
                                        f"base model?")
            unet.load_state_dict(state, strict=False)

    acc.register_save_state_pre_hook(save)
    acc.register_load_state_pre_hook(load)


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (an interrupted save leaves only a ``.tmp`` folder, ignored here)."""
    return complete_checkpoints(output_dir)


def save_checkpoint(acc, output_dir: Path, step: int, state: dict, keep: int,
                    export: Callable[[Path], None] | None = None) -> Path:
    """The accelerator's state (``acc.save_state``) plus ``state`` (the run's counters, JSON) as
    ``checkpoints/checkpoint-<step>``; ``export(folder)`` adds files on the main process (the LoRA file) before
    the folder is complete. Older checkpoints beyond the newest ``keep`` are deleted."""
    folder = Path(output_dir) / "checkpoints"
    final = folder / f"checkpoint-{step:06d}"
    tmp = folder / f"checkpoint-{step:06d}.tmp"
    if acc.is_main_process:
        for stale in folder.glob("checkpoint-*.tmp"):  # left by a run killed while saving (kill -9)
            shutil.rmtree(stale, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    try:
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            if export is not None:
                export(tmp)
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}))
    except BaseException as exc:  # a full disk, a second Ctrl-C: the older checkpoints stay, no .tmp is left
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and is_disk_error(exc):
            raise disk_error(tmp, exc) from None
        raise
    if acc.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def stopped(acc, output_dir: Path, signum: int, step: int, total: int, saved: Path | None):
    """The :class:`~trainer.stop_signal.Stopped` of a run in ``output_dir`` stopped by ``signum`` after ``step`` of
    ``total`` (``saved``: the checkpoint of that step, None when the stop came before the first step)."""
    from .stop_signal import Stopped

    found = checkpoints(output_dir)
    if saved is not None:
        detail = f"checkpoint {saved} holds step {step} of {total}"
    elif found:
        detail = f"no step ran; the latest checkpoint, {found[-1]}, is unchanged"
    else:
        detail = "no step ran and nothing was saved"
    return Stopped(signum, detail, ["--resume", "latest"] if saved is not None or found else [],
                   acc.num_processes, acc.is_main_process)


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


def resume_hint(output_dir, prog: str, argv: list[str]) -> str:
    """After a failed write: the last complete checkpoint (intact: checkpoints are written aside and renamed) and
    the command that continues from it."""
    from .stop_signal import resume_command

    found = checkpoints(output_dir)
    if not found:
        return "No checkpoint was written yet: run the same command again once there is room"
    return (f"The last complete checkpoint, {found[-1]}, is intact; once there is room, resume with: "
            f"{resume_command(prog, argv, ['--resume', 'latest'])}")
