"""Did the LoRA help? The base model against the same model with one or more LoRAs, on held-out long prompts,
sentence by sentence, with confidence intervals.

Demo on the CPU (the built-in tiny models; the LoRA ``./dev run`` trained, if there is one):

    python -m trainer.evaluate

A real comparison (SD1.5 or SDXL, any LoRA of this trainer or of the LongSD release, Denscore as the judge):

    python -m trainer.evaluate --model /models/stable-diffusion-v1-5 --reward-model /models/denscore/Denscore \\
        --lora outputs/reward/longalign_lora.safetensors --lora outputs/reward/longalign_lora.safetensors:0.5 \\
        --seeds 2 --output-dir outputs/eval

Every arm (the base, and each ``--lora FILE[:STRENGTH]``) samples every prompt from the same noise with the
trainer's validation sampler (DDIM, CFG with the empty prompt, segment-level conditioning), and every image is
scored with Denscore (or another preference model) against its prompt, decomposed along V from the shipped
reference prompt set. ``<output-dir>`` gets the images, ``scores.csv`` (one row per arm, prompt, seed and
sentence), ``report.md`` / ``report.png`` (means and differences with 95 % bootstrap intervals over prompts,
win rates, the sentences that gained and lost most, a reward-hacking flag) and ``grids/`` (per prompt, the arms
side by side with their scores). ``--resume`` continues an interrupted evaluation; ``--report-only`` rebuilds
the report from ``scores.csv``. User mistakes print one paragraph and exit with code 2 (``--debug`` keeps the
traceback). docs/evaluate.md says what each number means.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from longalign_core.denscore import DEFAULT_REWEIGHT, default_reference_prompts, prompts_digest
from longalign_core.errors import BadConfigError, BadInputError, BadModelFileError, check_input_file, \
    check_model_source, run_cli
from longalign_core.segment_encoding import DEFAULT_TOKEN_BUDGET, OVERFLOW_POLICIES
from longalign_core.segmentation import LONG_SEGMENT_POLICIES, SPLIT_MODES

from .config import EMBEDDED_MODELS, EMBEDDED_PROFILE, MAX_TOKEN_BUDGET, TrainConfig, _coerce, _f, flag
from .eval_stats import BASE_ARM, DEFAULT_BOOTSTRAP, METRICS, SCORE_COLUMNS

log = logging.getLogger("LongAlign")

#: The held-out long prompts shipped with the pack (not the reference set that defines V).
EVALUATION_PROMPTS = Path(__file__).resolve().parents[1] / "longalign_core" / "data" / "evaluation_prompts.txt"
#: The LoRA ``./dev run`` (the trainer's CPU demo) writes; the no-argument evaluation picks it up.
DEMO_LORA = Path(EMBEDDED_PROFILE["output_dir"]) / "longalign_lora.safetensors"
SETTINGS_FILE = "evaluation.json"
SCORES_FILE = "scores.csv"

CHOICES = {"overflow": OVERFLOW_POLICIES, "split_mode": SPLIT_MODES, "long_segments": LONG_SEGMENT_POLICIES,
           "reward_model_kind": ("auto", "hf_clip", "open_clip"), "mixed_precision": ("no", "fp16", "bf16")}


def _train_default(name: str):
    """The trainer's default of a setting (its validation sampler): one source for both commands."""
    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == name)


