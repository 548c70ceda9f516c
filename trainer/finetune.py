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
come from ``--config run.toml``; the resolved config is written to ``<output_dir>/config.json``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from longalign_core.clip_text import CLIPSegmentEncoder
from longalign_core.denscore import (
    default_reference_prompts,
    direction_from_prompts,
    prompts_digest,
    segment_score,
)
from longalign_core.lora import load_lora, lora_targets, merge_lora, save_kohya
from longalign_core.preference import load_preference_model
from longalign_core.t5_branch import combine_conditioning, load_t5_branch

from .config import TrainConfig
from .models import EMBEDDED_RESOLUTION, embedded_reward_dir, load_base_model, load_prompts
from .sampling import ddim_scheduler, decode, grad_step_indices, sample_truncated

log = logging.getLogger("LongAlign")

#: Settings of the CPU demo run when no --model is given (fields the user did not set).
EMBEDDED_PROFILE = dict(train_steps=30, train_batch_size=2, resolution=EMBEDDED_RESOLUTION, sample_steps=20,
                        sample_grad_steps=5, learning_rate=2e-3, lr_warmup_steps=0, lora_rank=4,
                        validation_every=15, validation_prompts=2, validation_steps=10, checkpoint_every=15,
                        max_grad_norm=1.0)

LORA_FILE = "longalign_lora.safetensors"


class NonFiniteLossError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------------------
# Small pieces


