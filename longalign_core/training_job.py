"""What the training and evaluation nodes ask of the trainer, in plain Python (no ComfyUI, no torch): the node's
inputs turned into ``python -m trainer.finetune`` / ``python -m trainer.evaluate`` options, the run folders, the
checks made before anything loads (the LoRA name, the prompts, a name already used), and the finished LoRA
published into ``models/loras`` in one rename."""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Sequence

from .child_process import latest_checkpoint
from .errors import BadConfigError, BadInputError
from .io_utils import atomic_path

TRAIN_MODES = ("will it fit", "train", "resume")
EVALUATE_MODES = ("evaluate", "resume")
#: The trainer's own choices (trainer.config.CHOICES), repeated here because nodes never import the trainer.
REWARD_DIRECTIONS = ("auto", "training", "reference", "batch")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
#: The trainer's defaults of the options the node shows (trainer.config.TrainConfig; a test keeps them equal).
TRAIN_DEFAULTS = {"train_steps": 3750, "lora_rank": 32, "learning_rate": 3e-5, "train_batch_size": 8,
                  "gradient_accumulation_steps": 1, "sample_steps": 50, "sample_grad_steps": 5,
                  "reward_omega": 0.3, "seed": 0, "reward_direction": "auto", "checkpoint_every": 500,
                  "validation_every": 500}
#: The evaluation's defaults the node shows (trainer.evaluate.config.EvalConfig).
EVALUATE_DEFAULTS = {"seeds": 2, "seed": 0}
NO_FILE = "(none)"
PROMPT_FILE_EXTENSIONS = (".txt", ".jsonl")
#: The trainer's LoRA file in its run folder (trainer.lora_layers.LORA_FILE).
RUN_LORA_FILE = "longalign_lora.safetensors"
#: The evaluation's settings file in its folder (trainer.evaluate.files.SETTINGS_FILE).
EVALUATION_SETTINGS_FILE = "evaluation.json"
_BAD_NAME = re.compile(r'[<>:"/\\|?*\x00-\x1f]')


def clean_lora_name(name: str, option: str = "lora_name") -> str:
    """The LoRA's file stem: ``name`` without ``.safetensors``; a name that cannot be one file in models/loras
    (empty, a path, characters Windows refuses) is one :class:`BadInputError` naming it."""
    stem = (name or "").strip()
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if not stem or stem in (".", "..") or _BAD_NAME.search(stem) or stem.endswith((".", " ")):
        raise BadInputError(f"{option} {name!r} is not a usable file name: give a plain name such as "
                            f"longalign_lora (letters, digits, - and _; no folder, none of <>:\"/\\|?*), the LoRA "
                            f"lands as models/loras/<name>.safetensors")
    return stem


def prompt_lines(text: str) -> list[str]:
    """The prompts of the multiline input: one per non-blank line."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def training_prompts_file(prompts: str, prompts_file: str | None, input_dir: str | os.PathLike,
                          run_dir: str | os.PathLike) -> Path:
    """The file the trainer reads: the chosen file in ComfyUI's input/ (it wins over the text), else the text's
    lines written to ``<run_dir>/prompts.txt``. No prompts at all is a :class:`BadInputError`."""
    if prompts_file and prompts_file != NO_FILE:
        path = Path(input_dir) / prompts_file
        if not path.is_file():
            raise BadInputError(f"prompts_file {prompts_file!r}: not found in ComfyUI's input folder {input_dir}; "
                                f"put a .txt (one prompt per line) or .jsonl ('prompt' or 'caption' field) file "
                                f"there, or choose {NO_FILE} and type the prompts")
        return path
    lines = prompt_lines(prompts)
    if not lines:
        raise BadInputError("prompts: no training prompts (the text is empty and no prompts_file is chosen). Type "
                            "your long prompts, one per line, or choose a .txt/.jsonl file of ComfyUI's input "
                            "folder as prompts_file")
    path = Path(run_dir) / "prompts.txt"
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def list_prompt_files(input_dir: str | os.PathLike) -> list[str]:
    """``(none)`` and the .txt/.jsonl files under ComfyUI's input folder (relative paths, / separated)."""
    root = Path(input_dir)
    found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and p.suffix.lower() in PROMPT_FILE_EXTENSIONS) if root.is_dir() else []
    return [NO_FILE, *found]


def extra_arguments(text: str, option: str = "extra_options") -> list[str]:
    """More trainer options, written as on the command line (``--validation-every 100 --lr-warmup-steps 0``)."""
    try:
        return shlex.split(text or "")
    except ValueError as exc:
        raise BadInputError(f"{option} {text!r}: {exc} (write the options as on a command line, e.g. "
                            f"--lr-warmup-steps 0)") from None


