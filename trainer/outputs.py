"""What a run leaves behind: the LoRA file (kohya keys, metadata saying how it was trained) at every checkpoint and
at the end, the trained T5 adapter, the merged UNet if asked, and the report."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from longalign_core.errors import BadConfigError
from longalign_core.lora import load_lora, merge_lora
from longalign_core.reference_direction import prompts_digest

from .loading.models import load_base_model
from .lora_layers import LORA_FILE, export_lora, lora_metadata

if TYPE_CHECKING:
    from .parts import RunParts

#: What a run writes into --output-dir (besides config.json): a folder holding any of the first
#: four holds a run; --overwrite-output-dir deletes all of them.
RUN_MARKERS = ("train_log.csv", "validation.csv", "checkpoints", LORA_FILE)
RUN_OUTPUTS = (*RUN_MARKERS, "validation_per_prompt.csv", "validation", "report.md", "report.png", "logs",
               "t5_adapter", "unet_merged", "debug")


def held_run(output_dir: Path) -> list[str]:
    """The names in ``output_dir`` that show a run was made there."""
    return [name for name in RUN_MARKERS if (Path(output_dir) / name).exists()]


def check_output_dir(cfg) -> None:
    """Refuse an ``--output-dir`` that holds a run unless ``--resume`` continues it or ``--overwrite-output-dir``
    starts afresh: a second run's logs would be appended to the first's and its report compare the two."""
    found = held_run(Path(cfg.output_dir))
    if found and not cfg.resume and not cfg.overwrite_output_dir:
        raise BadConfigError(f"--output-dir {cfg.output_dir} already holds a run ({', '.join(found)}): a new run "
                             f"there would append its logs to the old one's and its report would compare the two. "
                             f"Pass --resume latest to continue it, --overwrite-output-dir to delete its outputs "
                             f"and start again, or choose another --output-dir")


def clear_run(output_dir: Path) -> list[str]:
    """``--overwrite-output-dir``: delete the earlier run's outputs (only the names in :data:`RUN_OUTPUTS`)."""
    removed = []
    for name in RUN_OUTPUTS:
        path = Path(output_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def export_run_lora(cfg, parts: RunParts, folder: Path, steps: int) -> tuple[Path, dict]:
    """The LoRA as trained so far, as ``folder/longalign_lora.safetensors`` (kohya keys; ComfyUI loads it), with
    metadata naming the base model, the judge and the prompts it was trained on."""
    prompts = parts.data.prompts
    meta = lora_metadata(cfg, base_source=parts.base.source, reward_source=parts.scoring.source,
                         prompts_sha256=prompts_digest(prompts) if prompts else "", is_sdxl=parts.base.is_sdxl,
                         steps=steps)
    path = Path(folder) / LORA_FILE
    return path, export_lora(parts.lora.module, parts.lora.targets, path, meta)


def save_outputs(cfg, acc, parts: RunParts, out: Path) -> Path:
    """The LoRA file (kohya keys), the trained T5 adapter, the merged UNet if asked, and the report, in ``out``."""
    acc.wait_for_everyone()
    lora_file = out / LORA_FILE
    if acc.is_main_process:
        lora_file, pairs = export_run_lora(cfg, parts, out, cfg.train_steps)
        if cfg.train_t5_adapter:
            parts.t5_adapter.save_pretrained(out / "t5_adapter")
        if cfg.merge_checkpoint:
            merged = load_base_model(cfg.model, cfg.seed).unet
            for path in cfg.init_lora:
                merge_lora(merged, load_lora(path, parts.lora.targets))
            merge_lora(merged, pairs)
            merged.save_pretrained(out / "unet_merged")
        from .report import write_report

        write_report(out)
        print(f"wrote {lora_file} ({len(pairs)} LoRA layers, kohya keys: loads in ComfyUI's LoraLoader and "
              f"in LongAlign's Load LongSD LoRA) and {out / 'report.png'}", flush=True)
    acc.wait_for_everyone()
    return lora_file
