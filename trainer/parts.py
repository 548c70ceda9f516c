"""The loaded pieces of a training run, each with a typed home, and the one place they are built (:func:`load_parts`).

* :class:`TrainingData`: the training prompts (reward stage) or image-caption rows (align stage), and the held-out
  validation prompts;
* :class:`BaseParts`: the base model's frozen parts (VAE, noise scheduler, CLIP text encoders and tokenizers);
* :class:`LoRAUNet`: the UNet with the LoRA that trains (and what trains with it);
* the text side: :class:`~trainer.conditioning.StepEncoder` (segment-level CLIP, the optional LongSD T5 branch);
* :class:`Scoring`: the judge (the preference model the reward stage trains against and validation scores with)
  and V (the reference V validation uses, the reward stage's V of each step).

The objective, the validation, the dry run, the outputs and the run log take the parts they use; the loop
(:class:`~trainer.finetune.Trainer`) holds them in a :class:`RunParts`. The evaluation builds its base model and
its judge with the same :meth:`BaseParts.from_loaded` and :meth:`Scoring.of`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from longalign_core.errors import BadConfigError, BadModelFileError
from longalign_core.lora import LoraTarget, load_lora, lora_targets, merge_lora
from longalign_core.phase_timer import PhaseTimer
from longalign_core.preference import PreferenceModel, load_preference_model
from longalign_core.reference_direction import default_reference_prompts, direction_from_prompts

from . import checkpoints as ckpt
from .align_data import AlignData
from .conditioning import StepEncoder
from .data import load_prompts, split_validation
from .direction import RewardDirection, resolve_direction
from .loading.models import load_base_model, reward_model_source
from .lora_layers import add_lora_output_dropout, attach_lora
from .sampling import UNetConditioning
from .text_cache import cache_text_embeddings, pin_reward_texts


@dataclass
class TrainingData:
    """What the run trains on: the reward stage's ``prompts``, or the align stage's ``align`` data and the rows of
    it that train (``align_rows``); ``validation_prompts`` are held out of both."""

    stage: str
    validation_prompts: list[str]
    prompts: list[str] | None = None
    align: AlignData | None = None
    align_rows: list[int] | None = None

    @classmethod
    def load(cls, cfg) -> "TrainingData":
        """Read and check the data of ``cfg`` (every training image is opened: before any model loads)."""
        if cfg.stage == "reward":
            pool, source = load_prompts(cfg.prompts, cfg.caption_column), cfg.prompts or "the built-in prompts"
            held_out, rows = split_validation(pool, cfg.validation_prompts, cfg.seed, source)
            return cls("reward", held_out, prompts=[pool[i] for i in rows])
        align = AlignData(cfg)
        held_out, rows = split_validation(align.captions, cfg.validation_prompts, cfg.seed, cfg.prompts)
        align.check(rows)
        return cls("align", held_out, align=align, align_rows=rows)

    def training_texts(self) -> list[str]:
        """Every text a training step may encode: the prompts, or the captions of the training rows."""
        return list(self.prompts) if self.stage == "reward" else [self.align.captions[i] for i in self.align_rows]

    def __len__(self) -> int:
        """Training prompts (reward stage) or training rows (align stage)."""
        return len(self.prompts) if self.stage == "reward" else len(self.align_rows)


@dataclass
class BaseParts:
    """The base model's frozen parts on the device: ``vae`` and ``noise_scheduler`` (its ``prediction_type`` says
    what the UNet predicts), the CLIP ``text_encoder`` and ``tokenizer`` (+ SDXL's ``text_encoder_2`` and
    ``tokenizer_2``; the encoders are None once ``--cache-text-embeddings`` freed them). ``dtype``: the dtype of
    the frozen UNet and text encoders, and of the latents (``--mixed-precision``; SDXL's VAE stays fp32 in fp16,
    :func:`~trainer.sampling.vae_dtype`)."""

    source: str
    is_sdxl: bool
    vae: torch.nn.Module
    noise_scheduler: object
    dtype: torch.dtype
    tokenizer: object
    text_encoder: torch.nn.Module | None
    tokenizer_2: object | None = None
    text_encoder_2: torch.nn.Module | None = None

    @classmethod
    def from_loaded(cls, loaded, device: torch.device, dtype: torch.dtype) -> "BaseParts":
        """The frozen parts of ``loaded`` (a :class:`~trainer.loading.base_model.BaseModel`) on ``device``, in
        eval mode without gradients (the UNet is the caller's: trained or swapped)."""
        frozen = lambda m: None if m is None else m.to(device).requires_grad_(False).eval()  # noqa: E731
        # the VAE was loaded in vae_dtype(dtype, its config): SDXL's stays fp32 in an fp16 run
        return cls(source=loaded.source, is_sdxl=loaded.is_sdxl, vae=frozen(loaded.vae),
                   noise_scheduler=loaded.noise_scheduler, dtype=dtype, tokenizer=loaded.tokenizer,
                   text_encoder=frozen(loaded.text_encoder), tokenizer_2=loaded.tokenizer_2,
                   text_encoder_2=frozen(loaded.text_encoder_2))

    @property
    def prediction_type(self) -> str:
        """``epsilon`` or ``v_prediction``: the reward stage's DDIM steps and the align stage's target read it."""
        return self.noise_scheduler.config.get("prediction_type", "epsilon")

    def segment_encoder(self):
        """The segment-level text encoder of this model: :class:`~longalign_core.clip_text.CLIPSegmentEncoder`,
        or on SDXL :class:`~longalign_core.sdxl_text.SDXLSegmentEncoder` (both encoders, pooled bigG from the
        first segment: docs/method.md §1)."""
        if self.is_sdxl:
            from longalign_core.sdxl_text import SDXLSegmentEncoder

            return SDXLSegmentEncoder(self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2)
        from longalign_core.clip_text import CLIPSegmentEncoder

        return CLIPSegmentEncoder(self.tokenizer, self.text_encoder)


@dataclass
class LoRAUNet:
    """The UNet with its LoRA: ``unet`` as accelerate prepared it (what the forward and backward run through),
    ``module`` the same model unwrapped (what is saved), ``compiled`` its ``torch.compile`` (``--compile-unet``;
    sampling without gradients only). ``params``: what the optimizer trains (the LoRA's, and the T5 adapter's
    with ``--train-t5-adapter``); ``targets``: the UNet layers the LoRA sits on."""

    unet: torch.nn.Module
    module: torch.nn.Module
    params: list[torch.nn.Parameter]
    targets: list[LoraTarget]
    rank: int
    phases: PhaseTimer
    compiled: torch.nn.Module | None = None

    def eps(self, x: torch.Tensor, t, conditioning: UNetConditioning) -> torch.Tensor:
        """The UNet's prediction (ε, or v); sampling steps without gradients go through ``compiled`` if any."""
        grad = torch.is_grad_enabled()
        unet = self.compiled if self.compiled is not None and not grad else self.unet
        with self.phases("UNet, with gradients" if grad else "UNet, no gradients"):
            return unet(x, t, **conditioning.unet_kwargs()).sample

    @property
    def lora_parameters(self) -> int:
        """Trainable parameters of the UNet (the LoRA's; the T5 adapter's are not counted)."""
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)