@dataclass
class EvalConfig:
    # -- what is compared -------------------------------------------------------------------------------------
    model: str | None = _f(None, "base model as the trainer takes it: a diffusers folder, a single-file SD1.x/SDXL "
                                 "checkpoint, a Hub id, 'embedded' or 'embedded-sdxl' (the built-in tiny random "
                                 "models). Omit for the embedded SD1.5-shaped one (then the LoRA of ./dev run, "
                                 f"{DEMO_LORA}, is an arm when it exists)")
    lora: list[str] = _f(list, "a LoRA arm, FILE[:STRENGTH] (strength default 1): this trainer's .safetensors or a "
                               "LongSD .pt; repeat for more arms. The base model is always an arm", nargs="+")
    reward_model: str | None = _f(None, "the judge: Denscore/PickScore/CLIP-H folder (HF CLIPModel) or HPSv2 "
                                        "open_clip checkpoint; 'embedded' for the built-in tiny one (the default "
                                        "with an embedded --model; with a real --model it must be given)")
    reward_model_kind: str = _f("auto", "auto | hf_clip | open_clip")
    prompts: str | None = _f(None, "held-out prompts: .txt (one per line) or .jsonl ('prompt' or 'caption'); "
                                   "default: the pack's 64 evaluation prompts (longalign_core/data/"
                                   "evaluation_prompts.txt, not the reference set that defines V)")
    num_prompts: int | None = _f(None, "evaluate only the first N prompts (default: all)")
    seeds: int = _f(2, "images per prompt and arm (seeds seed, seed+1, …); the same noise for every arm")
    seed: int = _f(0, "first seed (the embedded models are also made with it, as in the trainer)")
    # -- sampling: the trainer's validation sampler ------------------------------------------------------------
    steps: int | None = _f(None, f"DDIM steps (default: the trainer's --validation-steps, "
                                 f"{_train_default('validation_steps')}; {EMBEDDED_PROFILE['validation_steps']} "
                                 f"on the embedded models)", aliases=["--validation-steps"])
    guidance: float = _f(_train_default("sample_guidance"), "classifier-free guidance scale (with the empty "
                                                            "prompt)", aliases=["--sample-guidance"])
    resolution: int | None = _f(None, "image size in pixels; default: the base model's own (512 for SD1.5, 1024 "
                                      "for SDXL, 64 for the embedded ones)")
    batch_size: int = _f(8, "images per UNet batch (CFG doubles it)")
    mixed_precision: str | None = _f(None, "no | fp16 | bf16: the base model's dtype; default bf16 on a GPU, no "
                                           "on the CPU. The preference model always scores in fp32")
    # -- text options (as the trainer's) ----------------------------------------------------------------------
    token_budget: int = _f(DEFAULT_TOKEN_BUDGET, "segment-level conditioning length of the CLIP part")
    overflow: str = _f(_train_default("overflow"), "a prompt longer than the budget: truncate | extend | error")
    split_mode: str = _f(_train_default("split_mode"), "segment splitter of the conditioning and the score")
    long_segments: str = _f(_train_default("long_segments"), "a sentence longer than the text window: split | "
                                                             "truncate")
    omega: float = _f(DEFAULT_REWEIGHT, "reweight factor ω of the text-irrelevant part in the reweighted score")
    # -- outputs ----------------------------------------------------------------------------------------------
    output_dir: str = _f("outputs/longalign-eval", "where images, scores.csv, report.md/png and grids/ go")
    resume: bool = _f(False, "continue the evaluation in --output-dir (the images already scored are kept)")
    report_only: bool = _f(False, "only rebuild report.md, report.png and grids/ from <output-dir>/scores.csv")
    bootstrap: int = _f(DEFAULT_BOOTSTRAP, "bootstrap resamples (over prompts) for the 95 % intervals")
    bootstrap_seed: int = _f(0, "seed of the bootstrap resamples")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f, getattr(self, f.name), flag(f.name)))
        bad = [f"{flag(k)} {getattr(self, k)!r} is not one of {', '.join(v)}" for k, v in CHOICES.items()
               if getattr(self, k) is not None and getattr(self, k) not in v]
        checks = [
            (self.seeds >= 1, f"--seeds must be >= 1 (images per prompt and arm), got {self.seeds}"),
            (self.num_prompts is None or self.num_prompts >= 1, f"--num-prompts must be >= 1, got {self.num_prompts}"),
            (self.steps is None or self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.guidance >= 0, f"--guidance must be >= 0, got {self.guidance}"),
            (self.resolution is None or self.resolution % 8 == 0 and 16 <= self.resolution <= 4096,
             f"--resolution must be a multiple of 8 in 16..4096, got {self.resolution}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (1 <= self.token_budget <= MAX_TOKEN_BUDGET,
             f"--token-budget must be in 1..{MAX_TOKEN_BUDGET}, got {self.token_budget}"),
            (0.0 <= self.omega <= 1.0, f"--omega must be in [0, 1], got {self.omega}"),
            (self.bootstrap >= 100, f"--bootstrap must be >= 100 resamples, got {self.bootstrap}"),
        ]
        errors = bad + [msg for ok, msg in checks if not ok]
        if errors:
            raise BadConfigError("invalid evaluation settings: " + "; ".join(errors))
        if not self.is_embedded and self.reward_model is None and not self.report_only:
            raise BadConfigError(f"--model {self.model} is a real model but no --reward-model was given: its images "
                                 f"would be judged by the built-in tiny random preference model. Pass the judge, "
                                 f"e.g. --reward-model /path/to/Denscore (a Hugging Face CLIPModel folder) or an "
                                 f"HPSv2 .pt checkpoint")

    @property
    def is_embedded(self) -> bool:
        return self.model in (None, *EMBEDDED_MODELS)

    #: read by trainer.conditioning.StepEncoder (there is no T5 adapter to train here)
    train_t5_adapter = False

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        ap = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        for f in dataclasses.fields(cls):
            names = [flag(f.name), *f.metadata.get("aliases", [])]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = f" [{' | '.join(CHOICES[f.name])}]" if f.name in CHOICES else ""
            help_text = f"{f.metadata['help']}{choices} (default: {default})".replace("%", "%%")
            if f.type in ("bool", bool):
                ap.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
            elif f.metadata.get("nargs"):
                ap.add_argument(*names, dest=f.name, nargs=f.metadata["nargs"], action="extend", default=None,
                                metavar="FILE[:STRENGTH]", help=help_text)
            else:
                kind = {"int": int, "int | None": int, "float": float}.get(str(f.type), str)
                ap.add_argument(*names, dest=f.name, type=kind, default=None, help=help_text)
        return ap

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> "EvalConfig":
        args = vars(cls.parser().parse_args(argv))
        return cls(**{k: v for k, v in args.items() if v is not None})


