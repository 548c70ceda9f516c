"""The evaluation itself (``python -m trainer.evaluate``, see :mod:`trainer.evaluate.cli`): :class:`Evaluation`
checks what the user gave, loads the models, and samples, scores and writes every arm's prompt groups."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from longalign_core.child_process import report_progress
from longalign_core.errors import BadConfigError, BadModelFileError, check_model_source
from longalign_core.reference_direction import default_reference_prompts, prompts_digest

from ..config import EMBEDDED_MODELS, EMBEDDED_PROFILE
from .arms import Arm, WeightSwap, file_sha256, lora_metadata, plan_arms
from .config import DEMO_LORA, EvalConfig, _train_default
from .files import (
    SCORES_FILE,
    SETTINGS_FILE,
    arm_folder,
    check_settings,
    complete_units,
    csv_text,
    format_rows,
    image_noise,
    part_file,
    plan_units,
    read_evaluation_prompts,
    save_png,
    score_files,
    sentence_counts,
    start_files,
    write_scores,
)
from .processes import Processes
from .report import PromptTokens

log = logging.getLogger("LongAlign")


class Evaluation:
    """Checks everything the user gave, loads the models, and runs the arms (:meth:`run`)."""

    def __init__(self, cfg: EvalConfig, announce=print):
        from longalign_core.phase_timer import PhaseTimer

        self.procs = Processes()  # one, or several under accelerate launch / torchrun
        self.cfg, self.say = cfg, announce if self.procs.is_main else (lambda *_a, **_k: None)
        self.out = Path(cfg.output_dir)
        self.device = self.procs.device
        precision = cfg.mixed_precision or ("bf16" if self.device.type == "cuda" else "no")
        if precision == "fp16" and self.device.type != "cuda":
            raise BadConfigError("--mixed-precision fp16 needs a CUDA GPU; use no (the CPU default) or bf16")
        from longalign_core.dtypes import DTYPES

        self.precision, self.dtype = precision, DTYPES.get(precision, torch.float32)
        self.timer = PhaseTimer(self.device)
        self.t0 = time.perf_counter()
        # everything the user named is checked before anything is loaded or written
        self.settings_file, self.scores_file = self.out / SETTINGS_FILE, self.out / SCORES_FILE
        self.resuming = self.settings_file.exists()  # read by every process before the main one writes
        if self.resuming and not cfg.resume:
            raise BadConfigError(f"--output-dir {self.out} already holds an evaluation ({SETTINGS_FILE}): pass "
                                 f"--resume to continue it, --report-only to rebuild its report, or choose "
                                 f"another --output-dir")
        for option, value, what in (("--model", cfg.model, "model folder or checkpoint file"),
                                    ("--reward-model", cfg.reward_model, "preference model folder or file")):
            if value is not None and value not in EMBEDDED_MODELS:
                check_model_source(value, option, what)
        self.prompts, self.prompt_names, self.prompts_source = read_evaluation_prompts(cfg)
        specs = list(cfg.lora)
        self.demo_lora = None
        if cfg.model is None and not specs and DEMO_LORA.is_file():
            specs, self.demo_lora = [str(DEMO_LORA)], DEMO_LORA
        self.arms = plan_arms(specs)
        with self.procs.main_first():  # the main process may write the built-in models' files
            with self.timer("base model"):
                self._load_base()
            with self.timer("LoRA files"):
                self._load_loras()
            with self.timer("preference model"):
                self._load_judge()
        self.settings = self._settings()

    # -- set-up ---------------------------------------------------------------------------------------------
    def _load_base(self) -> None:
        import dataclasses as dc

        from ..conditioning import StepEncoder
        from ..loading.models import load_base_model
        from ..parts import BaseParts

        cfg = self.cfg
        loaded = load_base_model(cfg.model, cfg.seed, self.dtype)
        if cfg.resolution is None:
            self.cfg = cfg = dc.replace(cfg, resolution=int(loaded.unet.config.sample_size) * 8)
        if cfg.steps is None:
            self.cfg = cfg = dc.replace(cfg, steps=EMBEDDED_PROFILE["validation_steps"] if cfg.is_embedded
                                        else _train_default("validation_steps"))
        self.unet = loaded.unet.to(self.device).requires_grad_(False).eval()
        self.base = BaseParts.from_loaded(loaded, self.device, self.dtype)
        self.text = StepEncoder(cfg, self.base.segment_encoder(), None, self.dtype, self.device, self.base.is_sdxl)
        self.swap = WeightSwap(self.unet)

    def _load_loras(self) -> None:
        from longalign_core.lora import LoraFormatError, load_lora, lora_targets

        targets = lora_targets(self.unet)
        for arm in self.arms[1:]:
            try:
                arm.pairs = load_lora(arm.lora, targets)
            except LoraFormatError as exc:
                detail = str(exc).removeprefix(f"{arm.lora}: ")
                raise BadModelFileError(f"--lora {arm.spec}: {detail} The base model here is {self.base.source} "
                                        f"({'SDXL' if self.base.is_sdxl else 'SD1.x'}): give a LoRA made for it, not "
                                        f"for another architecture or model") from None
            arm.sha256 = file_sha256(arm.lora)
            self._warn_lora_settings(arm)

    def _warn_lora_settings(self, arm: Arm) -> None:
        """A LoRA of this trainer records its text options; evaluating with others is allowed but said."""
        meta = lora_metadata(arm.lora)
        cfg = self.cfg
        differ = [f"{key} {meta[key]} (now {getattr(cfg, key)})" for key in
                  ("token_budget", "overflow", "split_mode", "long_segments")
                  if key in meta and meta[key] != str(getattr(cfg, key))]
        if differ:
            self.say(f"note: {arm.spec} was trained with {', '.join(differ)}; pass the same text options to "
                     f"evaluate it as it was trained")

    def _load_judge(self) -> None:
        from longalign_core.preference import load_preference_model

        from ..loading.models import reward_model_source
        from ..parts import Scoring

        cfg = self.cfg
        source = reward_model_source(cfg.reward_model, cfg.seed)
        judge = load_preference_model(source, cfg.reward_model_kind, device=self.device, dtype=torch.float32)
        # V from the reference prompts, computed at every start (Scoring.of): the scores of a fresh, a repeated and
        # a resumed evaluation come from the same computation
        self.scoring = Scoring.of(judge, source, cfg.split_mode, cfg.long_segments, self.device)
        reference = default_reference_prompts()
        overlap = len(set(self.prompts) & set(reference))
        if overlap:
            self.say(f"note: {overlap} of the evaluation prompts are in the reference set that defines V; "
                     f"held-out prompts should not be")

    def _settings(self) -> dict:
        """What the scores depend on; a resumed evaluation must have the same."""
        cfg = self.cfg
        return {"model": self.base.source, "reward_model": self.scoring.source,
                "reward_model_kind": cfg.reward_model_kind,
                "arms": [{"name": a.name, "lora": a.lora, "strength": a.strength, "sha256": a.sha256}
                         for a in self.arms],
                "prompts": self.prompts_source, "prompts_sha256": prompts_digest(self.prompts),
                "num_prompts": len(self.prompts), "seeds": cfg.seeds, "seed": cfg.seed, "steps": cfg.steps,
                "guidance": cfg.guidance, "resolution": cfg.resolution, "batch_size": cfg.batch_size,
                "precision": self.precision, "device": self.device.type, "token_budget": cfg.token_budget,
                "overflow": cfg.overflow, "split_mode": cfg.split_mode, "long_segments": cfg.long_segments,
                "omega": cfg.omega}

    def check_prompts_encode(self) -> PromptTokens:
        """Encode every prompt once before anything is written: ``--overflow error`` stops now, not at the
        prompt hours in. Returns what the token budget did to the prompts (the report states it)."""
        reports = []
        with self.timer("text encoding"):
            for unit in plan_units(len(self.prompts), 1, 32):
                reports += self.text.encode_rows([self.prompts[i] for i in unit])[2]
        cfg = self.cfg
        return PromptTokens.of(reports, cfg.token_budget, cfg.overflow, self.prompt_names)

    # -- resume ---------------------------------------------------------------------------------------------
    def _start_files(self, tokens: PromptTokens) -> list[dict]:
        """Write the settings (fresh run), or check them and keep the complete units of ``scores.csv`` and of
        the part files of any number of processes (resume). Returns the kept rows; every process knows the
        units done (``self.done_units``)."""
        procs = self.procs
        if not self.resuming:
            if self.cfg.resume:
                self.say(f"--resume: {self.out} holds no evaluation yet; starting one")
            if procs.is_main:
                start_files(self.out, self.prompts, self.settings, self.prompt_names, tokens)
            self._wait()
            return []
        check_settings(self.out, self.settings)
        kept, self.done_units = self._complete_units()
        self._wait()  # every process has read the files
        if procs.is_main:
            write_scores(self.out, kept)
        self._wait()
        return kept

    def _wait(self) -> None:
        """Wait for the other processes (the time is the ``waiting`` phase of the main process's timings)."""
        if self.procs.world > 1:
            with self.timer("waiting"):
                self.procs.wait()

    def _complete_units(self) -> tuple[list[dict], set]:
        """The complete units of ``scores.csv`` and the part files (:func:`~trainer.evaluate.files.complete_units`)."""
        cfg = self.cfg
        sentences = sentence_counts(self.scoring.judge, self.prompts, cfg.split_mode, cfg.long_segments)
        return complete_units(score_files(self.out), [a.name for a in self.arms],
                              plan_units(len(self.prompts), cfg.seeds, cfg.batch_size),
                              [cfg.seed + k for k in range(cfg.seeds)], sentences)

    # -- the run --------------------------------------------------------------------------------------------
    def run(self, on_unit=None, stop=None) -> dict:
        """Sample, score and write every (arm, prompt group) not done yet, then the report. ``on_unit(n)`` is
        called after each group is written (tests interrupt the run there). After a stop signal (``stop``, a
        :class:`~trainer.stop_signal.StopSignal`) the group under way is finished and written, and
        :class:`~trainer.stop_signal.Stopped` is raised. Returns the phase timings."""
        from tqdm.auto import tqdm

        cfg, procs = self.cfg, self.procs
        if stop is not None:
            stop.arm()
        tokens = self.check_prompts_encode()
        self.done_units = set()
        kept = self._start_files(tokens)
        units = plan_units(len(self.prompts), cfg.seeds, cfg.batch_size)
        todo = [(arm, u) for arm in self.arms for u in range(len(units)) if (arm.name, u) not in self.done_units]
        total = len(self.arms) * len(units)
        self._banner(tokens, len(kept), len(todo), total)
        self.part = part_file(self.out, procs.rank, procs.world)
        done_before, todo = total - len(todo), procs.share(todo)
        bar = tqdm(total=len(todo), desc="evaluating" if procs.world == 1 else f"evaluating (process 0 of "
                   f"{procs.world})", unit="group", disable=not todo or not procs.is_main)
        current, started = None, time.perf_counter()
        try:
            for n, (arm, u) in enumerate(todo, 1):
                if arm is not current:
                    with self.timer("LoRA merge"):
                        self.swap.apply(arm)
                    current = arm
                self._unit(arm, units[u])
                bar.update(1)
                per_group = (time.perf_counter() - started) / n
                if procs.is_main:
                    report_progress(step=min(total, done_before + n * procs.world), total=total,
                                    seconds_per_step=round(per_group, 3), eta=round(per_group * (len(todo) - n), 1))
                if on_unit is not None:
                    on_unit(n)
                if stop is not None and stop.requested and n < len(todo):
                    from ..stop_signal import Stopped

                    kept = (f"{done_before + n} of {total} prompt groups are" if procs.world == 1 else
                            f"this process's finished prompt groups ({n} of {len(todo)}) are")
                    raise Stopped(stop.requested, f"{kept} written to {self.part}", ["--resume"])
        finally:
            bar.close()
            self.swap.restore()
        self._wait()  # every process has written its rows
        if not procs.is_main:
            return self.timings()
        with self.timer("writing"):
            self._merge_scores(total)
        with self.timer("report"):
            from .report import write_evaluation_report

            summary = write_evaluation_report(self.out, cfg.bootstrap, cfg.bootstrap_seed,
                                              timings=self.timings(), tokens=tokens)
        self.say(summary)
        return self.timings()

    def _merge_scores(self, total: int) -> None:
        """``scores.csv``: every process's rows in one order (arm, prompt, seed, sentence), whoever made them."""
        rows, done = self._complete_units()
        if len(done) != total:
            raise RuntimeError(f"{total - len(done)} of {total} prompt groups have no complete rows in "
                               f"{self.out} after every process finished; run again with --resume")
        write_scores(self.out, rows)

    def timings(self) -> dict:
        """Seconds per phase so far and in all (``total``: since the evaluation was set up)."""
        return {**dict(self.timer.seconds), "total": time.perf_counter() - self.t0}

    def _banner(self, tokens: PromptTokens, kept: int, todo: int, total: int) -> None:
        cfg = self.cfg
        lines = [f"***** LongAlign evaluation: {len(self.arms)} arm(s) × {len(self.prompts)} prompts × {cfg.seeds} "
                 f"seed(s) *****",
                 f"  base model = {self.base.source} ({'SDXL' if self.base.is_sdxl else 'SD1.x'}, {self.precision}, "
                 f"{self.device.type})",
                 f"  arms = {', '.join(a.name for a in self.arms)}",
                 f"  judge = {self.scoring.source} (fp32), V from the shipped reference prompts",
                 f"  prompts = {self.prompts_source}",
                 f"  DDIM {cfg.steps} steps, CFG {cfg.guidance:g}, {cfg.resolution}px, seeds {cfg.seed}.."
                 f"{cfg.seed + cfg.seeds - 1}; text: budget {cfg.token_budget}, overflow {cfg.overflow}, split "
                 f"{cfg.split_mode}"]
        lines.append(f"  {tokens.summary()}")
        if kept:
            lines.append(f"  resuming: {total - todo} of {total} prompt groups already scored ({kept} rows kept)")
        if self.procs.world > 1:
            lines.append(f"  {todo} prompt groups dealt out to {self.procs.world} processes, about "
                         f"{-(-todo // self.procs.world)} each")
        self.say("\n".join(lines))

    @torch.no_grad()
    def _unit(self, arm: Arm, unit: list[int]) -> None:
        """Sample, decode and score one prompt group for one arm; write its images, then its rows."""
        from longalign_core.denscore import segment_score

        from ..sampling import ddim_scheduler, decode, sample_truncated

        cfg = self.cfg
        seeds = [cfg.seed + k for k in range(cfg.seeds)]
        items = [(p, s) for p in unit for s in seeds]
        side = cfg.resolution // 8
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        images = []
        for start in range(0, len(items), cfg.batch_size):
            chunk = items[start:start + cfg.batch_size]
            texts = [self.prompts[p] for p, _ in chunk]
            with self.timer("text encoding"):
                step_cond = self.text.encode(texts, with_uncond=True)
                cond, uncond = self.text.unet_conditioning(step_cond)
            with self.timer("sampling"):
                noise = torch.stack([image_noise(s, self.prompts[p], side) for p, s in chunk])
                noise = noise.to(self.device, self.dtype)
                scheduler = ddim_scheduler(self.base.noise_scheduler, cfg.steps)
                eps = lambda x, t, c: self.unet(x, t, **c.unet_kwargs()).sample  # noqa: E731
                with autocast:
                    x0 = sample_truncated(eps, scheduler, noise, cond, uncond, cfg.guidance, [])
            with self.timer("decoding"):
                images.append(decode(self.base.vae, x0).float())
        images = torch.cat(images)
        with self.timer("scoring"):
            texts = [self.prompts[p] for p, _ in items]
            result = segment_score(self.scoring.judge, images.to(self.device), texts, direction=self.scoring.reference_v,
                                   omega=cfg.omega, crop="center", split_mode=cfg.split_mode,
                                   long_segments=cfg.long_segments)
            rows = [row for b, (p, s) in enumerate(items) for row in format_rows(arm, p, s, result, b, cfg.omega)]
        with self.timer("writing"):
            pixels = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
            folder = self.out / "images" / arm_folder(arm.name)
            for b, (p, s) in enumerate(items):
                save_png(pixels[b], folder / f"p{p:03d}-s{s}.png")
            from longalign_core.io_utils import append_text

            append_text(self.part, csv_text(rows))  # one write per group, cut back if it fails