@dataclass
class Scoring:
    """The ``judge`` (a :class:`~longalign_core.preference.PreferenceModel`; ``source`` names it in the logs and
    the LoRA's metadata) and V: ``reference_v``, from the shipped reference prompts (validation and the evaluation
    score with it, so steps and runs compare), and ``reward_v``, the reward stage's V of each step (None in the
    align stage)."""

    judge: PreferenceModel
    source: str
    reference_v: torch.Tensor
    reward_v: RewardDirection | None = None

    @classmethod
    def of(cls, judge: PreferenceModel, source: str, split_mode: str, long_segments: str,
           device: torch.device) -> "Scoring":
        """``judge`` frozen, with V of the reference prompts segmented as the scores will be. V is computed at
        every start, never read from a cache: a resumed run or evaluation then does exactly what an
        uninterrupted one did."""
        judge.model.requires_grad_(False).eval()
        reference = direction_from_prompts(judge, default_reference_prompts(), split_mode, long_segments)
        return cls(judge=judge, source=source, reference_v=reference.to(device))


@dataclass
class RunParts:
    """Everything :func:`load_parts` built for one run."""

    data: TrainingData
    base: BaseParts
    lora: LoRAUNet
    text: StepEncoder
    scoring: Scoring
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    t5: object | None = None  # the LongSD T5 branch (longalign_core.t5_branch.T5Branch)

    @property
    def phases(self) -> PhaseTimer:
        """The step's phase timer (off unless a dry run or a benchmark measures a step); the UNet's calls are
        timed in it too."""
        return self.lora.phases

    @property
    def t5_adapter(self) -> torch.nn.Module | None:
        """The T5 branch's adapter, unwrapped (accelerate wraps it when it trains)."""
        if self.t5 is None:
            return None
        from accelerate.utils import extract_model_from_parallel

        return extract_model_from_parallel(self.t5.adapter)