# ------------------------------------------------------------------------------------------------------------
# Arms


@dataclass
class Arm:
    """One model under test: the base (no LoRA) or the base with ``lora`` merged at ``strength``."""

    name: str
    lora: str = ""
    strength: float = 0.0
    spec: str = ""  # as given to --lora
    pairs: dict | None = None
    sha256: str = ""


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``FILE[:STRENGTH]`` -> (file, strength); a ``:`` that is not followed by a number belongs to the path
    (``C:\\loras\\x.safetensors``)."""
    path, _, tail = spec.rpartition(":")
    if path and tail:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def plan_arms(specs: list[str]) -> list[Arm]:
    """The base plus one arm per ``--lora``; each file is checked now (exists, readable, not empty) and an arm
    given twice (the same file at the same strength) is refused."""
    import math

    arms, seen, names = [Arm(BASE_ARM)], {}, {BASE_ARM}
    for spec in specs:
        path, strength = parse_lora_spec(spec)
        if not math.isfinite(strength):
            raise BadConfigError(f"--lora {spec}: the strength must be a finite number")
        if not Path(path).expanduser().exists():
            raise BadModelFileError(f"--lora {spec}: no such LoRA file {path} (a typo in the path?); give this "
                                    f"trainer's .safetensors or a LongSD .pt, optionally with :STRENGTH")
        checked = check_input_file(Path(path).expanduser(), "LoRA file", "--lora", error=BadModelFileError)
        key = (str(checked.resolve()), strength)
        if key in seen:
            raise BadConfigError(f"--lora {spec} is given twice (as {seen[key]!r} too): the same LoRA at the same "
                                 f"strength is one arm. Drop one, or give another strength (FILE:0.5)")
        seen[key] = spec
        stem = checked.stem
        name = f"{stem}@{strength:g}"
        k = 2
        while name in names:  # two files with one name in different folders
            name = f"{stem}-{k}@{strength:g}"
            k += 1
        names.add(name)
        arms.append(Arm(name, str(checked), strength, spec))
    return arms


def lora_metadata(path: str) -> dict[str, str]:
    """The metadata of a .safetensors LoRA ({} for a LongSD .pt)."""
    if not path.lower().endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 — load_lora names a broken file; metadata is only advice
        return {}


class WeightSwap:
    """Merges an arm's LoRA into the UNet and restores the base weights exactly afterwards (a copy of every
    touched weight is kept on the CPU), so every arm starts from bit-identical base weights."""

    def __init__(self, unet):
        self.unet, self.modules, self.saved = unet, dict(unet.named_modules()), {}

    def apply(self, arm: Arm) -> None:
        from longalign_core.lora import merge_lora

        self.restore()
        if arm.pairs is None:
            return
        for path in arm.pairs:
            self.saved[path] = self.modules[path].weight.detach().to("cpu", copy=True)
        merge_lora(self.unet, arm.pairs, arm.strength)

    @torch.no_grad()
    def restore(self) -> None:
        for path, weight in self.saved.items():
            self.modules[path].weight.copy_(weight)
        self.saved = {}


# ------------------------------------------------------------------------------------------------------------
# Noise, units of work, rows


def image_seed(seed: int, prompt: str) -> int:
    """The noise seed of one image: from the image's seed and the prompt's text (not its position in the file),
    so a prompt gets the same noise in every arm, run and prompts file."""
    from .seeding import step_seed

    return step_seed(seed, int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12], 16), 0)


def image_noise(seed: int, prompt: str, side: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(image_seed(seed, prompt))
    return torch.randn(4, side, side, generator=g)


def plan_units(n_prompts: int, seeds: int, batch_size: int) -> list[list[int]]:
    """Consecutive prompt groups, each sampled and written as one piece (all its seeds): about ``batch_size``
    images. A resumed run redoes only the groups that were not complete."""
    per = max(1, batch_size // seeds)
    return [list(range(i, min(i + per, n_prompts))) for i in range(0, n_prompts, per)]


def format_rows(arm: Arm, prompt_index: int, seed: int, result, b: int, omega: float) -> list[dict]:
    """The rows of image ``b`` of a :class:`~longalign_core.denscore.ScoreResult`: one per sentence."""
    rows = []
    segs = result.prompts[b].segments
    s, r, i = (t.detach().double().cpu().numpy() for t in
               (result.segment_scores[b], result.segment_relevant[b], result.segment_irrelevant[b]))
    for k, seg in enumerate(segs):
        rows.append({"arm": arm.name, "lora": arm.lora, "strength": f"{arm.strength:g}" if arm.lora else "",
                     "prompt": prompt_index, "seed": seed, "sentence": k + 1, "text": seg.text,
                     "score": repr(float(s[k])), "text_relevant": repr(float(r[k])),
                     "text_irrelevant": repr(float(i[k])), "reweighted": repr(float(r[k] + omega * i[k]))})
    return rows


def csv_text(rows: list[dict], header: bool = False) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SCORE_COLUMNS, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def save_png(array: np.ndarray, path: Path) -> None:
    """An image written whole or not at all (a kill never leaves a truncated PNG); light compression (level 1:
    several times faster than the default, the files a little larger)."""
    from PIL import Image

    from longalign_core.io_utils import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=1)


def arm_folder(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)


# ------------------------------------------------------------------------------------------------------------
# The evaluation


class Evaluation:
    """Checks everything the user gave, loads the models, and runs the arms (:meth:`run`)."""

    def __init__(self, cfg: EvalConfig, announce=print):
        from .memory import PhaseTimer

        self.cfg, self.say = cfg, announce
        self.out = Path(cfg.output_dir)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        precision = cfg.mixed_precision or ("bf16" if self.device.type == "cuda" else "no")
        if precision == "fp16" and self.device.type != "cuda":
            raise BadConfigError("--mixed-precision fp16 needs a CUDA GPU; use no (the CPU default) or bf16")
        from longalign_core.dtypes import DTYPES

        self.precision, self.dtype = precision, DTYPES.get(precision, torch.float32)
        self.timer = PhaseTimer(self.device)
        self.timer.enabled = True
        self.t0 = time.perf_counter()
        # everything the user named is checked before anything is loaded or written
        self.settings_file, self.scores_file = self.out / SETTINGS_FILE, self.out / SCORES_FILE
        if self.settings_file.exists() and not cfg.resume:
            raise BadConfigError(f"--output-dir {self.out} already holds an evaluation ({SETTINGS_FILE}): pass "
                                 f"--resume to continue it, --report-only to rebuild its report, or choose "
                                 f"another --output-dir")
        for option, value, what in (("--model", cfg.model, "model folder or checkpoint file"),
                                    ("--reward-model", cfg.reward_model, "preference model folder or file")):
            if value is not None and value not in EMBEDDED_MODELS:
                check_model_source(value, option, what)
        self.prompts = self._load_prompts()
        specs = list(cfg.lora)
        self.demo_lora = None
        if cfg.model is None and not specs and DEMO_LORA.is_file():
            specs, self.demo_lora = [str(DEMO_LORA)], DEMO_LORA
        self.arms = plan_arms(specs)
        with self.timer("base model"):
            self._load_base()
        with self.timer("LoRA files"):
            self._load_loras()
        with self.timer("preference model"):
            self._load_judge()
        self.settings = self._settings()

    # -- set-up ---------------------------------------------------------------------------------------------
    def _load_prompts(self) -> list[str]:
        from .data import load_prompts

        cfg = self.cfg
        source = cfg.prompts or str(EVALUATION_PROMPTS)
        path = Path(source).expanduser()
        if not path.exists():
            raise BadInputError(f"--prompts {source}: no such prompts file (a typo in the path?); give a .txt with "
                                f"one prompt per line or a .jsonl with a 'prompt' field")
        if path.is_file():
            check_input_file(path, "prompts file", "--prompts")
        prompts = load_prompts(str(path))
        if cfg.num_prompts is not None:
            if cfg.num_prompts > len(prompts):
                raise BadConfigError(f"--num-prompts {cfg.num_prompts}: {source} has only {len(prompts)} prompts")
            prompts = prompts[:cfg.num_prompts]
        first: dict[str, int] = {}
        for i, p in enumerate(prompts):
            if p in first:
                raise BadInputError(f"{source}: prompt {i + 1} repeats prompt {first[p] + 1} ({p[:60]!r}…): a prompt "
                                    f"counted twice weighs twice in every mean; remove the copy")
            first[p] = i
        self.prompts_source = source
        return prompts

    def _load_base(self) -> None:
        import dataclasses as dc

        from .models import load_base_model

        cfg = self.cfg
        base = load_base_model(cfg.model, cfg.seed, self.dtype)
        self.base_source, self.is_sdxl = base.source, base.is_sdxl
        if cfg.resolution is None:
            self.cfg = cfg = dc.replace(cfg, resolution=int(base.unet.config.sample_size) * 8)
        if cfg.steps is None:
            self.cfg = cfg = dc.replace(cfg, steps=EMBEDDED_PROFILE["validation_steps"] if cfg.is_embedded
                                        else _train_default("validation_steps"))
        self.unet = base.unet.to(self.device).requires_grad_(False).eval()
        self.vae = base.vae.to(self.device).requires_grad_(False).eval()
        self.noise_scheduler = base.noise_scheduler
        text_encoder = base.text_encoder.to(self.device).requires_grad_(False).eval()
        if self.is_sdxl:
            from longalign_core.sdxl_text import SDXLSegmentEncoder

            text_encoder_2 = base.text_encoder_2.to(self.device).requires_grad_(False).eval()
            encoder = SDXLSegmentEncoder(base.tokenizer, text_encoder, base.tokenizer_2, text_encoder_2)
        else:
            from longalign_core.clip_text import CLIPSegmentEncoder

            encoder = CLIPSegmentEncoder(base.tokenizer, text_encoder)
        from .conditioning import StepEncoder

        self.text = StepEncoder(cfg, encoder, None, self.dtype, self.device, self.is_sdxl)
        self.swap = WeightSwap(self.unet)

    def _load_loras(self) -> None:
        from longalign_core.lora import LoraFormatError, load_lora, lora_targets

        targets = lora_targets(self.unet)
        for arm in self.arms[1:]:
            try:
                arm.pairs = load_lora(arm.lora, targets)
            except LoraFormatError as exc:
                detail = str(exc).removeprefix(f"{arm.lora}: ")
                raise BadModelFileError(f"--lora {arm.spec}: {detail} The base model here is {self.base_source} "
                                        f"({'SDXL' if self.is_sdxl else 'SD1.x'}): give a LoRA made for it, not "
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
        from longalign_core.denscore import direction_cache_file, direction_from_prompts
        from longalign_core.preference import load_preference_model

        from .models import reward_model_source

        cfg = self.cfg
        self.reward_source = reward_model_source(cfg.reward_model, cfg.seed)
        self.reward = load_preference_model(self.reward_source, cfg.reward_model_kind, device=self.device,
                                            dtype=torch.float32)
        reference = default_reference_prompts()
        digest = prompts_digest(reference) + ("" if cfg.split_mode == "sentence" else "-" + cfg.split_mode)
        cache = direction_cache_file(self.reward_source, digest)
        self.direction = direction_from_prompts(self.reward, reference, split_mode=cfg.split_mode,
                                                cache_file=cache).to(self.device)
        overlap = len(set(self.prompts) & set(reference))
        if overlap:
            self.say(f"note: {overlap} of the evaluation prompts are in the reference set that defines V; "
                     f"held-out prompts should not be")

    def _settings(self) -> dict:
        """What the scores depend on; a resumed evaluation must have the same."""
        cfg = self.cfg
        return {"model": self.base_source, "reward_model": self.reward_source,
                "reward_model_kind": cfg.reward_model_kind,
                "arms": [{"name": a.name, "lora": a.lora, "strength": a.strength, "sha256": a.sha256}
                         for a in self.arms],
                "prompts": self.prompts_source, "prompts_sha256": prompts_digest(self.prompts),
                "num_prompts": len(self.prompts), "seeds": cfg.seeds, "seed": cfg.seed, "steps": cfg.steps,
                "guidance": cfg.guidance, "resolution": cfg.resolution, "batch_size": cfg.batch_size,
                "precision": self.precision, "device": self.device.type, "token_budget": cfg.token_budget,
                "overflow": cfg.overflow, "split_mode": cfg.split_mode, "long_segments": cfg.long_segments,
                "omega": cfg.omega}

    def check_prompts_encode(self) -> tuple[int, int]:
        """Encode every prompt once before anything is written: ``--overflow error`` stops now, not at the
        prompt hours in. Returns (prompts cut, conditioning tokens lost)."""
        cut = lost = 0
        with self.timer("text encoding"):
            for unit in plan_units(len(self.prompts), 1, 32):
                enc = self.text.encode([self.prompts[i] for i in unit], with_uncond=False)
                cut, lost = cut + enc.prompts_cut, lost + enc.tokens_lost
        return cut, lost

    # -- resume ---------------------------------------------------------------------------------------------
    def _start_files(self) -> list[dict]:
        """Write the settings (fresh run) or check them and keep the complete units of ``scores.csv``
        (resume). Returns the kept rows."""
        if not self.settings_file.exists():
            if self.cfg.resume:
                self.say(f"--resume: {self.out} holds no evaluation yet; starting one")
            from longalign_core.io_utils import atomic_path

            self.out.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.out / "prompts.txt") as tmp:
                Path(tmp).write_text("".join(p + "\n" for p in self.prompts), encoding="utf-8")
            with atomic_path(self.scores_file) as tmp:
                Path(tmp).write_text(csv_text([], header=True), encoding="utf-8")
            with atomic_path(self.settings_file) as tmp:
                Path(tmp).write_text(json.dumps(self.settings, indent=2), encoding="utf-8")
            return []
        saved = json.loads(self.settings_file.read_text(encoding="utf-8"))
        differ = [f"{k}: {saved.get(k)!r} then, {v!r} now" for k, v in self.settings.items() if saved.get(k) != v]
        if differ:
            raise BadConfigError(f"--resume: {self.out} was evaluated with other settings ({'; '.join(differ)}); "
                                 f"resume with the same ones, or choose another --output-dir")
        return self._complete_rows()

    def _complete_rows(self) -> list[dict]:
        """The rows of ``scores.csv`` whose unit (arm × prompt group, every seed, every sentence) is complete;
        the file is rewritten with only those (a kill may have cut it anywhere)."""
        import csv
        import io

        from longalign_core.io_utils import atomic_path
        from longalign_core.denscore import prompt_features

        text = self.scores_file.read_text(encoding="utf-8") if self.scores_file.exists() else ""
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]  # the last line was cut mid-write
        rows = list(csv.DictReader(io.StringIO(text))) if text else []
        cfg = self.cfg
        n_sent = [len(f.segments) for f in prompt_features(self.reward, self.prompts, cfg.split_mode,
                                                             cfg.long_segments, cache_size=len(self.prompts))]
        count: dict[tuple, int] = {}
        for r in rows:
            try:
                key = (r["arm"], int(r["prompt"]), int(r["seed"]))
            except (KeyError, TypeError, ValueError):
                continue
            count[key] = count.get(key, 0) + 1
        seeds = [cfg.seed + k for k in range(cfg.seeds)]
        done = set()
        for arm in self.arms:
            for u, unit in enumerate(plan_units(len(self.prompts), cfg.seeds, cfg.batch_size)):
                if all(count.get((arm.name, p, s)) == n_sent[p] for p in unit for s in seeds):
                    done.add((arm.name, u))
        unit_of = {p: u for u, unit in enumerate(plan_units(len(self.prompts), cfg.seeds, cfg.batch_size))
                   for p in unit}
        kept = [r for r in rows if r.get("prompt", "").isdigit() and int(r["prompt"]) in unit_of
                and (r["arm"], unit_of[int(r["prompt"])]) in done]
        with atomic_path(self.scores_file) as tmp:
            Path(tmp).write_text(csv_text(kept, header=True), encoding="utf-8")
        self.done_units = done
        return kept

    # -- the run --------------------------------------------------------------------------------------------
    def run(self, on_unit=None) -> dict:
        """Sample, score and write every (arm, prompt group) not done yet, then the report. ``on_unit(n)`` is
        called after each group is written (tests interrupt the run there). Returns the phase timings."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        cut, lost = self.check_prompts_encode()
        self.done_units = set()
        kept = self._start_files()
        units = plan_units(len(self.prompts), cfg.seeds, cfg.batch_size)
        todo = [(arm, u) for arm in self.arms for u in range(len(units)) if (arm.name, u) not in self.done_units]
        self._banner(cut, lost, len(kept), len(todo), len(self.arms) * len(units))
        bar = tqdm(total=len(todo), desc="evaluating", unit="group", disable=not todo)
        current = None
        try:
            for n, (arm, u) in enumerate(todo, 1):
                if arm is not current:
                    with self.timer("LoRA merge"):
                        self.swap.apply(arm)
                    current = arm
                self._unit(arm, units[u])
                bar.update(1)
                if on_unit is not None:
                    on_unit(n)
        finally:
            bar.close()
            self.swap.restore()
        with self.timer("report"):
            from .eval_report import write_evaluation_report

            summary = write_evaluation_report(self.out, cfg.bootstrap, cfg.bootstrap_seed,
                                              timings=self.timings(), tokens=(cut, lost))
        self.say(summary)
        return self.timings()

    def timings(self) -> dict:
        """Seconds per phase so far and in all (``total``: since the evaluation was set up)."""
        return {**dict(self.timer.seconds), "total": time.perf_counter() - self.t0}

    def _banner(self, cut: int, lost: int, kept: int, todo: int, total: int) -> None:
        cfg = self.cfg
        lines = [f"***** LongAlign evaluation: {len(self.arms)} arm(s) × {len(self.prompts)} prompts × {cfg.seeds} "
                 f"seed(s) *****",
                 f"  base model = {self.base_source} ({'SDXL' if self.is_sdxl else 'SD1.x'}, {self.precision}, "
                 f"{self.device.type})",
                 f"  arms = {', '.join(a.name for a in self.arms)}",
                 f"  judge = {self.reward_source} (fp32), V from the shipped reference prompts",
                 f"  prompts = {self.prompts_source}",
                 f"  DDIM {cfg.steps} steps, CFG {cfg.guidance:g}, {cfg.resolution}px, seeds {cfg.seed}.."
                 f"{cfg.seed + cfg.seeds - 1}; text: budget {cfg.token_budget}, overflow {cfg.overflow}, split "
                 f"{cfg.split_mode}"]
        if cut:
            lines.append(f"  {cut} prompts exceed --token-budget {cfg.token_budget} and are cut ({lost} tokens; "
                         f"--overflow {cfg.overflow})")
        if kept:
            lines.append(f"  resuming: {total - todo} of {total} prompt groups already scored ({kept} rows kept)")
        self.say("\n".join(lines))

    @torch.no_grad()
    def _unit(self, arm: Arm, unit: list[int]) -> None:
        """Sample, decode and score one prompt group for one arm; write its images, then its rows."""
        from longalign_core.denscore import segment_score

        from .sampling import ddim_scheduler, decode, sample_truncated

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
                scheduler = ddim_scheduler(self.noise_scheduler, cfg.steps)
                eps = lambda x, t, c: self.unet(x, t, **c.unet_kwargs()).sample  # noqa: E731
                with autocast:
                    x0 = sample_truncated(eps, scheduler, noise, cond, uncond, cfg.guidance, [])
            with self.timer("decoding"):
                images.append(decode(self.vae, x0).float())
        images = torch.cat(images)
        with self.timer("scoring"):
            texts = [self.prompts[p] for p, _ in items]
            result = segment_score(self.reward, images.to(self.device), texts, direction=self.direction,
                                   omega=cfg.omega, crop="center", split_mode=cfg.split_mode,
                                   long_segments=cfg.long_segments)
            rows = [row for b, (p, s) in enumerate(items) for row in format_rows(arm, p, s, result, b, cfg.omega)]
        with self.timer("writing"):
            pixels = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
            folder = self.out / "images" / arm_folder(arm.name)
            for b, (p, s) in enumerate(items):
                save_png(pixels[b], folder / f"p{p:03d}-s{s}.png")
            with self.scores_file.open("a", encoding="utf-8", newline="") as f:
                f.write(csv_text(rows))  # one write per group: a kill leaves whole groups or a cut tail


