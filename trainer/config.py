"""``TrainConfig``: every hyper-parameter of the trainer, with the paper's values as defaults (SPEC §5).

One dataclass doubles as the command line (each field is a ``--flag``) and the config file (``--config
run.json`` or ``.toml``; flags given on the command line win). It is validated on creation and written to
``<output_dir>/config.json`` for every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from longalign_core.denscore import DEFAULT_REWEIGHT

Stage = Literal["reward", "align"]


def _f(default, help: str, **kw):
    if isinstance(default, type):  # a mutable default (list): give its factory
        return field(default_factory=default, metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # -- run --------------------------------------------------------------------------------------------------
    stage: Stage = _f("reward", "reward: decomposed preference optimisation (paper §4); align: supervised "
                                "ε-MSE on (image, long caption) pairs (the stage-1 'align' LoRA)")
    output_dir: str = _f("outputs/longalign-run", "where the LoRA, logs, checkpoints and report go")
    seed: int = _f(0, "random seed (noise, DDIM offsets, crops, prompt order all derive from it and the step)")
    resume: str | None = _f(None, "'latest' or a checkpoint folder to continue from")
    # -- models -----------------------------------------------------------------------------------------------
    model: str | None = _f(None, "base model: local diffusers SD1.5 folder, single-file .safetensors/.ckpt "
                                 "checkpoint, or Hub id. Omit for the built-in tiny random model (a CPU demo)")
    reward_model: str | None = _f(None, "preference model: Denscore/PickScore/CLIP-H folder (HF CLIPModel) or "
                                        "HPSv2 open_clip checkpoint. Omit for a built-in tiny one")
    reward_model_kind: str = _f("auto", "auto | hf_clip | open_clip")
    t5_model: str | None = _f(None, "T5 folder (google-t5/t5-large) for the LongSD T5 branch")
    t5_adapter: str | None = _f(None, "LongSD adapter folder (s28750_adapter) for the T5 branch")
    train_t5_adapter: bool = _f(False, "align stage: train the T5 adapter with the LoRA (as LongSD's stage 1 did); "
                                       "it is saved to <output_dir>/t5_adapter")
    init_lora: list[str] = _f(list, "LoRA files merged into the UNet before training (e.g. the stage-1 "
                                    "s28750_lora_vis.pt for the reward stage)", nargs="*")
    # -- data -------------------------------------------------------------------------------------------------
    prompts: str | None = _f(None, "prompts: .txt (one per line), .jsonl ('prompt' or 'caption' field) or a "
                                   "local `datasets` folder (save_to_disk) with a 'caption' column. Omit for "
                                   "the built-in long prompts")
    image_column: str = _f("image", "align stage: image column of the datasets folder")
    caption_column: str = _f("caption", "align stage: caption column")
    # -- text encoding ----------------------------------------------------------------------------------------
    token_budget: int = _f(240, "segment-level conditioning length (SPEC §1)")
    # -- LoRA -------------------------------------------------------------------------------------------------
    lora_rank: int = _f(32, "LoRA rank on every Linear/Conv2d in ResnetBlock2D / Attention / GEGLU")
    # -- sampling (reward stage) ------------------------------------------------------------------------------
    sample_steps: int = _f(50, "DDIM steps from noise (t = 999, 979, …, 19)")
    sample_grad_steps: int = _f(5, "steps that get gradients (every sample_steps/K-th, random offset)")
    sample_guidance: float = _f(7.5, "classifier-free guidance scale (with the empty prompt)")
    resolution: int = _f(512, "image size in pixels")
    # -- reward -----------------------------------------------------------------------------------------------
    reward_omega: float = _f(DEFAULT_REWEIGHT, "reweight factor ω of the text-irrelevant part (paper: 0.3)")
    reward_crop: str = _f("random", "random (reference) | center crop before the preference model")
    # -- optimisation -----------------------------------------------------------------------------------------
    train_steps: int = _f(3750, "optimizer steps (the released reward LoRA is step 3750)")
    train_batch_size: int = _f(8, "prompts (reward) or pairs (align) per process and step")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    learning_rate: float = _f(3e-5, "AdamW learning rate")
    adam_beta1: float = _f(0.9, "AdamW β1")
    adam_beta2: float = _f(0.999, "AdamW β2")
    adam_weight_decay: float = _f(1e-2, "AdamW weight decay")
    adam_epsilon: float = _f(1e-8, "AdamW ε")
    lr_warmup_steps: int = _f(2000, "linear warm-up, then constant")
    max_grad_norm: float = _f(0.3, "gradient-norm clip")
    caption_dropout: float = _f(0.1, "align stage: probability of training on the empty caption")
    mixed_precision: str = _f("no", "no | fp16 | bf16 (the paper used bf16 on A100s)")
    gradient_checkpointing: bool = _f(True, "checkpoint the UNet at the gradient steps (and in align training)")
    # -- logging, validation, checkpoints ---------------------------------------------------------------------
    log_every: int = _f(1, "log loss/reward every N steps (CSV always; TensorBoard when installed)")
    validation_every: int = _f(500, "sample and score validation images every N steps (0 = only start/end)")
    validation_prompts: int = _f(2, "how many prompts to sample for validation")
    validation_steps: int = _f(25, "DDIM steps for validation images")
    checkpoint_every: int = _f(500, "save the full training state every N steps")
    checkpoints_keep: int = _f(2, "keep the newest N checkpoints")
    merge_checkpoint: bool = _f(False, "also write the UNet with the LoRA merged (diffusers folder)")
    dump_debug: bool = _f(False, "write per-process diagnostics (V, batch text means, LoRA checksum) each step")

    def __post_init__(self):
        checks = [
            (self.stage in get_args(Stage), f"stage {self.stage!r} is not one of {get_args(Stage)}"),
            (self.lora_rank >= 1, f"lora_rank must be >= 1, got {self.lora_rank}"),
            (self.sample_steps >= 1, f"sample_steps must be >= 1, got {self.sample_steps}"),
            (1 <= self.sample_grad_steps <= self.sample_steps,
             f"sample_grad_steps must be in 1..sample_steps ({self.sample_steps}), got {self.sample_grad_steps}"),
            (self.sample_grad_steps < 1 or self.sample_steps % self.sample_grad_steps == 0,
             f"sample_steps ({self.sample_steps}) must be a multiple of sample_grad_steps ({self.sample_grad_steps})"),
            (0.0 <= self.reward_omega <= 1.0, f"reward_omega must be in [0, 1], got {self.reward_omega}"),
            (self.reward_crop in ("random", "center"), f"reward_crop must be random or center, got {self.reward_crop!r}"),
            (self.resolution % 8 == 0 and self.resolution >= 16, "resolution must be a multiple of 8 >= 16"),
            (self.train_steps >= 1, f"train_steps must be >= 1, got {self.train_steps}"),
            (self.train_batch_size >= 1, f"train_batch_size must be >= 1, got {self.train_batch_size}"),
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (self.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision must be no, fp16 or bf16"),
            (0.0 <= self.caption_dropout < 1.0, f"caption_dropout must be in [0, 1), got {self.caption_dropout}"),
            (self.token_budget >= 1, "token_budget must be >= 1"),
            ((self.t5_model is None) == (self.t5_adapter is None), "give both --t5-model and --t5-adapter, or neither"),
            (not self.train_t5_adapter or (self.stage == "align" and self.t5_model is not None),
             "--train-t5-adapter needs --stage align and --t5-model/--t5-adapter"),
            (self.checkpoint_every >= 1 and self.checkpoints_keep >= 1, "checkpoint_every and checkpoints_keep must be >= 1"),
        ]
        errors = [msg for ok, msg in checks if not ok]
        if errors:
            raise ValueError("invalid training config: " + "; ".join(errors))

    # -- CLI / files ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        from longalign_core.io_utils import atomic_path

        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        from trainer import finetune

        ap = argparse.ArgumentParser(prog="python -m trainer.finetune", description=finetune.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("--config", help="JSON or TOML file with any of the options below (flags win)")
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = f"{f.metadata['help']} (default: {default})"
            if f.type in ("bool", bool):
                ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            elif f.metadata.get("nargs"):
                ap.add_argument(flag, nargs=f.metadata["nargs"], default=None, help=help_text)
            else:
                kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
                ap.add_argument(flag, type=kind, default=None, help=help_text)
        return ap

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> "TrainConfig":
        args = vars(cls.parser().parse_args(argv))
        values: dict[str, Any] = {}
        config_file = args.pop("config")
        if config_file:
            text = Path(config_file).read_text()
            if config_file.endswith(".toml"):
                import tomllib

                values.update(tomllib.loads(text))
            else:
                values.update(json.loads(text))
            unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"{config_file}: unknown options {sorted(unknown)}")
        values.update({k: v for k, v in args.items() if v is not None})
        return cls(**values)
