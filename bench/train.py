"""Benchmark of the shipped trainer: memory and time of one reward-training step of ``trainer.finetune.Trainer``
(its ``optimizer_step``: ``reward_loss`` → backward → grad clip → AdamW), truncated vs full backpropagation,
with a per-phase time split.

    python bench/train.py                                   # built-in tiny pipeline on the CPU, 256 px, fp32
    python bench/train.py --shape tiny-sdxl                 # built-in tiny SDXL pipeline (--model embedded-sdxl)
    python bench/train.py --shape sd15 --resolution 512 --batch 1 --only truncated          # GPU, bf16
    python bench/train.py --shape sd15 --resolution 512 --batch 4 --only truncated --compile-unet
    python bench/train.py --shape sdxl --resolution 1024 --batch 1 --only truncated        # GPU, bf16

"truncated" is the method as shipped (docs/method.md §5): gradients at K = 5 of the steps, UNet input detached, gradient
checkpointing (UNet and VAE). "full" is the baseline: the same Trainer and step, with the sampling chain
switched to backpropagate through every step (no detach, no checkpointing). Each measurement runs in its own
process: one warm-up step, then one measured step. Peak memory is the increase over the memory held before the
step (CPU: resident set sampled every 2 ms after malloc_trim; GPU: torch.cuda.max_memory_allocated).

Phases (wall clock; on a GPU each phase boundary synchronises): no-grad UNet calls of the sampling chain, UNet
calls with gradients, VAE decode, reward (segment-level score), backward (includes the checkpointed
recomputation), optimizer (clip + AdamW + zero_grad), rest (text encoding, DDIM updates, bookkeeping).

``--shape sd15``: SD1.5 shapes (UNet 860M, SD VAE, CLIP-L text encoder) and a CLIP-H/14-shaped preference model
(Denscore's size), random weights, written once as diffusers / transformers folders under ``--cache``; the
Trainer loads them like a real run (``--model``/``--reward-model``). On a GPU the trainer uses bf16 (its
default), SDPA attention (diffusers' default on torch 2), channels_last UNet and VAE, fused AdamW; with
``--compile-unet`` the no-grad UNet calls run through ``torch.compile``. ``--shape sdxl``: SDXL base shapes (UNet
2.6B from SDXL's published config, SDXL VAE, CLIP-L + OpenCLIP-bigG text encoders) with the same CLIP-H/14-shaped
preference model; ``--shape tiny-sdxl`` is the trainer's built-in ``--model embedded-sdxl``.
Targets: truncated peak <= 0.06x full at 50 steps; truncated flat in steps (<= 1.25x from 50 to 100).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class RSSPeak:
    """Peak resident memory of this process above a baseline, sampled by a thread (CPU runs)."""

    def __init__(self, interval=0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self.base = self.rss()
        self.peak = self.base
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def increase(self) -> int:
        return self.peak - self.base


#: stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that shape the model).
SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4, "layers_per_block": 2, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_num_groups": 32,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10], "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                                                   "UpBlock2D"], "use_linear_projection": True,
}


def sdxl_folder(cache: Path) -> Path:
    """Random-weight SDXL-base-shaped diffusers folder (created once)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from longalign_core.clip_vocab import load_clip_tokenizer

    sd = cache / "sdxl-random"
    if (sd / "model_index.json").is_file():
        return sd
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(SDXL_UNET).save_pretrained(sd / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025,
                  force_upcast=True).save_pretrained(sd / "vae")
    text = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, hidden_act="quick_gelu", pad_token_id=49407, **text)
                  ).save_pretrained(sd / "text_encoder")
    CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                               num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
                                               pad_token_id=0, **text)).save_pretrained(sd / "text_encoder_2")
    load_clip_tokenizer().save_pretrained(sd / "tokenizer")
    load_clip_tokenizer(pad_token="!").save_pretrained(sd / "tokenizer_2")
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                           timestep_spacing="leading").save_pretrained(sd / "scheduler")
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return sd


