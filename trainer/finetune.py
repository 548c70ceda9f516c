"""LongAlign fine-tuning: decomposed preference optimisation with gradient reweighting (reward stage, paper §4),
or supervised segment-level alignment (align stage). LoRA on the UNet (peft), accelerate for devices/processes.

Demo on the CPU (built-in tiny random models and long prompts; a LoRA, logs and a report in ~a minute):

    python -m trainer.finetune

The paper's reward stage on SD1.5 with Denscore (one GPU; the release trained 3750 steps, batch 8 on 6 GPUs):

    python -m trainer.finetune --model /models/stable-diffusion-v1-5 --reward-model /models/denscore/Denscore \\
        --prompts long_captions.jsonl --output-dir outputs/reward --mixed-precision bf16 \\
        --init-lora s28750_lora_vis.pt --t5-model /models/t5-large --t5-adapter /models/s28750_adapter

Several GPUs or machines: the same command under ``accelerate launch`` (``--multi_gpu --num_processes 6``) or
``torchrun --nproc_per_node 6 -m trainer.finetune …``. Resume with ``--resume latest``. Every option can also
come from ``--config run.toml`` (flags > config file > demo profile > defaults); the resolved config is
written to ``<output_dir>/config.json``. User mistakes print one paragraph and exit with code 2 (``--debug``
keeps the traceback).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import sys
import time
from pathlib import Path

import torch

from longalign_core.child_process import report_progress
from longalign_core.errors import BadConfigError, run_cli
from longalign_core.out_of_memory import is_out_of_memory
from longalign_core.preference import PreferenceModel

from . import checkpoints as ckpt
from . import objective
from .config import EMBEDDED_MODELS, PROG, TrainConfig
from .data import batch_prompts
from .disk import check_free_space
from .dry_run import measure_run, process_age, report_run
from .loading.models import check_model_sources
from .memory import out_of_memory_advice
from .outputs import check_output_dir, clear_run, export_run_lora, save_outputs
from .parts import TrainingData, load_parts
from .run_log import TRAIN_COLUMNS, TRAIN_STATS, CSVLog, dump_debug, print_run_summary, reduce_stats
from .seeding import seed_global_rng, step_generator
from .stop_signal import StopSignal, run_stoppable
from .validation import Validation


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    """One run: the accelerate state and the run's parts (:class:`~trainer.parts.RunParts`, set up in
    ``__init__``), and the loop (:meth:`train`). What it offers: ``cfg`` (with the model's own resolution filled
    in), ``acc``, ``out`` (the output folder), ``parts``, ``totals`` (overflow counted over the run), and the
    pieces of the loop the dry run and the tests call: :meth:`optimizer_step`, :meth:`save_checkpoint`,
    :meth:`load_checkpoint`."""

    def __init__(self, cfg: TrainConfig, judge: PreferenceModel | None = None):
        """``judge``: a :class:`~longalign_core.preference.PreferenceModel` to train against instead of loading
        ``--reward-model`` (which is then only a label; the judge's ``name`` goes in the logs and the LoRA)."""
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        has_gpu = torch.cuda.is_available()
        if cfg.mixed_precision is None:
            cfg = dataclasses.replace(cfg, mixed_precision="bf16" if has_gpu else "no")
        if cfg.mixed_precision == "fp16" and not has_gpu:
            raise BadConfigError("--mixed-precision fp16 needs a CUDA GPU: torch cannot run this model in fp16 on "
                                 "the CPU. Use --mixed-precision no (the CPU default) or bf16")
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        # Everything the user gave is checked before anything is written or loaded: a typo in a model path, a
        # bad prompts file (one message, not minutes of loading, and no empty output folder).
        check_model_sources(cfg if judge is None else dataclasses.replace(cfg, reward_model=None))  # a label then
        check_output_dir(cfg)
        data = TrainingData.load(cfg)  # every training image is opened here, before a model loads
        self.trackers = ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []
        # cpu=True on a machine without an accelerator lets accelerate pick up torchrun's processes (gloo).
        has_accelerator = has_gpu or torch.backends.mps.is_available()
        self.acc = Accelerator(cpu=not has_accelerator, mixed_precision=cfg.mixed_precision,
                               gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                               log_with=self.trackers or None,
                               project_config=ProjectConfiguration(project_dir=str(self.out),
                                                                   logging_dir=str(self.out / "logs")))
        if self.acc.is_main_process:
            if cfg.overwrite_output_dir and not cfg.resume and (removed := clear_run(self.out)):
                self.acc.print(f"--overwrite-output-dir: deleted the earlier run's {', '.join(removed)} in {self.out}")
            self.out.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()
        self.totals = {"prompts_cut": 0, "tokens_lost": 0}
        self.parts, self.cfg = load_parts(cfg, self.acc, data, judge)
        if self.acc.is_main_process:  # after loading: the resolution default comes from the model
            self.cfg.save(self.out / "config.json")

    # -- the loop ---------------------------------------------------------------------------------------------
    def optimizer_step(self, step: int) -> dict[str, float]:
        """One optimizer step (all its micro-batches): loss, backward, clip, AdamW, LR schedule. Returns this
        process's statistics summed over the micro-batches."""
        cfg, acc, parts = self.cfg, self.acc, self.parts
        lora, data, phases = parts.lora, parts.data, parts.phases
        sums: dict[str, float] = {}
        step_v = parts.scoring.reward_v.for_step(step) if cfg.stage == "reward" else None  # V of the whole step
        for micro in range(cfg.gradient_accumulation_steps):
            draw = step * cfg.gradient_accumulation_steps + micro
            gen = step_generator(cfg.seed, draw, acc.process_index)
            seed_global_rng(cfg.seed, draw, acc.process_index)
            dump = {} if cfg.dump_debug else None
            with acc.accumulate(lora.unet):
                if cfg.stage == "reward":
                    prompts = batch_prompts(data.prompts, cfg.seed, step, micro, cfg.train_batch_size,
                                            acc.process_index, acc.num_processes, cfg.gradient_accumulation_steps)
                    loss, stats = objective.reward_loss(cfg, acc, lora, parts.text, parts.base, parts.scoring.judge,
                                                        prompts, gen, step_v, dump, phases)
                else:
                    batch = data.align.batch(step, micro, acc.process_index, acc.num_processes)
                    loss, stats = objective.align_loss(cfg, acc, lora, parts.text, parts.base, batch, gen, phases)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"the loss became {float(loss.detach())} at step {step}: stopping. Lower --learning-rate, use "
                        f"--mixed-precision no (or bf16 instead of fp16), or check the models; the last good "
                        f"checkpoint is in {self.out / 'checkpoints'}")
                with phases("backward"):
                    acc.backward(loss)
                with phases("optimizer"):
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(lora.params, cfg.max_grad_norm)
                    parts.optimizer.step()
                    parts.lr_scheduler.step()
                    parts.optimizer.zero_grad(set_to_none=True)
            for k, v in {"loss": float(loss.detach()), **stats}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if dump is not None:
                dump_debug(self.out, acc.process_index, lora.params, step, dump)
        return sums

    def train(self, stop: StopSignal | None = None) -> Path:
        """Resume if asked, validate, run the steps (logging, checkpoints, validations), write the outputs. After
        a ``stop`` signal the step under way ends, is checkpointed on every process, and ``Stopped`` is raised."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        main = acc.is_main_process
        stop = (stop or StopSignal("the step under way")).arm()  # (not entered: never requested)
        start = self.load_checkpoint(cfg.resume) if cfg.resume else 0
        check_free_space(self.out, self.parts.lora, acc.num_processes, cfg.checkpoints_keep)
        if self.trackers:  # a resumed run hides the events it is about to log again
            acc.init_trackers("longalign", config={k: v for k, v in cfg.to_dict().items()
                                                   if isinstance(v, (int, float, str, bool))},
                              init_kwargs={"tensorboard": {"purge_step": start + 1}} if start else {})
        tlog = CSVLog(self.out / "train_log.csv", TRAIN_COLUMNS, main)
        validate = Validation(cfg, acc, self.parts, self.out)
        if start:
            tlog.keep_until(start)
            validated = validate.keep_until(start)
        acc.wait_for_everyone()
        if main:
            print_run_summary(cfg, acc, self.parts, start)
        due = start == 0 or (cfg.validation_every and start % cfg.validation_every == 0 and start not in validated
                             and start < cfg.train_steps)
        early = stop.agreed(acc)
        if early:  # during loading: nothing new to keep
            raise ckpt.stopped(acc, self.out, early, start, cfg.train_steps, None)
        if due:  # a run killed between a checkpoint and its validation validates on resume
            validate(start)
        unet = self.parts.lora.unet
        unet.train()
        bar = tqdm(range(start, cfg.train_steps), initial=start, total=cfg.train_steps, disable=not main,
                   desc="training")
        started = time.time()
        for step in bar:
            t0 = time.time()
            try:
                sums = self.optimizer_step(step)
            except Exception as exc:  # noqa: BLE001 — running out of memory is a setting to change, not a bug
                if is_out_of_memory(exc):
                    raise BadConfigError(out_of_memory_advice(cfg, f"step {step}")) from None
                raise
            done = step + 1
            micro_n = cfg.gradient_accumulation_steps
            local = {k: v if TRAIN_STATS.get(k) == "sum" else v / micro_n for k, v in sums.items()}
            row = {"step": done, **reduce_stats(acc, local)}
            for k in self.totals:
                self.totals[k] += int(row.get(k, 0))
            row.update(prompts_cut_total=self.totals["prompts_cut"], tokens_lost_total=self.totals["tokens_lost"],
                       lr=self.parts.lr_scheduler.get_last_lr()[0], seconds=round(time.time() - t0, 3))
            if main:  # for a parent that asked for them (the ComfyUI node): step, pace, time left
                per_step = (time.time() - started) / (done - start)
                report_progress(step=done, total=cfg.train_steps, seconds_per_step=round(per_step, 3),
                                eta=round(per_step * (cfg.train_steps - done), 1))
            if done % cfg.log_every == 0 and main:
                tlog.write(row)
                acc.log({k: v for k, v in row.items() if k != "step"}, step=done)
                bar.set_postfix(loss=f"{row['loss']:.4f}", reward=f"{row.get('reward', 0):.4f}")
            halt = stop.agreed(acc)  # every process asks at this point of every step, and all stop together
            if halt or done % cfg.checkpoint_every == 0 and done < cfg.train_steps:
                saved = self.save_checkpoint(done)
            if halt:
                bar.close()
                acc.end_training()
                raise ckpt.stopped(acc, self.out, halt, done, cfg.train_steps, saved)
            if cfg.validation_every and done % cfg.validation_every == 0 and done < cfg.train_steps:
                validate(done)
                unet.train()
        validate(cfg.train_steps)
        lora_file = save_outputs(cfg, acc, self.parts, self.out)
        acc.end_training()
        return lora_file

    # -- checkpoints, validation, outputs ---------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        """Checkpoint ``step`` (accelerate's state, the totals and the LoRA file of that step); returns its folder."""
        export = lambda folder: export_run_lora(self.cfg, self.parts, folder, step)  # noqa: E731
        return ckpt.save_checkpoint(self.acc, self.out, step, {"seed": self.cfg.seed, "totals": self.totals},
                                    self.cfg.checkpoints_keep, export=export)

    def load_checkpoint(self, which: str) -> int:
        """Restore a checkpoint (``latest`` or a folder); returns its step."""
        path, state = ckpt.load_checkpoint(self.acc, self.out, which)
        self.totals = {**self.totals, **state.get("totals", {})}
        self.acc.print(f"resumed from {path} at step {state['step']}")
        return state["step"]


def dry_run(cfg: TrainConfig, startup: float = 0.0) -> dict:
    """``--dry-run``: the run of ``cfg`` built in a temporary folder (removed afterwards) and measured
    (:mod:`trainer.dry_run`); the result's ``report`` is the markdown printed and written to
    ``<output_dir>/dry_run.md``. ``startup``: the seconds the process spent before building the Trainer."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="longalign-dry-run-") as work:
        t0 = time.perf_counter()
        run = Trainer(dataclasses.replace(cfg, output_dir=work, resume=None))
        load = time.perf_counter() - t0
        measured = measure_run(run.cfg, run.acc, run.parts, run.out, run.optimizer_step, run.save_checkpoint)
    return report_run(cfg.output_dir, measured, load, startup)


def main(argv: list[str] | None = None) -> int:
    """Train; user mistakes raise :class:`~longalign_core.errors.LongAlignError` (see :func:`cli`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("accelerate", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per weights file otherwise
    cfg = TrainConfig.from_args(argv, description=__doc__)
    if cfg.dry_run:
        print(dry_run(cfg, startup=process_age())["report"], flush=True)
        return 0
    if cfg.model in (None, *EMBEDDED_MODELS):
        which = "SDXL" if cfg.model == "embedded-sdxl" else "SD1.5"
        print(f"{'No --model given' if cfg.model is None else '--model ' + cfg.model}: training the built-in tiny "
              f"random-weight {which}-shaped pipeline on the CPU demo profile (real file formats and code paths; "
              f"the pictures are noise). Pass --model for a real run.", flush=True)
    try:  # a stop signal ends the step under way, checkpoints it and exits 130 / 143 (trainer/stop_signal.py)
        return run_stoppable(lambda stop: Trainer(cfg).train(stop), "the step under way", PROG, argv,
                             after_disk_full=lambda: ckpt.resume_hint(cfg.output_dir, PROG, argv))
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3


def cli(argv: list[str] | None = None) -> int:
    """``python -m trainer.finetune``: user mistakes print one paragraph (no traceback) and exit with code 2."""
    return run_cli(main, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(cli())
