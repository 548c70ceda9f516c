"""``EvalConfig``: the options of ``python -m trainer.evaluate``. One dataclass doubles as the command line (each
field is a ``--flag``, through :mod:`trainer.options` as the trainer's); the sampler and text defaults are the
trainer's own (its validation sampler), read from :class:`~trainer.config.TrainConfig`."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from longalign_core import denscore
from longalign_core.denscore import DEFAULT_REWEIGHT
from longalign_core.errors import BadConfigError
from longalign_core.segment_encoding import DEFAULT_TOKEN_BUDGET

from ..config import CHOICES as TRAIN_CHOICES
from ..config import EMBEDDED_MODELS, EMBEDDED_PROFILE, MAX_TOKEN_BUDGET, TrainConfig
from ..options import add_field_options, coerce_fields
from ..options import option as _f  # a field that is also a --flag (its help text, aliases, nargs)
from .stats import DEFAULT_BOOTSTRAP

#: The held-out long prompts shipped with the pack (not the reference set that defines V).
EVALUATION_PROMPTS = Path(denscore.__file__).with_name("data") / "evaluation_prompts.txt"
#: The LoRA ``./dev run`` (the trainer's CPU demo) writes; the no-argument evaluation picks it up.
DEMO_LORA = Path(EMBEDDED_PROFILE["output_dir"]) / "longalign_lora.safetensors"

#: Allowed words of the options that take one: the trainer's.
CHOICES = {k: TRAIN_CHOICES[k] for k in ("overflow", "split_mode", "long_segments", "reward_model_kind",
                                         "mixed_precision")}


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
                               "LongSD .pt; repeat for more arms. The base model is always an arm", nargs="+",
                               action="extend", metavar="FILE[:STRENGTH]")
    reward_model: str | None = _f(None, "the judge: Denscore/PickScore/CLIP-H folder (HF CLIPModel) or HPSv2 "
                                        "open_clip checkpoint; 'embedded' for the built-in tiny one (the default "
                                        "with an embedded --model; with a real --model it must be given)")
    reward_model_kind: str = _f("auto", "auto | hf_clip | open_clip")
    prompts: str | None = _f(None, "held-out prompts: a .txt (one per line), a folder of .txt files (one prompt "
                                   "per file, DPG-Bench's prompts/; in the order of the file names) or a .jsonl "
                                   "(see --prompt-field); default: the pack's 64 evaluation prompts "
                                   "(longalign_core/data/evaluation_prompts.txt, not the reference set that "
                                   "defines V)")
    prompt_field: str | None = _f(None, "the field of a --prompts .jsonl that holds the prompt (default: 'prompt', "
                                        "else 'caption')")
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
        bad = coerce_fields(self, CHOICES)
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
    def parser(cls, description: str | None = None) -> argparse.ArgumentParser:
        from ..stop_signal import stop_help

        ap = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=stop_help("finishes the prompt group under way, writes it to "
                                                      "scores.csv", "--resume"))
        add_field_options(ap, cls, CHOICES)
        return ap

    @classmethod
    def from_args(cls, argv: list[str] | None = None, description: str | None = None) -> "EvalConfig":
        args = vars(cls.parser(description).parse_args(argv))
        return cls(**{k: v for k, v in args.items() if v is not None})
