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

import csv
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from longalign_core.clip_text import CLIPSegmentEncoder
from longalign_core.denscore import (
    default_reference_prompts,
    direction_from_prompts,
    prompts_digest,
    segment_score,
)
from longalign_core.errors import BadConfigError, BadInputError, BadModelFileError, run_cli
from longalign_core.lora import load_lora, lora_targets, merge_lora, save_kohya
from longalign_core.preference import load_preference_model
from longalign_core.dtypes import DTYPES
from longalign_core.segment_encoding import TokenBudgetError

from .config import EMBEDDED_MODELS, EMBEDDED_PROFILE, TrainConfig  # noqa: F401  (EMBEDDED_PROFILE: re-exported)
from .models import embedded_reward_dir, load_base_model, load_prompts
from .sampling import (
    UNetConditioning,
    ddim_scheduler,
    decode,
    grad_step_indices,
    sample_truncated,
    sdxl_time_ids,
    vae_dtype,
)

log = logging.getLogger("LongAlign")

LORA_FILE = "longalign_lora.safetensors"

#: Columns of ``train_log.csv`` and how each is combined over processes.
TRAIN_STATS = {
    "loss": "mean", "reward": "mean", "reward_std": "first", "reweighted": "mean", "text_relevant": "mean",
    "text_irrelevant": "mean", "grad_offset": "first", "prompts_cut": "sum", "tokens_lost": "sum",
    "t5_tokens_lost": "sum", "reward_tokens_lost": "sum", "cond_length": "max",
}
TRAIN_COLUMNS = ["step", *TRAIN_STATS, "prompts_cut_total", "tokens_lost_total", "lr", "seconds"]
VALIDATION_COLUMNS = ["step", "denscore", "text_relevant", "text_irrelevant", "prompts_cut", "tokens_lost"]


class NonFiniteLossError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------------------
# Small pieces


def step_seed(seed: int, step: int, process: int) -> int:
    """The seed of one (step, process): every random draw of the step derives from it."""
    return ((seed * 1_000_003 + step) * 1_009 + process) % (2**63 - 1)


def step_generator(seed: int, step: int, process: int, device="cpu") -> torch.Generator:
    """Explicit draws of a step (noise, DDIM offset, crop, caption dropout) come from (seed, step, process): a
    resumed run repeats them exactly."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, process))


def seed_global_rng(seed: int, step: int, process: int) -> None:
    """Seed torch's global generators (CPU and CUDA) for the step: the implicit draws — the LoRA dropout masks
    and the T5 adapter's dropout — then also derive from (seed, step, process). Gradient checkpointing replays
    them exactly (it saves and restores the RNG state)."""
    torch.manual_seed(step_seed(seed, step, process) ^ 0x5EED)


def batch_prompts(prompts: list[str], seed: int, step: int, micro: int, batch: int, process: int,
                  processes: int, accumulation: int) -> list[str]:
    """The prompts of one micro-batch: a seeded permutation per epoch, walked in order across processes."""
    start = ((step * accumulation + micro) * processes + process) * batch
    out = []
    for k in range(start, start + batch):
        epoch, pos = divmod(k, len(prompts))
        order = np.random.default_rng([seed, epoch]).permutation(len(prompts))
        out.append(prompts[order[pos]])
    return out


def hold_out(n_items: int, count: int, seed: int) -> list[int]:
    """Indices of ``count`` held-out items, drawn with the seed (not the first N: files are often sorted)."""
    rng = np.random.default_rng([seed, 0x7A11D])
    return sorted(int(i) for i in rng.choice(n_items, size=count, replace=False))


def lora_pairs(unet, targets) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(up, down) per target from a peft-wrapped UNet, with the peft scale folded into ``up``."""
    modules = dict(unet.named_modules())
    pairs = {}
    for t in targets:
        layer = modules[t.path]
        up = layer.lora_B["default"].weight.detach().float().cpu()
        down = layer.lora_A["default"].weight.detach().float().cpu()
        pairs[t.path] = (up * float(layer.scaling["default"]), down)
    return pairs