def step_generator(seed: int, step: int, process: int, device="cpu") -> torch.Generator:
    """Every random draw of a step comes from (seed, step, process): a resumed run repeats it exactly."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 1_009 + process)


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

    def write(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields).writerow({k: row.get(k, "") for k in self.fields})


# ------------------------------------------------------------------------------------------------------------
# The run


class Trainer:
    """Holds the models and the accelerate state; :meth:`train` is the loop."""

    def __init__(self, cfg: TrainConfig):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        import importlib.util

        trackers = ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []
        # cpu=True on a machine without an accelerator lets accelerate pick up torchrun's processes (gloo).
        has_accelerator = torch.cuda.is_available() or torch.backends.mps.is_available()
        self.acc = Accelerator(cpu=not has_accelerator, mixed_precision=cfg.mixed_precision,
                               gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                               log_with=trackers or None,
                               project_config=ProjectConfiguration(project_dir=str(self.out),
                                                                   logging_dir=str(self.out / "logs")))
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.json")
        self.acc.wait_for_everyone()
        self.weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
        self._load_models()
        if trackers:
            self.acc.init_trackers("longalign", config={k: v for k, v in cfg.to_dict().items()
                                                        if isinstance(v, (int, float, str, bool))})

    # -- models -----------------------------------------------------------------------------------------------
    def _load_models(self) -> None:
        from peft import LoraConfig

        cfg, device = self.cfg, self.acc.device
        # The main process first: it creates the embedded models once (saving under torch.distributed is
        # rank-aware in transformers, so other ranks must not write them), the others then read them.
        with self.acc.main_process_first():
            base = load_base_model(cfg.model, cfg.seed)
            reward_path = cfg.reward_model or str(embedded_reward_dir(cfg.seed))
        self.base_source = base.source
        unet = base.unet
        unet.requires_grad_(False)
        self.targets = lora_targets(unet)
        for path in cfg.init_lora:  # e.g. the stage-1 LoRA under the reward stage, merged and frozen
            merge_lora(unet, load_lora(path, self.targets))
        from accelerate.utils import set_seed

        set_seed(cfg.seed)  # right before the LoRA's initial weights; every later draw uses step_generator
        unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                    target_modules=[t.path for t in self.targets]))
        if cfg.stage == "align" and cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.t5 = None
        if cfg.t5_model:
            self.t5 = load_t5_branch(cfg.t5_model, cfg.t5_adapter, device=device, dtype=self.weight_dtype)
        self.params = [p for p in unet.parameters() if p.requires_grad]
        adapter = None
        if cfg.train_t5_adapter:
            adapter = self.t5.adapter.float().train().requires_grad_(True)
            self.params += list(adapter.parameters())
        optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
        from diffusers.optimization import get_scheduler

        lr_scheduler = get_scheduler("constant_with_warmup", optimizer,
                                     num_warmup_steps=cfg.lr_warmup_steps * self.acc.num_processes)
        if adapter is not None:
            self.unet, self.t5.adapter, self.optimizer, self.lr_scheduler = self.acc.prepare(
                unet, adapter, optimizer, lr_scheduler)
        else:
            self.unet, self.optimizer, self.lr_scheduler = self.acc.prepare(unet, optimizer, lr_scheduler)
        self.vae = base.vae.to(device, dtype=self.weight_dtype).requires_grad_(False).eval()
        if cfg.gradient_checkpointing:  # the decode is backpropagated too: keep its activations small
            self.vae.enable_gradient_checkpointing()
        self.text_encoder = base.text_encoder.to(device, dtype=self.weight_dtype).requires_grad_(False).eval()
        self.noise_scheduler = base.noise_scheduler
        self.encoder = CLIPSegmentEncoder(base.tokenizer, self.text_encoder)
        self.reward = load_preference_model(reward_path, cfg.reward_model_kind, device=device)
        self.reward_source = reward_path
        self.prompts = load_prompts(cfg.prompts, cfg.caption_column) if cfg.stage == "reward" else None
        self.validation_prompts = (self.prompts or default_reference_prompts())[: cfg.validation_prompts]
        self.reference_direction = direction_from_prompts(
            self.reward, default_reference_prompts(),
            cache_file=self.out / f"reference_direction-{prompts_digest(default_reference_prompts())}.safetensors"
            if self.acc.is_main_process else None).to(device)

    def conditioning(self, prompts: list[str]) -> torch.Tensor:
        """Segment-level CLIP conditioning (+ the T5 branch when configured), ``(B, L, C)``."""
        with torch.no_grad():
            cond = self.encoder.encode(prompts, budget=self.cfg.token_budget).cond
            states = self.t5.t5_states(prompts) if self.t5 is not None else None
        if states is not None:  # the adapter keeps its graph when it is being trained
            with torch.set_grad_enabled(self.cfg.train_t5_adapter and torch.is_grad_enabled()):
                cond = combine_conditioning(cond, self.t5.adapt(states))
        return cond.to(self.weight_dtype)

    def unet_eps(self, x, t, context):
        return self.unet(x, t, encoder_hidden_states=context).sample

    # -- one step ---------------------------------------------------------------------------------------------
    def reward_loss(self, prompts: list[str], gen: torch.Generator, dump: dict | None = None):
        """Loss ``0.5 · (1 − mean S_ω)`` of one micro-batch (SPEC §5) and its statistics."""
        cfg, device = self.cfg, self.acc.device
        cond = self.conditioning(prompts)
        uncond = self.conditioning([""] * len(prompts))
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
                               crop=cfg.reward_crop, generator=gen, gather=self.acc.gather)
        s_omega = result.parts.reweighted
        loss = 0.5 * (1 - s_omega.mean())
        if dump is not None:
            t_bar = torch.stack([f.mean for f in result.prompts])
            dump.update(t_bar_mean=t_bar.mean(0).detach().cpu(), direction=result.direction.detach().cpu())
        parts = result.parts
        stats = {"reward": float(parts.score.detach().mean()),
                 "reward_std": float(parts.score.detach().std()) if len(prompts) > 1 else 0.0,
                 "reweighted": float(s_omega.detach().mean()), "text_relevant": float(parts.relevant.detach().mean()),
                 "text_irrelevant": float(parts.irrelevant.detach().mean()), "grad_offset": offset}
        return loss, stats

    def align_loss(self, batch, gen: torch.Generator):
        """Supervised ε-MSE on (image, caption) pairs with the segment encoding and caption dropout."""
        cfg, device = self.cfg, self.acc.device
        images, captions = batch
        keep = torch.rand(len(captions), generator=gen) >= cfg.caption_dropout
        captions = [c if k else "" for c, k in zip(captions, keep.tolist())]
        with torch.no_grad():
            latents = self.vae.encode(images.to(device, self.weight_dtype) * 2 - 1).latent_dist.sample(
                generator=gen) * self.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                          generator=gen).to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        with self.acc.autocast():
            eps = self.unet_eps(noisy, t, self.conditioning(captions))
        loss = torch.nn.functional.mse_loss(eps.float(), noise.float())
        return loss, {}

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
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "seed": self.cfg.seed}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in checkpoints(self.out)[: -self.cfg.checkpoints_keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def load_checkpoint(self, which: str) -> int:
        if which == "latest":
            found = checkpoints(self.out)
            if not found:
                raise FileNotFoundError(f"--resume latest: no complete checkpoint in {self.out / 'checkpoints'}")
            path = found[-1]
        else:
            path = Path(which)
            if not (path / "trainer_state.json").is_file():
                raise FileNotFoundError(f"{path} is not a complete LongAlign checkpoint (no trainer_state.json)")
        self.acc.load_state(str(path))
        step = json.loads((path / "trainer_state.json").read_text())["step"]
        self.acc.print(f"resumed from {path} at step {step}")
        return step

    # -- validation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, step: int, vlog: CSVLog) -> dict:
        cfg = self.cfg
        prompts = self.validation_prompts
        gen = step_generator(cfg.seed, 10**6, 0)  # the same noise at every validation
        cond, uncond = self.conditioning(prompts), self.conditioning([""] * len(prompts))
        side = cfg.resolution // 8
        noise = torch.randn(len(prompts), 4, side, side, generator=gen).to(self.acc.device, self.weight_dtype)
        scheduler = ddim_scheduler(self.noise_scheduler, cfg.validation_steps)
        with self.acc.autocast():
            x0 = sample_truncated(self.unet_eps, scheduler, noise, cond, uncond, cfg.sample_guidance, [])
            images = decode(self.vae, x0)
        result = segment_score(self.reward, images, prompts, direction=self.reference_direction, crop="center")
        p = result.parts
        row = {"step": step, "denscore": float(p.score.mean()), "text_relevant": float(p.relevant.mean()),
               "text_irrelevant": float(p.irrelevant.mean())}
        if self.acc.is_main_process:
            from PIL import Image

            grid = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
            (self.out / "validation").mkdir(exist_ok=True)
            Image.fromarray(np.concatenate(list(grid), axis=1)).save(self.out / "validation" / f"step-{step:06d}.png")
            vlog.write(row)
            self.acc.log({f"validation/{k}": v for k, v in row.items() if k != "step"}, step=step)
        return row

    # -- loop -------------------------------------------------------------------------------------------------
    def train(self) -> Path:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        main = acc.is_main_process
        start = self.load_checkpoint(cfg.resume) if cfg.resume else 0
        tlog = CSVLog(self.out / "train_log.csv", ["step", "loss", "reward", "reward_std", "reweighted",
                                                   "text_relevant", "text_irrelevant", "lr", "grad_offset",
                                                   "seconds"], main)
        vlog = CSVLog(self.out / "validation.csv", ["step", "denscore", "text_relevant", "text_irrelevant"], main)
        if main:
            n_prompts = len(self.prompts) if self.prompts else 0
            print(f"***** Running training ({cfg.stage} stage) *****\n"
                  f"  base model = {self.base_source}\n  reward model = {self.reward_source}\n"
                  f"  prompts = {n_prompts}\n  processes = {acc.num_processes}, batch per process = "
                  f"{cfg.train_batch_size}, accumulation = {cfg.gradient_accumulation_steps}\n"
                  f"  steps = {start} -> {cfg.train_steps}, LoRA rank = {cfg.lora_rank} on {len(self.targets)} "
                  f"layers, trainable parameters = {sum(p.numel() for p in self.params):,}\n"
                  f"  DDIM {cfg.sample_steps} steps, gradients at {cfg.sample_grad_steps}, CFG "
                  f"{cfg.sample_guidance}, ω = {cfg.reward_omega}, {cfg.resolution}px", flush=True)
        if start == 0:
            self.validate(0, vlog)
        align_data = self._align_dataset() if cfg.stage == "align" else None
        bar = tqdm(range(start, cfg.train_steps), initial=start, total=cfg.train_steps, disable=not main,
                   desc="training")
        for step in bar:
            t0 = time.time()
            stats_sum: dict[str, float] = {}
            loss_sum = 0.0
            for micro in range(cfg.gradient_accumulation_steps):
                gen = step_generator(cfg.seed, step * cfg.gradient_accumulation_steps + micro, acc.process_index)
                dump = {} if cfg.dump_debug else None
                with acc.accumulate(self.unet):
                    if cfg.stage == "reward":
                        prompts = batch_prompts(self.prompts, cfg.seed, step, micro, cfg.train_batch_size,
                                                acc.process_index, acc.num_processes,
                                                cfg.gradient_accumulation_steps)
                        loss, stats = self.reward_loss(prompts, gen, dump)
                    else:
                        loss, stats = self.align_loss(align_data(step, micro, gen), gen)
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
                    self.optimizer.zero_grad()
                loss_sum += float(loss.detach())
                for k, v in stats.items():
                    stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
                if dump is not None:
                    self._dump(step, dump)
            done = step + 1
            row = {"step": done, "loss": loss_sum / cfg.gradient_accumulation_steps,
                   "lr": self.lr_scheduler.get_last_lr()[0], "seconds": round(time.time() - t0, 3),
                   **{k: v / cfg.gradient_accumulation_steps for k, v in stats_sum.items()}}
            if done % cfg.log_every == 0 and main:
                tlog.write(row)
                acc.log({k: v for k, v in row.items() if k != "step"}, step=done)
                bar.set_postfix(loss=f"{row['loss']:.4f}", reward=f"{row.get('reward', 0):.4f}")
            if done % cfg.checkpoint_every == 0 and done < cfg.train_steps:
                self.save_checkpoint(done)
            if cfg.validation_every and done % cfg.validation_every == 0 and done < cfg.train_steps:
                self.validate(done, vlog)
        self.validate(cfg.train_steps, vlog)
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
        """(images, captions) micro-batches from a ``datasets`` folder with an image and a caption column."""
        import datasets

        cfg = self.cfg
        if not cfg.prompts or not Path(cfg.prompts).is_dir():
            raise ValueError("the align stage needs --prompts pointing at a local `datasets` folder (save_to_disk) "
                             "with image and caption columns")
        ds = datasets.load_from_disk(cfg.prompts)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        for col in (cfg.image_column, cfg.caption_column):
            if col not in ds.column_names:
                raise ValueError(f"{cfg.prompts} has no column {col!r} (columns: {ds.column_names})")
        n = len(ds)

        def get(step, micro, gen):
            from torchvision.transforms.v2 import functional as TF

            idx = [int(i) for i in torch.randint(0, n, (cfg.train_batch_size,), generator=gen)]
            rows = ds.select(idx)
            images = []
            for img in rows[cfg.image_column]:
                t = TF.to_dtype(TF.to_image(img.convert("RGB")), torch.float32, scale=True)
                t = TF.resize(t, cfg.resolution, antialias=True)
                images.append(TF.center_crop(t, cfg.resolution))
            return torch.stack(images), [str(c).replace("\n\n", " ").strip() for c in rows[cfg.caption_column]]

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
                "prompts_sha256": prompts_hash, "reward_model": self.reward_source, "seed": cfg.seed})
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


def apply_embedded_profile(cfg: TrainConfig, argv: list[str]) -> TrainConfig:
    """Without --model, use the demo profile for every setting the user did not give."""
    if cfg.model is not None:
        return cfg
    given = {a.split("=")[0][2:].replace("-", "_") for a in argv if a.startswith("--")}
    values = cfg.to_dict()
    values.update({k: v for k, v in EMBEDDED_PROFILE.items() if k not in given})
    if "output_dir" not in given:
        values["output_dir"] = "outputs/longalign-demo"
    return TrainConfig(**values)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("accelerate", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = apply_embedded_profile(TrainConfig.from_args(argv), argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cfg.model is None:
        print("No --model given: training the built-in tiny random-weight SD pipeline on the CPU demo profile "
              "(real file formats and code paths; the pictures are noise). Pass --model for a real run.",
              flush=True)
    try:
        Trainer(cfg).train()
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