def train_arguments(*, mode: str, checkpoint: str, preference_model: str, prompts_path: str | os.PathLike,
                    output_dir: str | os.PathLike, steps: int, lora_rank: int, learning_rate: float, batch_size: int,
                    gradient_accumulation: int, resolution: int, sample_steps: int, gradient_steps: int,
                    omega: float, seed: int, reward_direction: str, mixed_precision: str, checkpoint_every: int,
                    validation_every: int | None = None, extra: Sequence[str] = ()) -> list[str]:
    """The options of ``python -m trainer.finetune`` for the node's inputs (0 / "auto": the trainer's own
    default). ``extra`` comes last, so it can override any of them."""
    if mode not in TRAIN_MODES:
        raise BadConfigError(f"mode {mode!r} is not one of {', '.join(TRAIN_MODES)}")
    args = ["--model", str(checkpoint), "--reward-model", str(preference_model), "--prompts", str(prompts_path),
            "--output-dir", str(output_dir), "--train-steps", steps, "--lora-rank", lora_rank,
            "--learning-rate", repr(float(learning_rate)), "--train-batch-size", batch_size,
            "--gradient-accumulation-steps", gradient_accumulation, "--sample-steps", sample_steps,
            "--sample-grad-steps", gradient_steps, "--reward-omega", repr(float(omega)), "--seed", seed,
            "--reward-direction", reward_direction, "--checkpoint-every", checkpoint_every]
    if resolution:
        args += ["--resolution", resolution]
    if validation_every is not None:
        args += ["--validation-every", validation_every]
    if mixed_precision != "auto":
        args += ["--mixed-precision", mixed_precision]
    if mode == "will it fit":
        args.append("--dry-run")
    elif mode == "resume":
        args += ["--resume", "latest"]
    return [str(a) for a in args] + list(extra)


def evaluate_arguments(*, mode: str, checkpoint: str, loras: Sequence[tuple[str, float]], preference_model: str,
                       prompts_path: str | os.PathLike | None, num_prompts: int, seeds: int, steps: int, seed: int,
                       output_dir: str | os.PathLike, resolution: int = 0, extra: Sequence[str] = ()) -> list[str]:
    """The options of ``python -m trainer.evaluate`` (0: the evaluation's default; no prompts file: the pack's 64
    held-out prompts)."""
    if mode not in EVALUATE_MODES:
        raise BadConfigError(f"mode {mode!r} is not one of {', '.join(EVALUATE_MODES)}")
    args = ["--model", str(checkpoint), "--reward-model", str(preference_model), "--seeds", seeds, "--seed", seed,
            "--output-dir", str(output_dir)]
    for path, strength in loras:
        args += ["--lora", f"{path}:{float(strength)!r}"]
    if prompts_path is not None:
        args += ["--prompts", str(prompts_path)]
    if num_prompts:
        args += ["--num-prompts", num_prompts]
    if steps:
        args += ["--steps", steps]
    if resolution:
        args += ["--resolution", resolution]
    if mode == "resume":
        args.append("--resume")
    return [str(a) for a in args] + list(extra)


def prepare_train_run(mode: str, run_dir: str | os.PathLike, lora_file: str | os.PathLike, lora_name: str,
                      overwrite: bool) -> None:
    """Refuse what would lose work, before anything loads: a LoRA of that name in models/loras (unless mode
    resume or overwrite), a run folder with checkpoints for mode train (unless overwrite: then it starts again),
    mode resume without a checkpoint. A run folder with nothing to keep (a start that failed) is cleared."""
    run_dir, lora_file = Path(run_dir), Path(lora_file)
    if mode == "will it fit":
        return
    if lora_file.exists() and mode != "resume" and not overwrite:
        raise BadInputError(f"lora_name {lora_name!r}: {lora_file} already exists. Give another lora_name, switch "
                            f"overwrite on to replace it, or use mode resume to continue its run")
    kept = latest_checkpoint(run_dir)
    if mode == "resume":
        if kept is None:
            raise BadInputError(f"mode resume: there is no checkpoint of a run named {lora_name!r} in {run_dir} to "
                                f"continue; use mode train to start it")
        return
    finished = (run_dir / RUN_LORA_FILE).exists()
    if (kept or finished) and not overwrite:
        what = f"a checkpoint of step {kept[1]}" if kept else "a finished LoRA"
        raise BadInputError(f"lora_name {lora_name!r}: its run folder {run_dir} holds {what}. Use mode resume to "
                            f"continue it, switch overwrite on to start again (the folder is replaced), or give "
                            f"another lora_name")
    if run_dir.exists():
        shutil.rmtree(run_dir)


def publish_lora(run_lora: str | os.PathLike, lora_file: str | os.PathLike) -> Path:
    """Copy the run's finished LoRA to ``lora_file`` (models/loras/<name>.safetensors) in one rename: ComfyUI's
    LoRA list never shows a half-written file."""
    run_lora, lora_file = Path(run_lora), Path(lora_file)
    if not run_lora.is_file():
        raise BadInputError(f"the trainer finished but wrote no {run_lora}; see the run's log in {run_lora.parent}")
    with atomic_path(lora_file) as tmp:
        shutil.copyfile(run_lora, tmp)
    return lora_file


def prepare_evaluation(mode: str, run_dir: str | os.PathLike, run_name: str) -> None:
    """Mode evaluate in a folder that already holds an evaluation, or resume without one, is refused by name."""
    held = (Path(run_dir) / EVALUATION_SETTINGS_FILE).is_file()
    if mode == "evaluate" and held:
        raise BadInputError(f"run_name {run_name!r}: {run_dir} already holds an evaluation. Use mode resume to "
                            f"continue it, or give another run_name")
    if mode == "resume" and not held:
        raise BadInputError(f"mode resume: there is no evaluation named {run_name!r} in {run_dir} to continue; use "
                            f"mode evaluate to start it")
