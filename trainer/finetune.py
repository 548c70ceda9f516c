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
from longalign_core.clip_text import CLIPSegmentEncoder
from longalign_core.dtypes import DTYPES
from longalign_core.errors import BadConfigError, BadModelFileError, run_cli
from longalign_core.lora import load_lora, lora_targets, merge_lora
from longalign_core.out_of_memory import is_out_of_memory
from longalign_core.phase_timer import PhaseTimer
from longalign_core.preference import PreferenceModel, load_preference_model
from longalign_core.reference_direction import default_reference_prompts, direction_from_prompts

from . import checkpoints as ckpt
from . import objective
from .align_data import AlignData
from .conditioning import StepEncoder
from .config import EMBEDDED_MODELS, TrainConfig
from .data import batch_prompts, load_prompts, split_validation
from .direction import RewardDirection, resolve_direction
from .disk import check_free_space
from .loading.models import check_model_sources, load_base_model, reward_model_source
from .lora_layers import add_lora_output_dropout, attach_lora
from .memory import out_of_memory_advice
from .outputs import check_output_dir, clear_run, export_run_lora, save_outputs
from .run_log import TRAIN_COLUMNS, TRAIN_STATS, CSVLog, dump_debug, print_run_summary, reduce_stats
from .sampling import UNetConditioning
from .seeding import seed_global_rng, step_generator
from .stop_signal import StopSignal, run_stoppable
from .text_cache import cache_text_embeddings, pin_reward_texts
from .validation import Validation