def add_lora_output_dropout(unet, targets, p: float) -> list:
    """Dropout on the output of every LoRA branch, as the released LongAlign LoRA layers do
    (``W x + dropout(B A x)``); peft's own ``lora_dropout`` would drop the branch's input instead
    (``W x + B A dropout(x)``). Active while the module is in training mode. Returns the hook handles."""
    modules = dict(unet.named_modules())
    handles = []
    for t in targets:
        up = modules[t.path].lora_B["default"]
        handles.append(up.register_forward_hook(
            lambda module, args, out: F.dropout(out, p, training=module.training)))
    return handles


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (an interrupted save leaves only a ``.tmp`` folder, ignored here)."""
    folder = output_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
                  and not p.name.endswith(".tmp") and (p / "trainer_state.json").is_file())


class CSVLog:
    """Append-only CSV on the main process (flushed each row, so a killed run keeps its log)."""

    def __init__(self, path: Path, fields: list[str], enabled: bool):
        self.enabled, self.fields, self.path = enabled, fields, path
        if enabled and not path.exists():
            with path.open("w", newline="") as f:
                csv.DictWriter(f, fieldnames=fields).writeheader()

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))

    def keep_until(self, step: int) -> list[dict]:
        """Drop rows logged after ``step`` (a resumed run logs them again); returns the rows kept."""
        kept = [r for r in self.rows() if r.get("step") and float(r["step"]) <= step]
        if self.enabled:
            from longalign_core.io_utils import atomic_path

            with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(kept)
        return kept

    def write(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields).writerow({k: row.get(k, "") for k in self.fields})


@dataclass
class StepConditioning:
    """The conditioning of one step: ``cond`` ``(B, L, C)`` and, for CFG, ``uncond`` of the same length, with
    what overflow did (per step: prompts cut, tokens lost by the CLIP part and the T5 part). SDXL adds the pooled
    bigG vectors ``pooled`` / ``uncond_pooled`` ``(B, 1280)``."""

    cond: torch.Tensor
    uncond: torch.Tensor | None
    prompts_cut: int
    tokens_lost: int
    t5_tokens_lost: int
    pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None

    @property
    def stats(self) -> dict:
        return {"prompts_cut": self.prompts_cut, "tokens_lost": self.tokens_lost,
                "t5_tokens_lost": self.t5_tokens_lost, "cond_length": self.cond.shape[1]}


# ------------------------------------------------------------------------------------------------------------
# The run


class Trainer:
    """Holds the models and the accelerate state; :meth:`train` is the loop."""

    def __init__(self, cfg: TrainConfig):
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
        import importlib.util

        self.trackers = ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []
        # cpu=True on a machine without an accelerator lets accelerate pick up torchrun's processes (gloo).
        has_accelerator = has_gpu or torch.backends.mps.is_available()
        self.acc = Accelerator(cpu=not has_accelerator, mixed_precision=cfg.mixed_precision,
                               gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                               log_with=self.trackers or None,
                               project_config=ProjectConfiguration(project_dir=str(self.out),
                                                                   logging_dir=str(self.out / "logs")))
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()
        self.weight_dtype = DTYPES.get(cfg.mixed_precision, torch.float32)  # "no" = fp32
        self.totals = {"prompts_cut": 0, "tokens_lost": 0}
        self._load_models()
        if self.acc.is_main_process:  # after loading: the resolution default comes from the model
            self.cfg.save(self.out / "config.json")

    # -- models -----------------------------------------------------------------------------------------------
    def _load_models(self) -> None:
        from peft import LoraConfig

        cfg, device, dtype = self.cfg, self.acc.device, self.weight_dtype
        # Data first: a bad prompts file should fail before minutes of model loading.
        self._load_data()
        # The main process first: it creates the embedded models once (saving under torch.distributed is
        # rank-aware in transformers, so other ranks must not write them), the others then read them.
        with self.acc.main_process_first():
            base = load_base_model(cfg.model, cfg.seed)
            reward_path = cfg.reward_model or str(embedded_reward_dir(cfg.seed))
        self.base_source = base.source
        self.is_sdxl = base.is_sdxl
        if self.is_sdxl and cfg.t5_model:
            raise BadConfigError("--t5-model/--t5-adapter: the LongSD T5 branch is made for SD1.5's 768-channel "
                                 f"conditioning, and {base.source} is an SDXL model (2048 channels); drop the T5 "
                                 "options for SDXL")
        unet = base.unet
        if cfg.resolution is None:  # the model's own: SD1.5 512, SDXL 1024 (the embedded ones 64)
            self.cfg = cfg = dataclasses.replace(cfg, resolution=int(unet.config.sample_size) * 8)
        unet.requires_grad_(False)
        self.targets = lora_targets(unet)
        for path in cfg.init_lora:  # e.g. the stage-1 LoRA under the reward stage, merged and frozen
            merge_lora(unet, load_lora(path, self.targets))
        from accelerate.utils import set_seed

        set_seed(cfg.seed)  # right before the LoRA's initial weights; every later draw is seeded per step
        unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                    lora_dropout=0.0, target_modules=[t.path for t in self.targets]))
        # Precision: LoRA master weights (and AdamW state) fp32; the frozen base weights in the training dtype.
        for p in unet.parameters():
            p.data = p.data.float() if p.requires_grad else p.data.to(dtype)
        self.dropout_hooks = add_lora_output_dropout(unet, self.targets, cfg.lora_dropout) if cfg.lora_dropout else []
        if cfg.stage == "align" and cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if device.type == "cuda":  # NHWC convolutions: faster with cuDNN for the UNet and the VAE
            unet.to(memory_format=torch.channels_last)
            base.vae.to(memory_format=torch.channels_last)
        # The compiled UNet shares the (LoRA) parameters: optimizer updates reach it.
        self.compiled_unet = torch.compile(unet) if cfg.compile_unet else None
        self.t5 = None
        if cfg.t5_model:
            from longalign_core.t5_branch import load_t5_branch  # imports diffusers: only when used

            self.t5 = load_t5_branch(cfg.t5_model, cfg.t5_adapter, device=device, dtype=dtype)
        self.params = [p for p in unet.parameters() if p.requires_grad]
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
        # SDXL's VAE stays fp32 in an fp16 run (it overflows to NaN in fp16), as diffusers does
        self.vae = base.vae.to(device, dtype=vae_dtype(dtype, base.vae.config)).requires_grad_(False).eval()
        if cfg.gradient_checkpointing:  # the decode is backpropagated too: keep its activations small
            self.vae.enable_gradient_checkpointing()
        self.text_encoder = base.text_encoder.to(device, dtype=dtype).requires_grad_(False).eval()
        self.noise_scheduler = base.noise_scheduler
        # ε or v: the reward stage's DDIM steps read it from the scheduler config, the align stage's target too
        self.prediction_type = self.noise_scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise BadModelFileError(f"{base.source}: its scheduler predicts {self.prediction_type!r}; the trainer "
                                    f"supports epsilon and v_prediction models")
        if self.is_sdxl:  # both text encoders, pooled bigG from the first segment (docs/method.md §1)
            from longalign_core.sdxl_text import SDXLSegmentEncoder

            self.text_encoder_2 = base.text_encoder_2.to(device, dtype=dtype).requires_grad_(False).eval()
            self.encoder = SDXLSegmentEncoder(base.tokenizer, self.text_encoder, base.tokenizer_2, self.text_encoder_2)
        else:
            self.encoder = CLIPSegmentEncoder(base.tokenizer, self.text_encoder)
        self.reward = load_preference_model(reward_path, cfg.reward_model_kind, device=device, dtype=dtype)
        self.reward.model.requires_grad_(False).eval()
        self.reward_source = reward_path
        reference = default_reference_prompts()
        self.reference_direction = direction_from_prompts(
            self.reward, reference, split_mode=cfg.split_mode,
            cache_file=self.out / f"reference_direction-{cfg.split_mode}-{prompts_digest(reference)}.safetensors"
            if self.acc.is_main_process else None).to(device)

    def _load_data(self) -> None:
        """Training prompts (reward) or dataset rows (align), and the held-out validation prompts."""
        cfg = self.cfg
        spec = cfg.validation_prompts
        if cfg.stage == "reward":
            pool = load_prompts(cfg.prompts, cfg.caption_column)
            source = cfg.prompts or "the built-in prompts"
        else:
            self.align_data = self._align_dataset()
            pool = self.align_captions
            source = cfg.prompts
        if isinstance(spec, int):
            if spec >= len(pool):
                raise BadConfigError(f"--validation-prompts {spec} would hold out every one of the {len(pool)} "
                                     f"training prompts of {source}: lower it, or give a validation prompts file")
            held = set(hold_out(len(pool), spec, cfg.seed)) if spec else set()
            self.validation_prompts = [pool[i] for i in sorted(held)]
            train_rows = [i for i in range(len(pool)) if i not in held]
        else:
            self.validation_prompts = load_prompts(spec)
            val = set(self.validation_prompts)
            train_rows = [i for i, p in enumerate(pool) if p not in val]
            if not train_rows:
                raise BadConfigError(f"every training prompt of {source} is also in --validation-prompts {spec}")
        if cfg.stage == "reward":
            self.prompts = [pool[i] for i in train_rows]
        else:
            self.prompts = None
            self.align_rows = train_rows

    # -- conditioning -----------------------------------------------------------------------------------------
    def encode_step(self, prompts: list[str], with_uncond: bool = True) -> StepConditioning:
        """Segment-level conditioning of a step's prompts (+ the T5 branch) and, with ``with_uncond``, the
        empty prompt's for CFG — encoded together, so every row has one common length: the budget (truncate,
        error) or the step's longest prompt rounded up to a multiple of the budget (extend); the T5 part is
        always ``T5_MAX_LENGTH`` tokens after it."""
        cfg, n = self.cfg, len(prompts)
        texts = list(prompts) + ([""] * n if with_uncond else [])
        with torch.no_grad():
            try:
                enc = self.encoder.encode(texts, budget=cfg.token_budget, overflow=cfg.overflow,
                                          split_mode=cfg.split_mode, long_segments=cfg.long_segments)
            except TokenBudgetError as err:  # the core's check, in this CLI's option names
                raise BadInputError(
                    f"a prompt needs {err.needed} tokens but --token-budget is {cfg.token_budget} and --overflow is "
                    f"error: use --overflow truncate (the release) or extend, raise --token-budget, or shorten it "
                    f"in {cfg.prompts or 'the prompts'}. The prompt: {texts[err.prompt_index][:120]!r}…") from None
            states = self.t5.t5_states(texts) if self.t5 is not None else None
        cond = enc.cond
        t5_lost = 0
        if states is not None:  # the adapter keeps its graph when it is being trained
            from longalign_core.t5_branch import combine_conditioning

            with torch.set_grad_enabled(cfg.train_t5_adapter and torch.is_grad_enabled()):
                cond = combine_conditioning(cond, self.t5.adapt(states))
            t5_lost = sum(max(0, self.t5.count_tokens(p) - self.t5.max_length) for p in prompts)
        cond = cond.to(self.weight_dtype)
        pooled = enc.pooled.to(self.weight_dtype) if self.is_sdxl else None
        reports = enc.reports[:n]
        return StepConditioning(cond[:n], cond[n:] if with_uncond else None,
                                prompts_cut=sum(1 for r in reports if not r.lossless),
                                tokens_lost=sum(r.dropped + r.truncated for r in reports), t5_tokens_lost=t5_lost,
                                pooled=None if pooled is None else pooled[:n],
                                uncond_pooled=None if pooled is None or not with_uncond else pooled[n:])

    def unet_conditioning(self, step_cond: StepConditioning, time_ids: torch.Tensor | None = None
                          ) -> tuple[UNetConditioning, UNetConditioning | None]:
        """The UNet's conditioning of the step's rows and (for CFG) of the empty prompt. SDXL adds the pooled
        vectors and ``time_ids`` ``(B, 6)``: by default those of a generated image, ``(res, res, 0, 0, res,
        res)``, for the prompts and the empty prompt alike (diffusers' pipeline does the same)."""
        if not self.is_sdxl:
            uncond = None if step_cond.uncond is None else UNetConditioning(step_cond.uncond)
            return UNetConditioning(step_cond.cond), uncond
        n, res = step_cond.cond.shape[0], self.cfg.resolution
        if time_ids is None:
            time_ids = sdxl_time_ids((res, res), (0, 0), (res, res)).expand(n, 6)
        time_ids = time_ids.to(self.acc.device, self.weight_dtype)
        cond = UNetConditioning(step_cond.cond, step_cond.pooled, time_ids)
        uncond = None if step_cond.uncond is None else \
            UNetConditioning(step_cond.uncond, step_cond.uncond_pooled, time_ids)
        return cond, uncond

    def conditioning(self, prompts: list[str]) -> torch.Tensor:
        """The conditioning ``(B, L, C)`` of ``prompts`` alone (see :meth:`encode_step`)."""
        return self.encode_step(prompts, with_uncond=False).cond

    def unet_eps(self, x, t, conditioning: UNetConditioning):
        """The UNet's prediction (ε, or v); the no-grad sampling steps go through the compiled UNet with
        ``--compile-unet``."""
        unet = self.compiled_unet if self.compiled_unet is not None and not torch.is_grad_enabled() else self.unet
        return unet(x, t, **conditioning.unet_kwargs()).sample

    # -- one step ---------------------------------------------------------------------------------------------
    def reward_loss(self, prompts: list[str], gen: torch.Generator, dump: dict | None = None):
        """Loss ``0.5 · (1 − mean S_ω)`` of one micro-batch (docs/method.md §5), ``S_ω = relevant + ω · irrelevant`` with V
        from the step's prompts gathered over all processes, and its statistics."""
        cfg, device = self.cfg, self.acc.device
        step_cond = self.encode_step(prompts, with_uncond=True)
        cond, uncond = self.unet_conditioning(step_cond)
        side = cfg.resolution // 8
        noise = torch.randn(len(prompts), 4, side, side, generator=gen).to(device, self.weight_dtype)
        scheduler = ddim_scheduler(self.noise_scheduler, cfg.sample_steps)
        every = cfg.sample_steps // cfg.sample_grad_steps
        offset = int(torch.randint(0, every, (1,), generator=gen))
        grad_idx = grad_step_indices(cfg.sample_steps, cfg.sample_grad_steps, offset)
        with self.acc.autocast():
            x0 = sample_truncated(self.unet_eps, scheduler, noise, cond, uncond, cfg.sample_guidance, grad_idx,
                                  use_checkpoint=cfg.gradient_checkpointing)
            images = decode(self.vae, x0)
        result = segment_score(self.reward, images, prompts, direction=None, omega=cfg.reward_omega,
                               crop=cfg.reward_crop, split_mode=cfg.split_mode, long_segments=cfg.long_segments,
                               generator=gen, gather=self.acc.gather)
        parts = result.parts
        s_omega = parts.reweighted
        loss = 0.5 * (1 - s_omega.mean())
        if dump is not None:
            t_bar = torch.stack([f.mean for f in result.prompts])
            dump.update(t_bar_mean=t_bar.mean(0).detach().cpu(), direction=result.direction.detach().cpu(),
                        cond_length=step_cond.cond.shape[1], uncond_length=step_cond.uncond.shape[1])
        all_scores = self.acc.gather(parts.score.detach())  # the std over every process's images
        stats = {"reward": float(parts.score.detach().mean()),
                 "reward_std": float(all_scores.std()) if all_scores.numel() > 1 else 0.0,
                 "reweighted": float(s_omega.detach().mean()), "text_relevant": float(parts.relevant.detach().mean()),
                 "text_irrelevant": float(parts.irrelevant.detach().mean()), "grad_offset": offset,
                 "reward_tokens_lost": sum(sum(f.truncated) for f in result.prompts), **step_cond.stats}
        return loss, stats

    def align_loss(self, batch, gen: torch.Generator):
        """Supervised diffusion loss (MSE to ε, or to v for v-prediction models) on (image, caption) pairs with the
        segment encoding and caption dropout."""
        cfg, device = self.cfg, self.acc.device
        images, captions, time_ids = batch
        keep = torch.rand(len(captions), generator=gen) >= cfg.caption_dropout
        captions = [c if k else "" for c, k in zip(captions, keep.tolist())]
        with torch.no_grad(), torch.autocast(device.type, enabled=False):  # the VAE in its own dtype
            latents = self.vae.encode(images.to(device, self.vae.dtype) * 2 - 1).latent_dist.sample(
                generator=gen).to(self.weight_dtype) * self.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                          generator=gen).to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        step_cond = self.encode_step(captions, with_uncond=False)
        cond, _ = self.unet_conditioning(step_cond, time_ids)
        with self.acc.autocast():
            pred = self.unet_eps(noisy, t, cond)
        # the model's own target: ε, or v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x0 for v-prediction models (NoobAI-XL V-Pred)
        target = noise if self.prediction_type == "epsilon" else \
            self.noise_scheduler.get_velocity(latents, noise, t)
        loss = F.mse_loss(pred.float(), target.float())
        return loss, step_cond.stats

    # -- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        """Full training state, written to a ``.tmp`` folder and renamed when complete."""
        folder = self.out / "checkpoints"
        final = folder / f"checkpoint-{step:06d}"
        tmp = folder / f"checkpoint-{step:06d}.tmp"
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "seed": self.cfg.seed,
                                                                "totals": self.totals}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in checkpoints(self.out)[: -self.cfg.checkpoints_keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def load_checkpoint(self, which: str) -> int:
        """Restore the state of a checkpoint (``latest`` or a folder); returns its step. A corrupt or incomplete
        checkpoint is a :class:`BadModelFileError` that names it and the previous one."""
        found = checkpoints(self.out)
        if which == "latest":
            if not found:
                raise BadConfigError(f"--resume latest: no complete checkpoint in {self.out / 'checkpoints'}; "
                                     f"start without --resume")
            path = found[-1]
        else:
            path = Path(which)
            if not (path / "trainer_state.json").is_file():
                raise BadConfigError(f"--resume {path}: not a complete LongAlign checkpoint (no trainer_state.json)"
                                     f"; complete ones: {[str(p) for p in found] or 'none'}")
        try:
            state = json.loads((path / "trainer_state.json").read_text())
            step = int(state["step"])
            self.acc.load_state(str(path))
        except Exception as exc:  # noqa: BLE001 — torch, safetensors and accelerate raise many kinds for a bad file
            earlier = [p for p in found if p.name < path.name]
            fix = (f"resume from the previous one with --resume {earlier[-1]}" if earlier
                   else "there is no earlier checkpoint: start again without --resume")
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise BadModelFileError(f"checkpoint {path} could not be loaded ({type(exc).__name__}: {detail}); it is "
                                    f"corrupt or incomplete: {fix}, or delete {path}") from None
        self.totals = {**self.totals, **state.get("totals", {})}
        self.acc.print(f"resumed from {path} at step {step}")
        return step

    # -- validation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, step: int, vlog: CSVLog) -> dict | None:
        """Sample the held-out prompts from fixed noise and score them (V from the reference prompt set). Runs on
        the main process only, on the unwrapped UNet in eval mode (no LoRA dropout)."""
        cfg, acc = self.cfg, self.acc
        prompts = self.validation_prompts
        if not prompts or not acc.is_main_process:
            return None
        unet = acc.unwrap_model(self.unet)
        unet.eval()
        if self.t5 is not None:
            self.t5.adapter.eval()
        try:
            gen = step_generator(cfg.seed, 10**6, 0)  # the same noise at every validation
            step_cond = self.encode_step(prompts, with_uncond=True)
            cond, uncond = self.unet_conditioning(step_cond)
            side = cfg.resolution // 8
            noise = torch.randn(len(prompts), 4, side, side, generator=gen).to(acc.device, self.weight_dtype)
            scheduler = ddim_scheduler(self.noise_scheduler, cfg.validation_steps)
            eps = lambda x, t, c: unet(x, t, **c.unet_kwargs()).sample  # noqa: E731
            with acc.autocast():
                x0 = sample_truncated(eps, scheduler, noise, cond, uncond, cfg.sample_guidance, [])
                images = decode(self.vae, x0)
            result = segment_score(self.reward, images, prompts, direction=self.reference_direction, crop="center",
                                   split_mode=cfg.split_mode, long_segments=cfg.long_segments)
        finally:
            unet.train()
            if cfg.train_t5_adapter:
                self.t5.adapter.train()
        p = result.parts
        row = {"step": step, "denscore": float(p.score.mean()), "text_relevant": float(p.relevant.mean()),
               "text_irrelevant": float(p.irrelevant.mean()), "prompts_cut": step_cond.prompts_cut,
               "tokens_lost": step_cond.tokens_lost}
        from PIL import Image

        grid = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
        (self.out / "validation").mkdir(exist_ok=True)
        Image.fromarray(np.concatenate(list(grid), axis=1)).save(self.out / "validation" / f"step-{step:06d}.png")
        vlog.write(row)
        acc.log({f"validation/{k}": v for k, v in row.items() if k != "step"}, step=step)
        return row

    def _validate_everywhere(self, step: int, vlog: CSVLog) -> None:
        self.validate(step, vlog)
        self.acc.wait_for_everyone()

    # -- loop -------------------------------------------------------------------------------------------------
    def _reduce(self, stats: dict) -> dict:
        """Combine the step's statistics over all processes (mean / sum / max / rank 0's, per TRAIN_STATS)."""
        keys = [k for k in TRAIN_STATS if k in stats]
        local = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=self.acc.device)
        every = self.acc.gather(local[None]).reshape(-1, len(keys)).cpu()
        how = {"mean": lambda c: c.mean(), "sum": lambda c: c.sum(), "max": lambda c: c.max(),
               "first": lambda c: c[0]}
        return {k: float(how[TRAIN_STATS[k]](every[:, i])) for i, k in enumerate(keys)}

    def optimizer_step(self, step: int) -> dict[str, float]:
        """One optimizer step (all its micro-batches): loss, backward, clip, AdamW, LR schedule. Returns this
        process's statistics summed over the micro-batches."""
        cfg, acc = self.cfg, self.acc
        sums: dict[str, float] = {}
        for micro in range(cfg.gradient_accumulation_steps):
            draw = step * cfg.gradient_accumulation_steps + micro
            gen = step_generator(cfg.seed, draw, acc.process_index)
            seed_global_rng(cfg.seed, draw, acc.process_index)
            dump = {} if cfg.dump_debug else None
            with acc.accumulate(self.unet):
                if cfg.stage == "reward":
                    prompts = batch_prompts(self.prompts, cfg.seed, step, micro, cfg.train_batch_size,
                                            acc.process_index, acc.num_processes, cfg.gradient_accumulation_steps)
                    loss, stats = self.reward_loss(prompts, gen, dump)
                else:
                    loss, stats = self.align_loss(self.align_data(step, micro, gen), gen)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"the loss became {float(loss.detach())} at step {step}: stopping. Lower --learning-rate, use "
                        f"--mixed-precision no (or bf16 instead of fp16), or check the models; the last good "
                        f"checkpoint is in {self.out / 'checkpoints'}")
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            for k, v in {"loss": float(loss.detach()), **stats}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if dump is not None:
                self._dump(step, dump)
        return sums

    def train(self) -> Path:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        main = acc.is_main_process
        start = self.load_checkpoint(cfg.resume) if cfg.resume else 0
        if self.trackers:  # a resumed run hides the events it is about to log again
            acc.init_trackers("longalign", config={k: v for k, v in cfg.to_dict().items()
                                                   if isinstance(v, (int, float, str, bool))},
                              init_kwargs={"tensorboard": {"purge_step": start + 1}} if start else {})
        tlog = CSVLog(self.out / "train_log.csv", TRAIN_COLUMNS, main)
        vlog = CSVLog(self.out / "validation.csv", VALIDATION_COLUMNS, main)
        if start:
            tlog.keep_until(start)
            validated = {float(r["step"]) for r in vlog.keep_until(start)}
        acc.wait_for_everyone()
        if main:
            n_prompts = len(self.prompts) if self.prompts is not None else len(self.align_rows)
            print(f"***** Running training ({cfg.stage} stage) *****\n"
                  f"  base model = {self.base_source} ({'SDXL' if self.is_sdxl else 'SD1.x'}, "
                  f"{self.prediction_type})\n"
                  f"  reward model = {self.reward_source}\n"
                  f"  training prompts = {n_prompts}, held-out validation prompts = {len(self.validation_prompts)}\n"
                  f"  processes = {acc.num_processes}, batch per process = "
                  f"{cfg.train_batch_size}, accumulation = {cfg.gradient_accumulation_steps}\n"
                  f"  steps = {start} -> {cfg.train_steps}, LoRA rank = {cfg.lora_rank} on {len(self.targets)} "
                  f"layers (dropout {cfg.lora_dropout} on the branch output), trainable parameters = "
                  f"{sum(p.numel() for p in self.params):,} (fp32), frozen weights {cfg.mixed_precision}\n"
                  f"  text: budget {cfg.token_budget}, overflow {cfg.overflow}, split {cfg.split_mode}, long "
                  f"segments {cfg.long_segments}{', + T5 branch' if self.t5 is not None else ''}\n"
                  f"  DDIM {cfg.sample_steps} steps, gradients at {cfg.sample_grad_steps}, CFG "
                  f"{cfg.sample_guidance}, ω = {cfg.reward_omega}, {cfg.resolution}px", flush=True)
        due = start == 0 or (cfg.validation_every and start % cfg.validation_every == 0 and start not in validated)
        if due:  # a run killed between a checkpoint and its validation validates on resume
            self._validate_everywhere(start, vlog)
        self.unet.train()
        bar = tqdm(range(start, cfg.train_steps), initial=start, total=cfg.train_steps, disable=not main,
                   desc="training")
        for step in bar:
            t0 = time.time()
            sums = self.optimizer_step(step)
            done = step + 1
            micro_n = cfg.gradient_accumulation_steps
            local = {k: v if TRAIN_STATS.get(k) == "sum" else v / micro_n for k, v in sums.items()}
            row = {"step": done, **self._reduce(local)}
            for k in self.totals:
                self.totals[k] += int(row.get(k, 0))
            row.update(prompts_cut_total=self.totals["prompts_cut"], tokens_lost_total=self.totals["tokens_lost"],
                       lr=self.lr_scheduler.get_last_lr()[0], seconds=round(time.time() - t0, 3))
            if done % cfg.log_every == 0 and main:
                tlog.write(row)
                acc.log({k: v for k, v in row.items() if k != "step"}, step=done)
                bar.set_postfix(loss=f"{row['loss']:.4f}", reward=f"{row.get('reward', 0):.4f}")
            if done % cfg.checkpoint_every == 0 and done < cfg.train_steps:
                self.save_checkpoint(done)
            if cfg.validation_every and done % cfg.validation_every == 0 and done < cfg.train_steps:
                self._validate_everywhere(done, vlog)
                self.unet.train()
        self._validate_everywhere(cfg.train_steps, vlog)
        lora_file = self.save_outputs()
        acc.end_training()
        return lora_file

    def _dump(self, step: int, dump: dict) -> None:
        folder = self.out / "debug"
        folder.mkdir(exist_ok=True)
        checksum = sum(float(p.detach().double().sum()) for p in self.params)
        torch.save({**dump, "lora_checksum": checksum, "step": step},
                   folder / f"rank{self.acc.process_index}-step{step:06d}.pt")

    def _align_dataset(self):
        """(images, captions) micro-batches from a ``datasets`` folder with an image and a caption column; sets
        ``align_captions`` (every row's caption, for the held-out split)."""
        import datasets

        cfg = self.cfg
        if not cfg.prompts or not Path(cfg.prompts).is_dir():
            raise BadConfigError("the align stage needs --prompts pointing at a local `datasets` folder "
                                 "(save_to_disk) with image and caption columns")
        ds = datasets.load_from_disk(cfg.prompts)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        for col, opt in ((cfg.image_column, "--image-column"), (cfg.caption_column, "--caption-column")):
            if col not in ds.column_names:
                raise BadInputError(f"{cfg.prompts} has no column {col!r} (columns: {ds.column_names}); set {opt}")
        captions = ds[cfg.caption_column]
        for i, c in enumerate(captions):
            if not isinstance(c, str):
                raise BadInputError(f"{cfg.prompts}: row {i} of column {cfg.caption_column!r} is "
                                    f"{type(c).__name__}, not a string caption")
        self.align_captions = [c.replace("\n\n", " ").strip() for c in captions]

        def get(step, micro, gen):
            from torchvision.transforms.v2 import functional as TF

            idx = [self.align_rows[int(i)] for i in torch.randint(0, len(self.align_rows), (cfg.train_batch_size,),
                                                                  generator=gen)]
            rows = ds.select(idx)
            images, time_ids = [], []
            for img in rows[cfg.image_column]:
                t = TF.to_dtype(TF.to_image(img.convert("RGB")), torch.float32, scale=True)
                original = tuple(t.shape[-2:])
                t = TF.resize(t, cfg.resolution, antialias=True)
                top, left = (round((n - cfg.resolution) / 2) for n in t.shape[-2:])  # the centre crop
                images.append(TF.crop(t, top, left, cfg.resolution, cfg.resolution))
                # SDXL's micro-conditioning: the image's real size and where the crop took it from
                time_ids.append(sdxl_time_ids(original, (top, left), (cfg.resolution, cfg.resolution)))
            return torch.stack(images), [self.align_captions[i] for i in idx], torch.stack(time_ids)

        return get

    # -- outputs ----------------------------------------------------------------------------------------------
    def save_outputs(self) -> Path:
        cfg, acc = self.cfg, self.acc
        acc.wait_for_everyone()
        lora_file = self.out / LORA_FILE
        if acc.is_main_process:
            unet = acc.unwrap_model(self.unet)
            pairs = lora_pairs(unet, self.targets)
            prompts_hash = prompts_digest(self.prompts) if self.prompts else ""
            save_kohya(pairs, lora_file, {
                "format": "kohya", "longalign": "trainer-lora", "base_model": self.base_source,
                "stage": cfg.stage, "rank": cfg.lora_rank, "ss_network_dim": cfg.lora_rank,
                "ss_network_alpha": cfg.lora_rank, "omega": cfg.reward_omega, "steps": cfg.train_steps,
                "prompts_sha256": prompts_hash, "reward_model": self.reward_source, "seed": cfg.seed,
                "overflow": cfg.overflow, "token_budget": cfg.token_budget, "split_mode": cfg.split_mode,
                "long_segments": cfg.long_segments, "lora_dropout": cfg.lora_dropout,
                "resolution": cfg.resolution, "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
                "ss_base_model_version": "sdxl_base_v1-0" if self.is_sdxl else "sd_v1"})
            if cfg.train_t5_adapter:
                acc.unwrap_model(self.t5.adapter).save_pretrained(self.out / "t5_adapter")
            if cfg.merge_checkpoint:
                merged = load_base_model(cfg.model, cfg.seed).unet
                for path in cfg.init_lora:
                    merge_lora(merged, load_lora(path, self.targets))
                merge_lora(merged, pairs)
                merged.save_pretrained(self.out / "unet_merged")
            from .report import write_report

            write_report(self.out)
            print(f"wrote {lora_file} ({len(pairs)} LoRA layers, kohya keys: loads in ComfyUI's LoraLoader and "
                  f"in LongAlign's Load LongSD LoRA) and {self.out / 'report.png'}", flush=True)
        acc.wait_for_everyone()
        return lora_file


def main(argv: list[str] | None = None) -> int:
    """Train; user mistakes raise :class:`~longalign_core.errors.LongAlignError` (see :func:`cli`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("accelerate", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = TrainConfig.from_args(argv)
    if cfg.model in (None, *EMBEDDED_MODELS):
        which = "SDXL" if cfg.model == "embedded-sdxl" else "SD1.5"
        print(f"{'No --model given' if cfg.model is None else '--model ' + cfg.model}: training the built-in tiny "
              f"random-weight {which}-shaped pipeline on the CPU demo profile (real file formats and code paths; "
              f"the pictures are noise). Pass --model for a real run.", flush=True)
    try:
        Trainer(cfg).train()
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``python -m trainer.finetune``: user mistakes print one paragraph (no traceback) and exit with code 2."""
    return run_cli(main, argv, prog="python -m trainer.finetune")


if __name__ == "__main__":
    sys.exit(cli())
