"""``python -m trainer.finetune … --dry-run``: will this run fit, and how long will it take?

It loads everything the options name, exactly as the run would, runs one warm-up and one measured training step,
one validation, one checkpoint and the final outputs (LoRA file, report), and prints (and writes to
``<output_dir>/dry_run.md``, the only file it writes there) what each model part holds in memory, the peak memory
of the step on this device, the seconds of a step split by phase, and the projected time of the whole run,
start-up included (the process's interpreter start and imports, the first step's warm-up beyond a measured step,
writing the outputs). A step that runs out of memory is reported with the setting to change first, before hours
are spent. The models, caches and checkpoint of the trial live in a temporary folder that is removed afterwards
(:func:`trainer.finetune.dry_run` builds the run there; :func:`measure_run` and :func:`report_run` are this
module's part)."""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from longalign_core.errors import BadConfigError, format_bytes, free_space
from longalign_core.out_of_memory import is_out_of_memory

from .disk import run_disk_bytes
from .lora_layers import LORA_FILE
from .memory import GiB, PeakMemory, module_bytes, out_of_memory_advice, process_peak_bytes, total_memory
from .run_log import CSVLog
from .validation import validate

if TYPE_CHECKING:
    from .parts import RunParts

REPORT_FILE = "dry_run.md"


