"""Benchmark: memory and time of one reward-training step, truncated vs full backpropagation.

    python bench/train.py                     # built-in tiny pipeline on the CPU, 256 px
    python bench/train.py --shape sd15 --device cuda --dtype bf16 --resolution 512 --only truncated

One step = DDIM sampling from noise with CFG → VAE decode → segment-level reward → backward → AdamW step, with a
rank-32 (tiny: 4) LoRA on the UNet. "truncated" is the method (SPEC §5): gradients at K = 5 of the steps, UNet
input detached, gradient checkpointing. "full" backpropagates through every step (no detach, no checkpointing).
Each measurement runs in its own process; peak memory is the increase over the memory held before the step
(CPU: resident set sampled every 2 ms, after a warm-up step and malloc_trim; GPU:
torch.cuda.max_memory_allocated after a warm-up step). Ratios are printed side by side.
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


def build(shape: str, device: str, dtype: torch.dtype):
    """UNet, VAE, segment encoder, preference model, noise scheduler for the chosen shape (random weights)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

    from longalign_core.clip_text import CLIPSegmentEncoder
    from longalign_core.clip_vocab import load_clip_tokenizer
    from longalign_core.lora import load_unet_config
    from longalign_core.preference import wrap_hf_clip

    torch.manual_seed(0)
    if shape == "tiny":
        from trainer.models import embedded_reward_dir, load_base_model
        from longalign_core.preference import load_preference_model

        base = load_base_model(None)
        unet, vae, text, sched = base.unet, base.vae, base.text_encoder, base.noise_scheduler
        reward = load_preference_model(embedded_reward_dir())
    else:  # SD1.5 shapes: UNet 860M, VAE, CLIP-L text; a CLIP-H/14-shaped preference model (Denscore's size)
        unet = UNet2DConditionModel.from_config(load_unet_config(None))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, norm_num_groups=32, sample_size=512)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                            hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
                                            pad_token_id=49407))
        cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                                          num_hidden_layers=24, num_attention_heads=16, max_position_embeddings=77,
                                          hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
                         vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                            num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu"),
                         projection_dim=1024)
        reward = wrap_hf_clip(CLIPModel(cfg), load_clip_tokenizer(), "clip-h-shaped")
        sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              steps_offset=1)
    unet.to(device, dtype)
    vae.to(device, dtype).requires_grad_(False)
    text.to(device, dtype).requires_grad_(False)
    reward.to(device=device, dtype=dtype)
    return unet, vae, CLIPSegmentEncoder(load_clip_tokenizer(), text), reward, sched


def one_run(args) -> dict:
    from peft import LoraConfig

    from longalign_core.denscore import segment_score
    from longalign_core.examples import EXAMPLE_PROMPT
    from longalign_core.lora import lora_targets
    from trainer.sampling import ddim_scheduler, decode, grad_step_indices, sample_truncated

    device, dtype = args.device, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    unet, vae, encoder, reward, sched = build(args.shape, device, dtype)
    unet.requires_grad_(False)
    rank = 4 if args.shape == "tiny" else 32
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=[t.path for t in lora_targets(unet)]))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    prompts = [EXAMPLE_PROMPT] * args.batch
    with torch.no_grad():
        cond = encoder.encode(prompts).cond.to(device, dtype)
        uncond = encoder.encode([""] * args.batch).cond.to(device, dtype)
    scheduler = ddim_scheduler(sched, args.steps)
    if args.mode == "truncated":
        idx, detach, ckpt = grad_step_indices(args.steps, 5, 0), True, True
        vae.enable_gradient_checkpointing()  # as the trainer does with --gradient-checkpointing
    else:
        idx, detach, ckpt = list(range(args.steps)), False, False

    def eps(x, t, c):
        with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype,
                            enabled=dtype != torch.float32):
            return unet(x, t, encoder_hidden_states=c).sample

    def step():
        noise = torch.randn(args.batch, 4, args.resolution // 8, args.resolution // 8, device=device, dtype=dtype)
        x0 = sample_truncated(eps, scheduler, noise, cond, uncond, 7.5, idx, use_checkpoint=ckpt, detach_input=detach)
        images = decode(vae, x0)
        loss = 0.5 * (1 - segment_score(reward, images, prompts, crop="random").parts.reweighted.mean())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    cuda = device.startswith("cuda")
    if cuda:
        step()  # warm-up (kernel selection, optimizer state)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - before
    else:
        # Warm-up first (optimizer state, thread pools, one-time buffers), then hand freed memory back to the OS so
        # the measured step's resident-set increase is what the step itself needs.
        step()
        import ctypes
        import gc

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with RSSPeak() as mem:
            t0 = time.perf_counter()
            step()
            seconds = time.perf_counter() - t0
        peak = mem.increase
    return {"mode": args.mode, "steps": args.steps, "seconds": seconds, "peak_bytes": peak,
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def spawn(args, mode, steps) -> dict:
    cmd = [sys.executable, __file__, "--single", "--mode", mode, "--steps", str(steps), "--shape", args.shape,
           "--device", args.device, "--dtype", args.dtype, "--resolution", str(args.resolution),
           "--batch", str(args.batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        return {"mode": mode, "steps": steps, "error": (out.stderr or out.stdout).strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--only", choices=["truncated", "full"], help="measure one mode only (e.g. full does not fit)")
    ap.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="truncated", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=50, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.single:
        print(json.dumps(one_run(args)))
        return
    mib = lambda r: f"{r['peak_bytes'] / 2**20:9.1f} MiB" if "peak_bytes" in r else "   failed"  # noqa: E731
    sec = lambda r: f"{r['seconds']:7.2f} s" if "seconds" in r else r.get("error", "")  # noqa: E731
    print(f"[{args.shape} shapes, {args.resolution}px, batch {args.batch}, {args.dtype}, {args.device}]")
    results = {}
    for mode, steps in [("truncated", 50), ("full", 50), ("truncated", 100)]:
        if args.only and mode != args.only:
            continue
        r = spawn(args, mode, steps)
        results[(mode, steps)] = r
        print(f"  {mode:9s} {steps:3d} steps: peak {mib(r)}  step time {sec(r)}  ({r.get('device', '')})")
    t50, f50, t100 = results.get(("truncated", 50)), results.get(("full", 50)), results.get(("truncated", 100))
    if t50 and f50 and "peak_bytes" in t50 and "peak_bytes" in f50:
        print(f"  truncated / full at 50 steps: memory {t50['peak_bytes'] / f50['peak_bytes']:.3f}x (target <= 0.06x),"
              f" time {t50['seconds'] / f50['seconds']:.2f}x")
    if t50 and t100 and "peak_bytes" in t50 and "peak_bytes" in t100:
        print(f"  truncated 100 / 50 steps: memory {t100['peak_bytes'] / t50['peak_bytes']:.2f}x (target <= 1.25x), "
              f"time {t100['seconds'] / t50['seconds']:.2f}x")


if __name__ == "__main__":
    main()