def sd15_folder(cache: Path) -> Path:
    """Random-weight SD1.5-shaped diffusers folder (created once)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from longalign_core.clip_vocab import load_clip_tokenizer
    from longalign_core.lora import load_unet_config

    sd = cache / "sd15-random"
    if not (sd / "model_index.json").is_file():
        torch.manual_seed(0)
        UNet2DConditionModel.from_config(load_unet_config(None)).save_pretrained(sd / "unet")
        AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      layers_per_block=2, norm_num_groups=32, sample_size=512).save_pretrained(sd / "vae")
        CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                     bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
                      ).save_pretrained(sd / "text_encoder")
        load_clip_tokenizer().save_pretrained(sd / "tokenizer")
        DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      steps_offset=1).save_pretrained(sd / "scheduler")
        (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return sd


def clip_h_folder(cache: Path) -> Path:
    """Random-weight CLIP-H/14-shaped CLIPModel folder (Denscore's size; created once)."""
    from transformers import CLIPConfig, CLIPModel

    from longalign_core.clip_vocab import load_clip_tokenizer

    reward = cache / "clip-h-random"
    if not (reward / "config.json").is_file():
        cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                                          num_hidden_layers=24, num_attention_heads=16, max_position_embeddings=77,
                                          hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
                         vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                            num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu"),
                         projection_dim=1024)
        CLIPModel(cfg).save_pretrained(reward)
        load_clip_tokenizer().save_pretrained(reward)
    return reward


class PhaseTimer:
    """Wall-clock time per phase, taken by wrapping the trainer's pieces (synchronising on a GPU)."""

    def __init__(self, cuda: bool):
        self.cuda, self.seconds, self.enabled, self.depth = cuda, defaultdict(float), False, 0

    def wrap(self, fn, phase):
        def timed(*args, **kwargs):
            if not self.enabled or self.depth:  # nested (the checkpoint recompute inside backward): counted once
                return fn(*args, **kwargs)
            name = phase(*args) if callable(phase) else phase
            if self.cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            self.depth += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                self.depth -= 1
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - t0
            return out

        return timed