def model_parts(parts: RunParts) -> list[tuple[str, int, int, str]]:
    """(part, parameters, bytes, dtype) of what the run holds: frozen parts, the LoRA, its gradients and AdamW's
    moments (measured from the optimizer's state after a step)."""
    lora, base, text, scoring = parts.lora, parts.base, parts.text, parts.scoring
    rows = [("UNet (frozen)", *module_bytes(lora.module, trainable=False)), ("VAE", *module_bytes(base.vae))]
    if text.cache is not None:  # --cache-text-embeddings: the encoders are gone, their outputs held on the CPU
        rows.append((f"text embeddings of {len(text.cache)} prompts (cached on the CPU; text encoders freed)", 0,
                     text.cache.nbytes, str(text.cache.pad.dtype).replace("torch.", "")))
    else:
        rows.append(("text encoder", *module_bytes(base.text_encoder)))
        if base.text_encoder_2 is not None:
            rows.append(("text encoder 2 (bigG)", *module_bytes(base.text_encoder_2)))
    if parts.t5 is not None:
        rows += [("T5 encoder", *module_bytes(parts.t5.encoder)), ("T5 adapter", *module_bytes(parts.t5_adapter))]
    dropped = "; image tower only, text features cached" if scoring.judge.text_tower_dropped else ""
    rows.append((f"preference model ({Path(scoring.source).name}{dropped})", *module_bytes(scoring.judge.model)))
    n_lora = sum(p.numel() for p in lora.params)
    lora_bytes = sum(p.numel() * p.element_size() for p in lora.params)
    rows.append((f"LoRA, rank {lora.rank} on {len(lora.targets)} layers (trained)", n_lora, lora_bytes, "float32"))
    rows.append(("LoRA gradients", n_lora, lora_bytes, "float32"))
    state = [t for s in parts.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    rows.append(("AdamW state (2 moments)", sum(t.numel() for t in state),
                 sum(t.numel() * t.element_size() for t in state), "float32"))
    return rows


def measure_step(optimizer_step: Callable[[int], dict], parts: RunParts, device: torch.device) -> dict:
    """One warm-up and one measured ``optimizer_step``: seconds, per-phase seconds (``parts.phases``), peak
    memory of the step above what was held before it, and what was held."""
    parts.lora.unet.train()
    t0 = time.perf_counter()
    optimizer_step(0)  # warm-up: optimizer state, kernels, one-time buffers
    warmup = time.perf_counter() - t0
    timer = parts.phases
    timer.reset()
    timer.enabled = True
    try:
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            optimizer_step(1)
            seconds = time.perf_counter() - t0
    finally:
        timer.enabled = False
    phases = dict(timer.seconds)
    phases["rest"] = max(0.0, seconds - sum(phases.values()))
    return {"seconds": seconds, "warmup_seconds": warmup, "phases": phases, "peak_bytes": mem.increase,
            "held_bytes": mem.base, "device_peak_bytes": mem.peak}


def process_age() -> float:
    """Seconds since this process started: the interpreter's start-up and the imports before the run."""
    try:
        import psutil  # accelerate's dependency

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # noqa: BLE001 — an estimate only; without it the projection leaves start-up out
        return 0.0


def project(cfg, load: float, step: float, validation: float, checkpoint: float, startup: float = 0.0,
            warmup: float = 0.0, outputs: float = 0.0) -> dict:
    """Seconds of the whole run: start-up (interpreter and imports), loading, the first step's warm-up beyond a
    measured step, every step, the validations (at the start, every ``--validation-every`` steps and at the end),
    the checkpoints (every ``--checkpoint-every`` steps) and writing the outputs."""
    validations = (1 + (cfg.train_steps - 1) // cfg.validation_every + 1 if cfg.validation_every else 2) \
        if cfg.validation_prompts != 0 else 0
    checkpoints = (cfg.train_steps - 1) // cfg.checkpoint_every
    total = (startup + load + max(0.0, warmup - step) + cfg.train_steps * step + validations * validation
             + checkpoints * checkpoint + outputs)
    return {"validations": validations, "checkpoints": checkpoints, "total_seconds": total}


def measure_run(cfg, acc, parts: RunParts, out: Path, optimizer_step: Callable[[int], dict],
                save_checkpoint: Callable[[int], Path]) -> dict:
    """Measure a run built in the temporary folder ``out`` (:func:`trainer.finetune.dry_run` builds it):
    ``optimizer_step`` once to warm up and once measured, one validation, ``save_checkpoint`` once, the final
    outputs once; what each part holds and what the disk will take. ``cfg`` is the built run's (its resolution
    filled in). Running out of memory becomes the setting to change first."""
    device = acc.device
    where = f"a {cfg.stage}-stage step ({cfg.train_batch_size} per process, {cfg.resolution} px)"
    try:
        step = measure_step(optimizer_step, parts, device)
        t0 = time.perf_counter()
        with PeakMemory(device) as val_mem:
            validate(cfg, acc, parts, out, 0, CSVLog(out / "v.csv", [], False))
        validation = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 — only running out of memory is turned into advice
        if is_out_of_memory(exc):
            raise BadConfigError(out_of_memory_advice(cfg, where)) from None
        raise
    t0 = time.perf_counter()
    folder = save_checkpoint(1)
    checkpoint = time.perf_counter() - t0
    checkpoint_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    lora_bytes = (folder / LORA_FILE).stat().st_size if (folder / LORA_FILE).is_file() else 0
    image_bytes = sum(p.stat().st_size for p in (out / "validation").glob("*.png"))

    from .outputs import save_outputs

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # its "wrote …" line names the trial's folder
        save_outputs(cfg, acc, parts, out)
    outputs = time.perf_counter() - t0
    return {"config": cfg, "device": device, "step": step, "validation_seconds": validation,
            "validation_peak_bytes": val_mem.increase, "checkpoint_seconds": checkpoint,
            "checkpoint_bytes": checkpoint_bytes, "lora_bytes": lora_bytes, "image_bytes": image_bytes,
            "parts": model_parts(parts), "process_peak_bytes": process_peak_bytes(),
            "device_bytes": total_memory(device), "processes": acc.num_processes,
            "is_main_process": acc.is_main_process, "outputs_seconds": outputs}


def report_run(output_dir, measured: dict, load: float, startup: float) -> dict:
    """The dry run's result: ``measured`` (:func:`measure_run`) with the seconds of loading (``load``) and of
    start-up, the projected run and its disk; its ``report`` (markdown) is written to
    ``<output_dir>/dry_run.md`` by the main process. ``startup``: the seconds a run's process spends before it
    builds the Trainer (the command line passes :func:`process_age`, measured in its own fresh process)."""
    cfg, step = measured["config"], measured["step"]
    result = {**measured, "load_seconds": load, "startup_seconds": startup, "output_dir": output_dir,
              **project(cfg, load, step["seconds"], measured["validation_seconds"], measured["checkpoint_seconds"],
                        startup, step["warmup_seconds"], measured["outputs_seconds"])}
    result["disk"] = run_disk_bytes(cfg, measured["checkpoint_bytes"], measured["lora_bytes"],
                                    measured["image_bytes"], result["validations"])
    result["report"] = format_report(result)
    if result["is_main_process"]:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        from longalign_core.io_utils import atomic_write_text

        atomic_write_text(out / REPORT_FILE, result["report"])
    return result


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB // 2 else f"{n / 2**20:.1f} MiB"


def _free(folder) -> str:
    where, free = free_space(folder)
    return f"{where} has {format_bytes(free)} free"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_report(r: dict) -> str:
    """The dry run's findings as markdown."""
    cfg, step, dev = r["config"], r["step"], r["device"]
    on = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    held = step["device_peak_bytes"]
    fits = held <= r["device_bytes"] if r["device_bytes"] else True
    lines = [f"# Dry run: {cfg.stage} stage, {cfg.model or 'embedded'}", "",
             f"Device: {on} ({_gib(r['device_bytes'])}), {r['processes']} process(es); frozen weights "
             f"{cfg.mixed_precision}, {cfg.resolution} px, batch {cfg.train_batch_size} per process × "
             f"{cfg.gradient_accumulation_steps} micro-batches, DDIM {cfg.sample_steps} steps with gradients at "
             f"{cfg.sample_grad_steps}.", "",
             "| part | parameters | memory | dtype |", "|---|---:|---:|---|"]
    for name, n, nbytes, dtype in r["parts"]:
        lines.append(f"| {name} | {n / 1e6:,.1f} M | {_gib(nbytes)} | {dtype} |")
    lines += ["", f"**Peak memory of one step: {_gib(held)}** on this device "
                  f"({_gib(step['peak_bytes'])} above the {_gib(step['held_bytes'])} held before it; validation "
                  f"{_gib(r['validation_peak_bytes'])} above). "
              + (f"It fits ({held / r['device_bytes']:.0%} of {_gib(r['device_bytes'])})." if fits else
                 f"It does NOT fit in {_gib(r['device_bytes'])}.")
              + (f" The process's highest resident memory, loading included: {_gib(r['process_peak_bytes'])}."
                 if dev.type == "cpu" else ""), "",
              f"**One step: {step['seconds']:.2f} s** — "
              + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(step["phases"].items(), key=lambda kv: -kv[1])), "",
              f"**Projected run: {_duration(r['total_seconds'])}** = start-up {r['startup_seconds']:.0f} s + "
              f"loading {r['load_seconds']:.0f} s + first-step warm-up "
              f"{max(0.0, step['warmup_seconds'] - step['seconds']):.1f} s + "
              f"{cfg.train_steps} steps × {step['seconds']:.2f} s + {r['validations']} validation(s) × "
              f"{r['validation_seconds']:.1f} s + {r['checkpoints']} checkpoint(s) × {r['checkpoint_seconds']:.1f} s "
              f"({_gib(r['checkpoint_bytes'])} each) + writing the outputs {r['outputs_seconds']:.1f} s. Every process "
              f"runs every step, so more processes add prompts per step, not steps per second.", "",
              f"**Disk: {format_bytes(r['disk']['total'])}** in {r['output_dir']} at most = "
              + ", ".join(f"{k} {format_bytes(v)}" for k, v in r["disk"].items() if k != "total")
              + f" ({min(cfg.checkpoints_keep + 1, r['checkpoints'])} checkpoint(s) of "
              f"{format_bytes(r['checkpoint_bytes'])} at once: --checkpoints-keep {cfg.checkpoints_keep} and the one "
              f"being written; {r['validations']} "
              f"validation image(s) as measured here; about 1 KB of logs a step); {_free(r['output_dir'])}.", ""]
    return "\n".join(lines)