def rebuild_report(cfg: EvalConfig) -> str:
    """``--report-only``: the report of the evaluation in ``--output-dir``, from its scores.csv alone."""
    from .eval_report import write_evaluation_report

    out = Path(cfg.output_dir)
    if not (out / SCORES_FILE).is_file():
        raise BadInputError(f"--report-only: {out / SCORES_FILE} not found; run the evaluation first (or give its "
                            f"--output-dir)")
    return write_evaluation_report(out, cfg.bootstrap, cfg.bootstrap_seed)


def main(argv: list[str] | None = None) -> int:
    """Evaluate; user mistakes raise :class:`~longalign_core.errors.LongAlignError` (see :func:`cli`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("accelerate", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    cfg = EvalConfig.from_args(argv)
    if cfg.report_only:
        print(rebuild_report(cfg), flush=True)
        return 0
    evaluation = Evaluation(cfg)
    if cfg.model is None:
        lora = (f"the LoRA ./dev run trained ({evaluation.demo_lora}) against the base" if evaluation.demo_lora
                else f"the base alone (no LoRA at {DEMO_LORA}: run ./dev run first, or pass --lora)")
        print(f"No --model given: evaluating the built-in tiny random-weight SD1.5-shaped pipeline on the CPU, "
              f"{lora}, judged by the built-in tiny preference model (the pictures are noise; the numbers show "
              f"the pipeline). Pass --model, --reward-model and --lora for a real comparison.", flush=True)
    evaluation.run()
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``python -m trainer.evaluate``: user mistakes print one paragraph (no traceback) and exit with code 2."""
    return run_cli(main, argv, prog="python -m trainer.evaluate")


if __name__ == "__main__":
    sys.exit(cli())