def one_run(args) -> dict:
    import trainer.finetune as finetune
    import trainer.objective as objective
    from trainer.config import TrainConfig

    cuda = torch.cuda.is_available() and args.device != "cpu"
    out = Path(args.cache) / f"run-{os.getpid()}"
    flags = ["--output-dir", str(out), "--resolution", str(args.resolution), "--train-batch-size", str(args.batch),
             "--sample-steps", str(args.steps), "--sample-grad-steps", "5", "--validation-prompts", "0",
             "--lr-warmup-steps", "0", "--train-steps", "1000"]
    if args.shape in ("sd15", "sdxl"):
        sd = (sdxl_folder if args.shape == "sdxl" else sd15_folder)(Path(args.cache))
        reward = clip_h_folder(Path(args.cache))
        flags += ["--model", str(sd), "--reward-model", str(reward), "--lora-rank", "32"]
    else:
        flags += ["--lora-rank", "4"] + (["--model", "embedded-sdxl"] if args.shape == "tiny-sdxl" else [])
    if args.dtype:
        flags += ["--mixed-precision", args.dtype]
    if args.compile_unet:
        flags += ["--compile-unet"]
    if args.no_gradient_checkpointing:
        flags += ["--no-gradient-checkpointing"]
    if args.mode == "full":  # the baseline: backpropagate through every step of the chain
        flags += ["--sample-grad-steps", str(args.steps), "--no-gradient-checkpointing"]
        real = objective.sample_truncated
        objective.sample_truncated = lambda *a, **k: real(*a, **{**k, "use_checkpoint": False, "detach_input": False})
    trainer = finetune.Trainer(TrainConfig.from_args(flags))
    trainer.unet.train()
    timer = PhaseTimer(cuda)
    eps = trainer.unet_eps
    trainer.unet_eps = timer.wrap(eps, lambda *a: "unet, grad" if torch.is_grad_enabled() else "unet, no grad")
    objective.decode = timer.wrap(objective.decode, "VAE decode")
    objective.segment_score = timer.wrap(objective.segment_score, "reward")
    trainer.acc.backward = timer.wrap(trainer.acc.backward, "backward")
    for name in ("clip_grad_norm_",):
        setattr(trainer.acc, name, timer.wrap(getattr(trainer.acc, name), "optimizer"))
    trainer.optimizer.step = timer.wrap(trainer.optimizer.step, "optimizer")
    trainer.optimizer.zero_grad = timer.wrap(trainer.optimizer.zero_grad, "optimizer")

    trainer.optimizer_step(0)  # warm-up: optimizer state, kernels, compilation, one-time buffers
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        timer.enabled = True
        t0 = time.perf_counter()
        trainer.optimizer_step(1)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - before
    else:
        import ctypes
        import gc

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        timer.enabled = True
        with RSSPeak() as mem:
            t0 = time.perf_counter()
            trainer.optimizer_step(1)
            seconds = time.perf_counter() - t0
        peak = mem.increase
    phases = dict(timer.seconds)
    phases["rest"] = seconds - sum(phases.values())
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    return {"mode": args.mode, "steps": args.steps, "seconds": seconds, "peak_bytes": peak, "phases": phases,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": trainer.cfg.mixed_precision}


def spawn(args, mode, steps) -> dict:
    cmd = [sys.executable, __file__, "--single", "--mode", mode, "--steps", str(steps), "--shape", args.shape,
           "--device", args.device, "--resolution", str(args.resolution), "--batch", str(args.batch),
           "--cache", args.cache] + (["--dtype", args.dtype] if args.dtype else []) + \
          (["--compile-unet"] if args.compile_unet else []) + \
          (["--no-gradient-checkpointing"] if args.no_gradient_checkpointing else [])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        return {"mode": mode, "steps": steps, "error": (out.stderr or out.stdout).strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["tiny", "tiny-sdxl", "sd15", "sdxl"], default="tiny")
    ap.add_argument("--device", default="auto", help="auto (GPU when there is one) or cpu")
    ap.add_argument("--dtype", choices=["no", "bf16", "fp16"], help="--mixed-precision (default: the trainer's: "
                                                                     "bf16 on a GPU, no on the CPU)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--only", choices=["truncated", "full"], help="measure one mode only (e.g. full does not fit)")
    ap.add_argument("--compile-unet", action="store_true", help="the trainer's --compile-unet")
    ap.add_argument("--no-gradient-checkpointing", action="store_true",
                    help="the trainer's --no-gradient-checkpointing (UNet at the gradient steps and VAE decode "
                         "keep their activations: the memory/time trade of checkpointing)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "longalign" / "bench"))
    ap.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="truncated", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=50, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.single:
        print(json.dumps(one_run(args)))
        return
    mib = lambda r: f"{r['peak_bytes'] / 2**20:9.1f} MiB" if "peak_bytes" in r else "   failed"  # noqa: E731
    sec = lambda r: f"{r['seconds']:7.2f} s" if "seconds" in r else r.get("error", "")  # noqa: E731
    print(f"[shipped Trainer; {args.shape} shapes, {args.resolution}px, batch {args.batch}, device {args.device}"
          f"{', --compile-unet' if args.compile_unet else ''}"
          f"{', --no-gradient-checkpointing' if args.no_gradient_checkpointing else ''}]")
    results = {}
    for mode, steps in [("truncated", 50), ("full", 50), ("truncated", 100)]:
        if args.only and mode != args.only:
            continue
        r = spawn(args, mode, steps)
        results[(mode, steps)] = r
        print(f"  {mode:9s} {steps:3d} steps: peak {mib(r)}  step time {sec(r)}  ({r.get('device', '')}, "
              f"{r.get('dtype', '')})")
        if "phases" in r:
            print("      " + ", ".join(f"{k} {v:.2f} s" for k, v in r["phases"].items()))
    t50, f50, t100 = results.get(("truncated", 50)), results.get(("full", 50)), results.get(("truncated", 100))
    if t50 and f50 and "peak_bytes" in t50 and "peak_bytes" in f50:
        print(f"  truncated / full at 50 steps: memory {t50['peak_bytes'] / f50['peak_bytes']:.3f}x (target <= 0.06x),"
              f" time {t50['seconds'] / f50['seconds']:.2f}x")
    if t50 and t100 and "peak_bytes" in t50 and "peak_bytes" in t100:
        print(f"  truncated 100 / 50 steps: memory {t100['peak_bytes'] / t50['peak_bytes']:.2f}x (target <= 1.25x), "
              f"time {t100['seconds'] / t50['seconds']:.2f}x")


if __name__ == "__main__":
    main()