PROG = "python -m trainer.finetune"


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    """One run: the models and the accelerate state (set up in ``__init__``), :meth:`train` is the loop."""

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
        self.cfg, self.judge = cfg, judge
        self.out = Path(cfg.output_dir)
        # Everything the user gave is checked before anything is written or loaded: a typo in a model path, a
        # bad prompts file (one message, not minutes of loading, and no empty output folder).
        check_model_sources(cfg if judge is None else dataclasses.replace(cfg, reward_model=None))  # a label then
        check_output_dir(cfg)
        self._load_data()
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
        self.weight_dtype = DTYPES.get(cfg.mixed_precision, torch.float32)  # "no" = fp32
        self.phases = PhaseTimer(self.acc.device, enabled=False)  # off unless a dry run or a benchmark measures a step
        self.totals = {"prompts_cut": 0, "tokens_lost": 0}
        self._load_models()
        if self.acc.is_main_process:  # after loading: the resolution default comes from the model
            self.cfg.save(self.out / "config.json")

    # -- set-up -----------------------------------------------------------------------------------------------
    def _load_data(self) -> None:
        """Training prompts (reward) or dataset rows (align), and the held-out validation prompts."""
        cfg = self.cfg
        if cfg.stage == "reward":
            pool, source = load_prompts(cfg.prompts, cfg.caption_column), cfg.prompts or "the built-in prompts"
        else:
            self.align_data = AlignData(cfg)
            pool, source = self.align_data.captions, cfg.prompts
        self.validation_prompts, train_rows = split_validation(pool, cfg.validation_prompts, cfg.seed, source)
        self.prompts = [pool[i] for i in train_rows] if cfg.stage == "reward" else None
        self.align_rows = train_rows if cfg.stage == "align" else None
        if cfg.stage == "align":  # every training image opened before a model loads
            self.align_data.check(train_rows)

    def _load_models(self) -> None:
        cfg, device, dtype = self.cfg, self.acc.device, self.weight_dtype
        # The main process first: it creates the embedded models once (saving under torch.distributed is
        # rank-aware in transformers, so other ranks must not write them), the others then read them.
        with self.acc.main_process_first():
            base = load_base_model(cfg.model, cfg.seed, dtype)
            reward_path = reward_model_source(cfg.reward_model, cfg.seed) if self.judge is None else self.judge.name
        self.base_source, self.is_sdxl = base.source, base.is_sdxl
        if self.is_sdxl and cfg.t5_model:
            raise BadConfigError("--t5-model/--t5-adapter: the LongSD T5 branch is made for SD1.5's 768-channel "
                                 f"conditioning, and {base.source} is an SDXL model (2048 channels); drop the T5 "
                                 "options for SDXL")
        unet = base.unet
        if cfg.resolution is None:  # the model's own: SD1.5 512, SDXL 1024 (the embedded ones 64)
            self.cfg = cfg = dataclasses.replace(cfg, resolution=int(unet.config.sample_size) * 8)
        if cfg.stage == "align":
            self.align_data.cfg = cfg
            self.align_data.bucket(cfg.resolution, cfg.buckets)
        unet.requires_grad_(False)
        self.targets = lora_targets(unet)
        for path in cfg.init_lora:  # e.g. the stage-1 LoRA under the reward stage, merged and frozen
            merge_lora(unet, load_lora(path, self.targets))
        from accelerate.utils import set_seed

        set_seed(cfg.seed)  # right before the LoRA's initial weights; every later draw is seeded per step
        self.params = attach_lora(unet, self.targets, cfg.lora_rank, dtype)
        self.dropout_hooks = add_lora_output_dropout(unet, self.targets, cfg.lora_dropout) if cfg.lora_dropout else []
        if cfg.gradient_checkpointing and cfg.stage == "align":  # per block: a backward holds one block at a time
            unet.enable_gradient_checkpointing()  # (reward stage: only while a gradient step is recomputed)
        if device.type == "cuda":  # NHWC convolutions: faster with cuDNN for the UNet and the VAE
            unet.to(memory_format=torch.channels_last)
            base.vae.to(memory_format=torch.channels_last)
        # The compiled UNet shares the (LoRA) parameters: optimizer updates reach it.
        self.compiled_unet = torch.compile(unet) if cfg.compile_unet else None
        self.t5 = None
        if cfg.t5_model:
            from longalign_core.t5_branch import load_t5_branch  # imports diffusers: only when used

            self.t5 = load_t5_branch(cfg.t5_model, cfg.t5_adapter, device=device, dtype=dtype)
        adapter = None
        if cfg.train_t5_adapter:
            adapter = self.t5.adapter.float().train().requires_grad_(True)
            self.params += list(adapter.parameters())
        optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
                                      **({"fused": True} if device.type == "cuda" else {}))
        from diffusers.optimization import get_scheduler

        lr_scheduler = get_scheduler("constant_with_warmup", optimizer,
                                     num_warmup_steps=cfg.lr_warmup_steps * self.acc.num_processes)
        if adapter is not None:
            self.unet, self.t5.adapter, self.optimizer, self.lr_scheduler = self.acc.prepare(
                unet, adapter, optimizer, lr_scheduler)
        else:
            self.unet, self.optimizer, self.lr_scheduler = self.acc.prepare(unet, optimizer, lr_scheduler)
        ckpt.save_only_what_trains(self.acc, unet)
        # SDXL's VAE stays fp32 in an fp16 run (it overflows to NaN in fp16), as diffusers does
        self.vae = base.vae.to(device).requires_grad_(False).eval()  # loaded in vae_dtype(dtype, its config)
        if cfg.gradient_checkpointing:  # the decode is backpropagated too: keep its activations small
            self.vae.enable_gradient_checkpointing()
        self.text_encoder = base.text_encoder.to(device).requires_grad_(False).eval()
        self.noise_scheduler = base.noise_scheduler
        # ε or v: the reward stage's DDIM steps read it from the scheduler config, the align stage's target too
        self.prediction_type = self.noise_scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise BadModelFileError(f"{base.source}: its scheduler predicts {self.prediction_type!r}; the trainer "
                                    f"supports epsilon and v_prediction models")
        if self.is_sdxl:  # both text encoders, pooled bigG from the first segment (docs/method.md §1)
            from longalign_core.sdxl_text import SDXLSegmentEncoder

            self.text_encoder_2 = base.text_encoder_2.to(device).requires_grad_(False).eval()
            encoder = SDXLSegmentEncoder(base.tokenizer, self.text_encoder, base.tokenizer_2, self.text_encoder_2)
        else:
            encoder = CLIPSegmentEncoder(base.tokenizer, self.text_encoder)
        self.text = StepEncoder(cfg, encoder, self.t5, dtype, device, self.is_sdxl)
        del encoder  # self.text holds it (and drops it with --cache-text-embeddings)
        if cfg.cache_text_embeddings:  # before the preference model loads: the encoders' memory is free for it
            cache_text_embeddings(self, base)
        self.reward = (load_preference_model(reward_path, cfg.reward_model_kind, device=device, dtype=dtype)
                       if self.judge is None else self.judge.to(device, dtype))
        self.reward.model.requires_grad_(False).eval()
        self.reward_source = reward_path
        reference = default_reference_prompts()
        # Computed at every start, never read from a cache: a resumed run then does exactly what the uninterrupted
        # one did (reading V instead changed step 3's reward by 1 ulp on the CPU and AdamW amplified it).
        self.reference_direction = direction_from_prompts(self.reward, reference, cfg.split_mode,
                                                          cfg.long_segments).to(device)
        if cfg.stage == "reward":
            per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps * self.acc.num_processes
            mode, warning = resolve_direction(cfg.reward_direction, per_step)
            if warning and self.acc.is_main_process:
                print(warning, flush=True)
            with self.acc.main_process_first():  # the main process computes and caches a training V first
                self.direction = RewardDirection.build(mode, self.reward, cfg, self.prompts, self.acc.num_processes,
                                                       self.reference_direction, None, device)
        if cfg.cache_text_embeddings:  # V is built: the preference model's text tower is needed no more
            pin_reward_texts(self)

    # -- the pieces of a step (objective.py composes them) ----------------------------------------------------
    def unet_eps(self, x, t, conditioning: UNetConditioning):
        """The UNet's prediction (ε, or v); the no-grad sampling steps go through the compiled UNet with
        ``--compile-unet``."""
        grad = torch.is_grad_enabled()
        unet = self.compiled_unet if self.compiled_unet is not None and not grad else self.unet
        with self.phases("UNet, with gradients" if grad else "UNet, no gradients"):
            return unet(x, t, **conditioning.unet_kwargs()).sample

    # -- the loop ---------------------------------------------------------------------------------------------
    def optimizer_step(self, step: int) -> dict[str, float]:
        """One optimizer step (all its micro-batches): loss, backward, clip, AdamW, LR schedule. Returns this
        process's statistics summed over the micro-batches."""
        cfg, acc = self.cfg, self.acc
        sums: dict[str, float] = {}
        step_v = self.direction.for_step(step) if cfg.stage == "reward" else None  # V of the whole step
        for micro in range(cfg.gradient_accumulation_steps):
            draw = step * cfg.gradient_accumulation_steps + micro
            gen = step_generator(cfg.seed, draw, acc.process_index)
            seed_global_rng(cfg.seed, draw, acc.process_index)
            dump = {} if cfg.dump_debug else None
            with acc.accumulate(self.unet):
                if cfg.stage == "reward":
                    prompts = batch_prompts(self.prompts, cfg.seed, step, micro, cfg.train_batch_size,
                                            acc.process_index, acc.num_processes, cfg.gradient_accumulation_steps)
                    loss, stats = objective.reward_loss(self, prompts, gen, step_v, dump)
                else:
                    batch = self.align_data.batch(step, micro, acc.process_index, acc.num_processes)
                    loss, stats = objective.align_loss(self, batch, gen)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"the loss became {float(loss.detach())} at step {step}: stopping. Lower --learning-rate, use "
                        f"--mixed-precision no (or bf16 instead of fp16), or check the models; the last good "
                        f"checkpoint is in {self.out / 'checkpoints'}")
                with self.phases("backward"):
                    acc.backward(loss)
                with self.phases("optimizer"):
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
            for k, v in {"loss": float(loss.detach()), **stats}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if dump is not None:
                dump_debug(self, step, dump)
        return sums

    def train(self, stop: StopSignal | None = None) -> Path:
        """Resume if asked, validate, run the steps (logging, checkpoints, validations), write the outputs. After
        a ``stop`` signal the step under way ends, is checkpointed on every process, and ``Stopped`` is raised."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        main = acc.is_main_process
        stop = (stop or StopSignal("the step under way")).arm()  # (not entered: never requested)
        start = self.load_checkpoint(cfg.resume) if cfg.resume else 0
        check_free_space(self)
        if self.trackers:  # a resumed run hides the events it is about to log again
            acc.init_trackers("longalign", config={k: v for k, v in cfg.to_dict().items()
                                                   if isinstance(v, (int, float, str, bool))},
                              init_kwargs={"tensorboard": {"purge_step": start + 1}} if start else {})
        tlog = CSVLog(self.out / "train_log.csv", TRAIN_COLUMNS, main)
        validate = Validation(self)
        if start:
            tlog.keep_until(start)
            validated = validate.keep_until(start)
        acc.wait_for_everyone()
        if main:
            print_run_summary(self, start)
        due = start == 0 or (cfg.validation_every and start % cfg.validation_every == 0 and start not in validated
                             and start < cfg.train_steps)
        early = stop.agreed(acc)
        if early:  # during loading: nothing new to keep
            raise ckpt.stopped(self, early, start, None)
        if due:  # a run killed between a checkpoint and its validation validates on resume
            validate(start)
        self.unet.train()
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
                       lr=self.lr_scheduler.get_last_lr()[0], seconds=round(time.time() - t0, 3))
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
                raise ckpt.stopped(self, halt, done, saved)
            if cfg.validation_every and done % cfg.validation_every == 0 and done < cfg.train_steps:
                validate(done)
                self.unet.train()
        validate(cfg.train_steps)
        lora_file = save_outputs(self)
        acc.end_training()
        return lora_file

    # -- checkpoints, validation, outputs ---------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        return ckpt.save_checkpoint(self.acc, self.out, step, {"seed": self.cfg.seed, "totals": self.totals},
                                    self.cfg.checkpoints_keep, export=lambda folder: export_run_lora(self, folder, step))

    def load_checkpoint(self, which: str) -> int:
        """Restore a checkpoint (``latest`` or a folder); returns its step."""
        path, state = ckpt.load_checkpoint(self.acc, self.out, which)
        self.totals = {**self.totals, **state.get("totals", {})}
        self.acc.print(f"resumed from {path} at step {state['step']}")
        return state["step"]


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
        from .dry_run import dry_run, process_age

        print(dry_run(cfg, Trainer, startup=process_age())["report"], flush=True)
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