def load_parts(cfg, acc, data: TrainingData, judge: PreferenceModel | None = None) -> tuple[RunParts, object]:
    """Load the models ``cfg`` names onto ``acc``'s device, attach the LoRA, build the optimizer, the text side and
    the judge (``judge`` if given, else ``--reward-model``), and compute V. Returns the parts and ``cfg`` with the
    model's own resolution filled in; the align stage's ``data`` is bucketed at that resolution.

    The order matters: the main process loads first (it writes the embedded models once); the seed is set right
    before the LoRA's initial weights; accelerate prepares the UNet with its optimizer; the text embeddings are
    cached (``--cache-text-embeddings``) before the preference model loads, so the CLIP encoders' memory is free
    for it, and its text tower goes once V is built."""
    device, dtype = acc.device, _weight_dtype(cfg)
    with acc.main_process_first():
        loaded = load_base_model(cfg.model, cfg.seed, dtype)
        source = reward_model_source(cfg.reward_model, cfg.seed) if judge is None else judge.name
    if loaded.is_sdxl and cfg.t5_model:
        raise BadConfigError("--t5-model/--t5-adapter: the LongSD T5 branch is made for SD1.5's 768-channel "
                             f"conditioning, and {loaded.source} is an SDXL model (2048 channels); drop the T5 "
                             "options for SDXL")
    if cfg.resolution is None:  # the model's own: SD1.5 512, SDXL 1024 (the embedded ones 64)
        cfg = dataclasses.replace(cfg, resolution=int(loaded.unet.config.sample_size) * 8)
    if cfg.stage == "align":
        data.align.cfg = cfg
        data.align.bucket(cfg.resolution, cfg.buckets)
    lora, optimizer, lr_scheduler, t5 = _attach_and_prepare(cfg, acc, loaded.unet, dtype)
    base = BaseParts.from_loaded(loaded, device, dtype)
    del loaded  # the parts hold what is needed
    if device.type == "cuda":  # NHWC convolutions: faster with cuDNN (the trainer's; the evaluation keeps NCHW)
        base.vae.to(memory_format=torch.channels_last)
    if cfg.gradient_checkpointing:  # the decode is backpropagated too: keep its activations small
        base.vae.enable_gradient_checkpointing()
    if base.prediction_type not in ("epsilon", "v_prediction"):
        raise BadModelFileError(f"{base.source}: its scheduler predicts {base.prediction_type!r}; the trainer "
                                f"supports epsilon and v_prediction models")
    text = StepEncoder(cfg, base.segment_encoder(), t5, dtype, device, base.is_sdxl)
    if cfg.cache_text_embeddings:  # before the preference model loads: the encoders' memory is free for it
        cache_text_embeddings(text, base, data, acc.is_main_process)
    if judge is None:
        judge = load_preference_model(source, cfg.reward_model_kind, device=device, dtype=dtype)
    scoring = Scoring.of(judge.to(device, dtype), source, cfg.split_mode, cfg.long_segments, device)
    if cfg.stage == "reward":
        per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps * acc.num_processes
        mode, warning = resolve_direction(cfg.reward_direction, per_step)
        if warning and acc.is_main_process:
            print(warning, flush=True)
        scoring.reward_v = RewardDirection.build(mode, scoring.judge, cfg, data.prompts, acc.num_processes,
                                                 scoring.reference_v, device)
    if cfg.cache_text_embeddings:  # V is built: the preference model's text tower is needed no more
        texts = (data.training_texts() if cfg.stage == "reward" else []) + list(data.validation_prompts)
        pin_reward_texts(scoring.judge, texts, cfg, acc.is_main_process)
    parts = RunParts(data=data, base=base, lora=lora, text=text, scoring=scoring, optimizer=optimizer,
                     lr_scheduler=lr_scheduler, t5=t5)
    return parts, cfg


