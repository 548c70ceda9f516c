"""``TrainConfig``: every hyper-parameter of the trainer, with the paper's values as defaults (docs/method.md §5).

One dataclass doubles as the command line (each field is a ``--flag``) and the config file (``--config
run.toml`` or ``.json``), through :mod:`trainer.options`. Precedence, highest first: flags on the command line >
the config file > the CPU demo profile (only when no ``--model`` is given by either) > the defaults here. Every
value is type-checked and validated on creation (a mistake is a :class:`~longalign_core.errors.BadConfigError`
naming the option or the file and key), and the resolved config is written to ``<output_dir>/config.json`` for
every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longalign_core.denscore import DEFAULT_REWEIGHT
from longalign_core.errors import BadConfigError
from longalign_core.segment_encoding import DEFAULT_TOKEN_BUDGET, OVERFLOW_POLICIES
from longalign_core.segmentation import LONG_SEGMENT_POLICIES, SPLIT_MODES

from .options import add_field_options, coerce_fields, read_config_file
from .options import option as _f  # a field that is also a --flag (its help text, aliases, nargs)

#: Allowed words of the options that take one (the same words as ``longalign_core`` and the node).
CHOICES: dict[str, tuple[str, ...]] = {
    "stage": ("reward", "align"),
    "overflow": OVERFLOW_POLICIES,
    "split_mode": SPLIT_MODES,
    "long_segments": LONG_SEGMENT_POLICIES,
    "reward_crop": ("random", "center"),
    "reward_direction": ("auto", "training", "reference", "batch"),
    "reward_model_kind": ("auto", "hf_clip", "open_clip"),
    "mixed_precision": ("no", "fp16", "bf16"),
}

#: Largest accepted ``token_budget``: far above any SD use (the released model was trained at 240), low enough
#: that a typo cannot ask for gigabytes of padding.
MAX_TOKEN_BUDGET = 4096

#: The trainer's command (in --help, and in the hint of an unknown config-file key).
PROG = "python -m trainer.finetune"

#: ``--model`` names of the built-in tiny random-weight pipelines (trainer.loading.models builds them).
EMBEDDED_MODELS = ("embedded", "embedded-sdxl")

#: Settings of the CPU demo run when no --model (or an embedded one) is given (below the config file and flags).
EMBEDDED_PROFILE = dict(train_steps=30, train_batch_size=2, resolution=64, sample_steps=20,
                        sample_grad_steps=5, learning_rate=2e-3, lr_warmup_steps=0, lora_rank=4,
                        validation_every=15, validation_steps=10, checkpoint_every=15,
                        max_grad_norm=1.0, output_dir="outputs/longalign-demo")


@dataclass
class TrainConfig:
    # -- run --------------------------------------------------------------------------------------------------
    stage: str = _f("reward", "reward: decomposed preference optimisation (paper §4); align: supervised "
                              "ε-MSE on (image, long caption) pairs (the stage-1 'align' LoRA)")
    output_dir: str = _f("outputs/longalign-run", "where the LoRA, logs, checkpoints and report go")
    seed: int = _f(0, "random seed: noise, DDIM offsets, crops, prompt order, caption dropout and the LoRA / T5 "
                      "adapter dropout masks all derive from (seed, step, process)")
    resume: str | None = _f(None, "'latest' or a checkpoint folder to continue from")
    overwrite_output_dir: bool = _f(False, "start a new run in an --output-dir that holds one: its logs, "
                                           "checkpoints, validation images, report and LoRA are deleted first "
                                           "(without it, such a folder is refused unless --resume)")
    # -- models -----------------------------------------------------------------------------------------------
    model: str | None = _f(None, "base model, SD1.x or SDXL (recognised from its weights): a local diffusers "
                                 "folder, a single-file .safetensors/.ckpt checkpoint (e.g. ComfyUI's "
                                 "models/checkpoints), or a Hub id. Omit (or 'embedded') for the built-in tiny "
                                 "random SD1.5-shaped model, 'embedded-sdxl' for the SDXL-shaped one (CPU demos)")
    reward_model: str | None = _f(None, "preference model: Denscore/PickScore/CLIP-H folder (HF CLIPModel) or "
                                        "HPSv2 open_clip checkpoint; 'embedded' for the built-in tiny random one "
                                        "(the default with an embedded --model; with a real --model it must be "
                                        "given)")
    reward_model_kind: str = _f("auto", "auto | hf_clip | open_clip")
    t5_model: str | None = _f(None, "T5 folder (google-t5/t5-large) for the LongSD T5 branch")
    t5_adapter: str | None = _f(None, "LongSD adapter folder (s28750_adapter) for the T5 branch")
    train_t5_adapter: bool = _f(False, "align stage: train the T5 adapter with the LoRA (as LongSD's stage 1 did); "
                                       "it is saved to <output_dir>/t5_adapter")
    init_lora: list[str] = _f(list, "LoRA files merged into the UNet before training (e.g. the stage-1 "
                                    "s28750_lora_vis.pt for the reward stage)", nargs="*")
    # -- data -------------------------------------------------------------------------------------------------
    prompts: str | None = _f(None, "prompts: .txt (one per line), .jsonl ('prompt' or 'caption' field), a folder "
                                   "of .txt files (one prompt each) or a local `datasets` folder (save_to_disk) "
                                   "with a 'caption' column. Omit only with an embedded --model (the built-in long "
                                   "prompts)")
    image_column: str = _f("image", "align stage: the column with the images (a datasets.Image column) or their "
                                    "paths (e.g. 'path' in the released LongAlign data); not used by an image "
                                    "folder with .txt captions")
    caption_column: str = _f("caption", "the caption column (--prompts datasets folder, .csv, .jsonl)")
    image_root: str | None = _f(None, "align stage: the folder relative image paths are read under (default: the "
                                      "--prompts file's folder; for a datasets folder, it or the folder it sits in)")
    buckets: bool = _f(False, "align stage: aspect-ratio buckets of about --resolution² pixels (the usual SDXL "
                              "1024² buckets at 1024) instead of a centre-cropped square; SDXL's size/crop ids "
                              "are those of the bucket and crop used")
    dataloader_workers: int = _f(2, "align stage: processes that decode images beside training (0: in the "
                                    "training process)")
    # -- text encoding ----------------------------------------------------------------------------------------
    token_budget: int = _f(DEFAULT_TOKEN_BUDGET, "segment-level conditioning length of the CLIP part (docs/method.md §1)")
    overflow: str = _f("truncate", "a prompt longer than the token budget: truncate (the release: keep the first "
                                   "budget tokens; prompts cut and tokens lost are logged every step) | extend "
                                   "(grow every row of the step, positive and unconditional, to one common "
                                   "multiple of the budget) | error (stop)")
    split_mode: str = _f("sentence", "segment splitter for the conditioning and the reward: sentence (real "
                                     "sentence boundaries) | reference (the released code's split)")
    long_segments: str = _f("split", "a sentence longer than the text window (75 tokens): split (at clauses, "
                                     "no token lost) | truncate (the release: cut at the window, logged)")
    # -- LoRA -------------------------------------------------------------------------------------------------
    lora_rank: int = _f(32, "LoRA rank on every Linear/Conv2d in ResnetBlock2D / Attention / GEGLU")
    lora_dropout: float = _f(0.1, "dropout on the LoRA branch's output (the release's placement and value), "
                                  "active in every training forward, sampling steps included")
    # -- sampling (reward stage) ------------------------------------------------------------------------------
    sample_steps: int = _f(50, "DDIM steps from noise (t = 999, 979, …, 19)")
    sample_grad_steps: int = _f(5, "steps that get gradients (every sample_steps/K-th, random offset)")
    sample_guidance: float = _f(7.5, "classifier-free guidance scale (with the empty prompt)")
    resolution: int | None = _f(None, "image size in pixels; default: the base model's own (its UNet's sample_size "
                                      "× 8: 512 for SD1.5, 1024 for SDXL)")
    # -- reward -----------------------------------------------------------------------------------------------
    reward_omega: float = _f(DEFAULT_REWEIGHT, "reweight factor ω of the text-irrelevant part (paper: 0.3)")
    reward_crop: str = _f("random", "random (reference) | center crop before the preference model")
    reward_direction: str = _f("auto", "the common text direction V of the decomposition: training (from a sample "
                                       "of the training prompts, fixed for the run) | reference (the shipped "
                                       "reference prompts, as validation) | batch (the release: the prompts of "
                                       "each optimizer step, all micro-batches and processes; needs >= 32 of "
                                       "them, or V is nearly the prompts themselves and the text-relevant part "
                                       "vanishes) | auto (batch from 32 prompts per step, else training)")
    reward_direction_prompts: int = _f(1024, "training prompts sampled (with the seed) for --reward-direction "
                                             "training")
    decode_batch: int | None = _f(None, "images per VAE decode and reward forward, each backpropagated before the "
                                        "next (peak memory of the decode falls with it; the gradient is the "
                                        "same); default: as many as make one 512x512 image")
    # -- optimisation -----------------------------------------------------------------------------------------
    train_steps: int = _f(3750, "optimizer steps (the released reward LoRA is step 3750)")
    train_batch_size: int = _f(8, "prompts (reward) or pairs (align) per process and step", aliases=["--batch-size"])
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    learning_rate: float = _f(3e-5, "AdamW learning rate")
    adam_beta1: float = _f(0.9, "AdamW β1")
    adam_beta2: float = _f(0.999, "AdamW β2")
    adam_weight_decay: float = _f(1e-2, "AdamW weight decay")
    adam_epsilon: float = _f(1e-8, "AdamW ε")
    lr_warmup_steps: int = _f(2000, "linear warm-up, then constant")
    max_grad_norm: float = _f(0.3, "gradient-norm clip")
    caption_dropout: float = _f(0.1, "align stage: probability of training on the empty caption")
    mixed_precision: str | None = _f(None, "no | fp16 | bf16; default bf16 on a GPU, no on the CPU. LoRA master "
                                           "weights stay fp32; frozen parts are cast to this dtype")
    compile_unet: bool = _f(False, "torch.compile the UNet for the no-grad sampling steps (GPU; the first steps "
                                   "are slower while it compiles)")
    gradient_checkpointing: bool = _f(True, "gradient checkpointing: each gradient step of the sampling chain "
                                            "recomputed in the backward with the UNet's blocks checkpointed "
                                            "(reward stage), the UNet's blocks (align stage), the VAE decode")
    cache_text_embeddings: bool = _f(False, "encode every prompt (training, validation, empty) once at set-up and "
                                            "free the CLIP text encoders before the preference model loads "
                                            "(SDXL: 1.5 GiB less in bf16), and the preference model's text tower "
                                            "once V is built (Denscore: 0.66 GiB). The cache lives in CPU memory: "
                                            "at the 240-token budget in bf16, 0.94 MiB per SDXL prompt, 0.35 MiB per "
                                            "SD1.5 prompt")
    # -- logging, validation, checkpoints ---------------------------------------------------------------------
    log_every: int = _f(1, "log loss/reward every N steps (CSV always; TensorBoard when installed)")
    validation_every: int = _f(500, "sample and score validation images every N steps (0 = only start/end)")
    validation_prompts: int | str | None = _f(None, "held-out validation prompts: a count (drawn with the seed "
                                                    "from the training prompts and removed from them) or a "
                                                    "prompts file; 0 = none. Default: 8, or a fifth of a training "
                                                    "set of fewer than 40 (the reward-hacking check measures the "
                                                    "validation noise over them)")
    validation_steps: int = _f(25, "DDIM steps for validation images")
    checkpoint_every: int = _f(500, "save the training state (LoRA, optimizer, schedule, RNG: megabytes) and "
                                    "the LoRA file of that step every N steps")
    checkpoints_keep: int = _f(2, "keep the newest N checkpoints")
    merge_checkpoint: bool = _f(False, "also write the UNet with the LoRA merged (diffusers folder)")
    dry_run: bool = _f(False, "load everything, run one warm-up and one measured step, one validation and one "
                              "checkpoint in a temporary folder, and report the memory of each part, the peak "
                              "memory of a step, its time per phase and the projected run time "
                              "(<output_dir>/dry_run.md is the only file written); nothing is trained")
    dump_debug: bool = _f(False, "write per-process diagnostics (V, batch text means, LoRA checksum) each step")

    def __post_init__(self):
        bad = coerce_fields(self, CHOICES)
        checks = [
            (self.lora_rank >= 1, f"--lora-rank must be >= 1, got {self.lora_rank}"),
            (0.0 <= self.lora_dropout < 1.0, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}"),
            (self.sample_steps >= 1, f"--sample-steps must be >= 1, got {self.sample_steps}"),
            (1 <= self.sample_grad_steps <= self.sample_steps,
             f"--sample-grad-steps must be in 1..--sample-steps ({self.sample_steps}), got {self.sample_grad_steps}"),
            (self.sample_grad_steps < 1 or self.sample_steps % self.sample_grad_steps == 0,
             f"--sample-steps ({self.sample_steps}) must be a multiple of --sample-grad-steps "
             f"({self.sample_grad_steps})"),
            (0.0 <= self.reward_omega <= 1.0, f"--reward-omega must be in [0, 1], got {self.reward_omega}"),
            (self.resolution is None or self.resolution % 8 == 0 and 16 <= self.resolution <= 4096,
             f"--resolution must be a multiple of 8 in 16..4096, got {self.resolution}"),
            (self.train_steps >= 1, f"--train-steps must be >= 1, got {self.train_steps}"),
            (self.train_batch_size >= 1, f"--train-batch-size (--batch-size) must be >= 1, got "
                                         f"{self.train_batch_size}"),
            (self.gradient_accumulation_steps >= 1,
             f"--gradient-accumulation-steps must be >= 1, got {self.gradient_accumulation_steps}"),
            (self.learning_rate > 0, f"--learning-rate must be > 0, got {self.learning_rate}"),
            (0.0 <= self.caption_dropout < 1.0, f"--caption-dropout must be in [0, 1), got {self.caption_dropout}"),
            (1 <= self.token_budget <= MAX_TOKEN_BUDGET,
             f"--token-budget must be in 1..{MAX_TOKEN_BUDGET}, got {self.token_budget} (the released model was "
             f"trained at {DEFAULT_TOKEN_BUDGET}; for longer prompts keep it and use --overflow extend)"),
            ((self.t5_model is None) == (self.t5_adapter is None), "give both --t5-model and --t5-adapter, or neither"),
            (not self.train_t5_adapter or (self.stage == "align" and self.t5_model is not None),
             "--train-t5-adapter needs --stage align and --t5-model/--t5-adapter"),
            (self.checkpoint_every >= 1 and self.checkpoints_keep >= 1,
             "--checkpoint-every and --checkpoints-keep must be >= 1"),
            (self.log_every >= 1 and self.validation_every >= 0 and self.validation_steps >= 1,
             "--log-every and --validation-steps must be >= 1, --validation-every >= 0"),
            (not isinstance(self.validation_prompts, int) or self.validation_prompts >= 0,
             f"--validation-prompts must be a count >= 0 or a prompts file, got {self.validation_prompts!r}"),
            (self.reward_direction_prompts >= 1,
             f"--reward-direction-prompts must be >= 1, got {self.reward_direction_prompts}"),
            (self.decode_batch is None or self.decode_batch >= 1, f"--decode-batch must be >= 1, got {self.decode_batch}"),
            (self.dataloader_workers >= 0, f"--dataloader-workers must be >= 0, got {self.dataloader_workers}"),
        ]
        errors = bad + [msg for ok, msg in checks if not ok]
        if errors:
            raise BadConfigError("invalid training config: " + "; ".join(errors))
        self._refuse_silent_fallbacks()

    @property
    def is_embedded(self) -> bool:
        """The run uses a built-in demo model (no --model, or an embedded one)."""
        return self.model in (None, *EMBEDDED_MODELS)

    def _refuse_silent_fallbacks(self) -> None:
        """A real base model never trains against the built-in tiny preference model or the built-in prompts
        without being told to: that run would look normal and learn nothing (or score validation on its own
        training set)."""
        if self.is_embedded or self.stage != "reward":
            return
        if self.reward_model is None:
            raise BadConfigError(
                f"--model {self.model} is a real model but no --reward-model was given: the run would score its "
                f"images with the built-in tiny random preference model and learn nothing. Pass the preference "
                f"model to train against, e.g. --reward-model /path/to/Denscore (a Hugging Face CLIPModel folder: "
                f"Denscore, PickScore or CLIP-H) or an HPSv2 .pt checkpoint; for a smoke test of the pipeline "
                f"only, --reward-model embedded")
        if self.prompts is None:
            raise BadConfigError(
                f"--model {self.model} is a real model but no --prompts were given: the run would train on the "
                f"built-in prompts, which are also the reference set that defines V for validation, so validation "
                f"would score its own training set. Pass your long captions with --prompts (a .txt file with one "
                f"prompt per line, a .jsonl file with a 'prompt' or 'caption' field, or a local `datasets` folder)")

    # -- CLI / files ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        from longalign_core.io_utils import atomic_path

        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def parser(cls, description: str | None = None) -> argparse.ArgumentParser:
        """The command line (``description``: the text ``--help`` prints above the options)."""
        from .stop_signal import stop_help

        ap = argparse.ArgumentParser(prog=PROG, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=stop_help(
                                         "ends the step under way, writes a checkpoint of it on every process",
                                         "--resume latest", " 3 the loss became NaN or infinite;"))
        ap.add_argument("--config", help="JSON or TOML file with any of the options below (flags win; both win "
                                         "over the demo profile used when no --model, or an embedded one, is given)")
        add_field_options(ap, cls, CHOICES)
        return ap

    @classmethod
    def from_args(cls, argv: list[str] | None = None, description: str | None = None) -> "TrainConfig":
        """Resolve flags > ``--config`` file > demo profile (no ``--model`` anywhere) > defaults."""
        args = vars(cls.parser(description).parse_args(argv))
        config_file = args.pop("config")
        from_file = read_config_file(config_file, cls, PROG) if config_file else {}
        from_flags = {k: v for k, v in args.items() if v is not None}
        given = {**from_file, **from_flags}
        profile = EMBEDDED_PROFILE if given.get("model") in (None, *EMBEDDED_MODELS) else {}
        if given.get("model") == "embedded-sdxl":  # its own folder: a used --output-dir is refused
            profile = {**profile, "output_dir": EMBEDDED_PROFILE["output_dir"] + "-sdxl"}
        return cls(**{**profile, **given})