def _weight_dtype(cfg) -> torch.dtype:
    from longalign_core.dtypes import DTYPES

    return DTYPES.get(cfg.mixed_precision, torch.float32)  # "no" = fp32


def _attach_and_prepare(cfg, acc, unet, dtype):
    """Merge ``--init-lora``, attach the LoRA (and its output dropout), load the T5 branch, build AdamW and the
    warm-up schedule and let accelerate prepare them with the UNet (and a trained T5 adapter)."""
    device = acc.device
    unet.requires_grad_(False)
    targets = lora_targets(unet)
    for path in cfg.init_lora:  # e.g. the stage-1 LoRA under the reward stage, merged and frozen
        merge_lora(unet, load_lora(path, targets))
    from accelerate.utils import set_seed

    set_seed(cfg.seed)  # right before the LoRA's initial weights; every later draw is seeded per step
    params = attach_lora(unet, targets, cfg.lora_rank, dtype)
    if cfg.lora_dropout:  # hooks that live as long as the UNet
        add_lora_output_dropout(unet, targets, cfg.lora_dropout)
    if cfg.gradient_checkpointing and cfg.stage == "align":  # per block: a backward holds one block at a time
        unet.enable_gradient_checkpointing()  # (reward stage: only while a gradient step is recomputed)
    if device.type == "cuda":  # NHWC convolutions: faster with cuDNN for the UNet (and the VAE, load_parts)
        unet.to(memory_format=torch.channels_last)
    # The compiled UNet shares the (LoRA) parameters: optimizer updates reach it.
    compiled = torch.compile(unet) if cfg.compile_unet else None
    t5 = None
    if cfg.t5_model:
        from longalign_core.t5_branch import load_t5_branch  # imports diffusers: only when used

        t5 = load_t5_branch(cfg.t5_model, cfg.t5_adapter, device=device, dtype=dtype)
    adapter = None
    if cfg.train_t5_adapter:
        adapter = t5.adapter.float().train().requires_grad_(True)
        params += list(adapter.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
                                  **({"fused": True} if device.type == "cuda" else {}))
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler("constant_with_warmup", optimizer,
                                 num_warmup_steps=cfg.lr_warmup_steps * acc.num_processes)
    if adapter is not None:
        prepared, t5.adapter, optimizer, lr_scheduler = acc.prepare(unet, adapter, optimizer, lr_scheduler)
    else:
        prepared, optimizer, lr_scheduler = acc.prepare(unet, optimizer, lr_scheduler)
    ckpt.save_only_what_trains(acc, unet)
    lora = LoRAUNet(unet=prepared, module=unet, params=params, targets=targets, rank=cfg.lora_rank,
                    phases=PhaseTimer(device, enabled=False), compiled=compiled)
    return lora, optimizer, lr_scheduler, t5
