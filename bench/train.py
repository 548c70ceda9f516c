"""Benchmark of the shipped trainer: memory and time of one training step of ``trainer.finetune.Trainer``, measured
by the code ``--dry-run`` uses (``trainer.dry_run.measure_step``: one warm-up step, then one measured
``optimizer_step`` — reward_loss or align_loss → backward → clip → AdamW — with its per-phase split),
truncated vs full backpropagation through the sampling chain.

    python bench/train.py                                   # built-in tiny pipeline on the CPU, 256 px, fp32
    python bench/train.py --shape tiny-sdxl                 # built-in tiny SDXL pipeline (--model embedded-sdxl)
    python bench/train.py --shape sd15 --resolution 64 --steps 5 --dtype bf16 --only truncated --device cpu
    python bench/train.py --shape sdxl --resolution 128 --steps 5 --dtype bf16 --only truncated --device cpu
    python bench/train.py --shape sd15 --resolution 512 --batch 8 --only truncated          # GPU, bf16
    python bench/train.py --shape sdxl --resolution 1024 --batch 1 --only truncated        # GPU, bf16

"truncated" is the method as shipped (docs/method.md §5): gradients at K = 5 of the steps, UNet input detached,
gradient checkpointing (each gradient step's UNet call, the UNet's blocks inside it, the VAE). "full" is the
baseline: the same Trainer and step, with the sampling chain switched to backpropagate through every step (no
detach, no checkpointing). ``--whole-unet-checkpoint`` measures the reward stage as it was before per-block
checkpointing. Each measurement runs in its own process. Peak memory is the increase over the memory held before
the step (CPU: resident set sampled every 2 ms after malloc_trim; GPU: torch.cuda.max_memory_allocated); the
process peak (``ru_maxrss``) includes loading.

Phases (wall clock; on a GPU each phase boundary synchronises): text encoding, UNet calls without and with
gradients, VAE decode, reward (segment-level score), backward of the decode pieces, backward (includes the
checkpointed recomputation), optimizer (clip + AdamW + zero_grad), rest (DDIM updates, bookkeeping).

``--shape sd15``: SD1.5 shapes (UNet 860M, SD VAE, CLIP-L text encoder) and a CLIP-H/14-shaped preference model
(Denscore's size), random weights, written once as diffusers / transformers folders under ``--cache`` (fp32 with
an fp16 variant, as the published folders ship); the Trainer loads them like a real run (``--model``,
``--reward-model``, ``--prompts``: the shipped reference prompts). ``--shape sdxl``: SDXL base shapes (UNet 2.6B
from SDXL's published config, SDXL VAE, CLIP-L + OpenCLIP-bigG text encoders) with the same preference model;
``--shape tiny-sdxl`` is the trainer's built-in ``--model embedded-sdxl``. ``--stage align`` measures an align
step on a small folder of random images at the resolution.
Targets: truncated peak <= 0.06x full at 50 steps; truncated flat in steps (<= 1.25x from 50 to 100).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def save_with_fp16_variant(model, folder: Path) -> None:
    """fp32 weights and an fp16 variant beside them, as the published SD1.5 / SDXL diffusers folders ship."""
    model.save_pretrained(folder)
    model.half().save_pretrained(folder, variant="fp16")


def sdxl_folder(cache: Path) -> Path:
    """Random-weight SDXL-base-shaped diffusers folder (created once)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from longalign_core.clip_vocab import load_clip_tokenizer
    from longalign_core.lora import load_unet_config

    sd = cache / "sdxl-random-v2"
    if (sd / "model_index.json").is_file():
        return sd
    torch.manual_seed(0)
    save_with_fp16_variant(UNet2DConditionModel.from_config(load_unet_config("sdxl")), sd / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025,
                  force_upcast=True).save_pretrained(sd / "vae")  # the SDXL VAE ships fp32
    text = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    save_with_fp16_variant(CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                        num_attention_heads=12, hidden_act="quick_gelu",
                                                        pad_token_id=49407, **text)), sd / "text_encoder")
    save_with_fp16_variant(CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu",
        projection_dim=1280, pad_token_id=0, **text)), sd / "text_encoder_2")
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

    sd = cache / "sd15-random-v2"
    if not (sd / "model_index.json").is_file():
        torch.manual_seed(0)
        save_with_fp16_variant(UNet2DConditionModel.from_config(load_unet_config(None)), sd / "unet")
        AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      layers_per_block=2, norm_num_groups=32, sample_size=512).save_pretrained(sd / "vae")
        save_with_fp16_variant(CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
            pad_token_id=49407)), sd / "text_encoder")
        load_clip_tokenizer().save_pretrained(sd / "tokenizer")
        DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      steps_offset=1).save_pretrained(sd / "scheduler")
        (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return sd


def clip_h_folder(cache: Path) -> Path:
    """Random-weight CLIP-H/14-shaped CLIPModel folder (Denscore's size; created once)."""
    from transformers import CLIPConfig, CLIPModel

    from longalign_core.clip_vocab import load_clip_tokenizer

    reward = cache / "clip-h-random-fp16"
    if not (reward / "config.json").is_file():
        cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                                          num_hidden_layers=24, num_attention_heads=16, max_position_embeddings=77,
                                          hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
                         vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                            num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu"),
                         projection_dim=1024)
        CLIPModel(cfg).half().save_pretrained(reward)  # Denscore ships its 986 M parameters in fp16 (1.97 GB)
        load_clip_tokenizer().save_pretrained(reward)
    return reward


def prompts_file(cache: Path) -> Path:
    """The training prompts of the real-shape runs: the shipped reference prompts, as a file."""
    from longalign_core.reference_direction import default_reference_prompts

    path = cache / "prompts.txt"
    if not path.is_file():
        path.write_text("\n".join(default_reference_prompts()) + "\n")
    return path


def align_folder(cache: Path, resolution: int) -> Path:
    """A small ``datasets`` folder of (random image, long caption) pairs at ``resolution`` (align stage)."""
    import datasets
    import numpy as np
    from PIL import Image

    from longalign_core.reference_direction import default_reference_prompts

    folder = cache / f"align-pairs-{resolution}"
    if not (folder / "dataset_info.json").is_file():
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)) for _ in range(8)]
        datasets.Dataset.from_dict({"image": images, "caption": default_reference_prompts()[:8]}).save_to_disk(str(folder))
    return folder


def one_run(args) -> dict:
    """One Trainer of the shipped code and its dry-run measurement (trainer.dry_run.measure_step: a warm-up
    step, then one measured step with the per-phase split)."""
    import trainer.finetune as finetune
    import trainer.objective as objective
    from trainer.config import TrainConfig
    from trainer.dry_run import measure_step, model_parts
    from trainer.memory import process_peak_bytes

    cache = Path(args.cache)
    out = cache / f"run-{os.getpid()}"
    flags = ["--output-dir", str(out), "--resolution", str(args.resolution), "--train-batch-size", str(args.batch),
             "--sample-steps", str(args.steps), "--sample-grad-steps", str(args.grad_steps),
             "--validation-prompts", "0", "--lr-warmup-steps", "0", "--train-steps", "1000", "--stage", args.stage]
    if args.shape in ("sd15", "sdxl"):
        sd = (sdxl_folder if args.shape == "sdxl" else sd15_folder)(cache)
        reward = clip_h_folder(cache)
        flags += ["--model", str(sd), "--reward-model", str(reward), "--lora-rank", "32"]
    else:
        flags += ["--lora-rank", "4"] + (["--model", "embedded-sdxl"] if args.shape == "tiny-sdxl" else [])
    if args.stage == "align":
        flags += ["--prompts", str(align_folder(cache, args.resolution))]
    elif args.shape in ("sd15", "sdxl"):
        flags += ["--prompts", str(prompts_file(cache))]
    if args.dtype:
        flags += ["--mixed-precision", args.dtype]
    if args.compile_unet:
        flags += ["--compile-unet"]
    if args.no_gradient_checkpointing:
        flags += ["--no-gradient-checkpointing"]
    if args.cache_text_embeddings:
        flags += ["--cache-text-embeddings"]
    if args.mode == "full":  # the baseline: backpropagate through every step of the chain
        flags += ["--sample-grad-steps", str(args.steps), "--no-gradient-checkpointing"]
        real = objective.sample_truncated
        objective.sample_truncated = lambda *a, **k: real(*a, **{**k, "use_checkpoint": False, "detach_input": False})
    if args.whole_unet_checkpoint:  # the reward stage before per-block checkpointing: one checkpoint per UNet call
        import contextlib

        objective.blocks_checkpointed = lambda unet: contextlib.nullcontext()
    trainer = finetune.Trainer(TrainConfig.from_args(flags))
    result = measure_step(trainer.optimizer_step, trainer.parts, trainer.acc.device)
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cuda = trainer.acc.device.type == "cuda"
    return {"mode": args.mode, "steps": args.steps, "seconds": result["seconds"], "peak_bytes": result["peak_bytes"],
            "held_bytes": result["held_bytes"], "phases": result["phases"], "process_peak_bytes": process_peak_bytes(),
            "parts": [list(r) for r in model_parts(trainer.parts)],
            "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": trainer.cfg.mixed_precision}


def spawn(args, mode, steps) -> dict:
    cmd = [sys.executable, __file__, "--single", "--mode", mode, "--steps", str(steps), "--shape", args.shape,
           "--grad-steps", str(args.grad_steps),
           "--device", args.device, "--resolution", str(args.resolution), "--batch", str(args.batch),
           "--cache", args.cache, "--stage", args.stage] + (["--dtype", args.dtype] if args.dtype else []) + \
          (["--compile-unet"] if args.compile_unet else []) + \
          (["--no-gradient-checkpointing"] if args.no_gradient_checkpointing else []) + \
          (["--whole-unet-checkpoint"] if args.whole_unet_checkpoint else []) + \
          (["--cache-text-embeddings"] if args.cache_text_embeddings else [])
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
    ap.add_argument("--whole-unet-checkpoint", action="store_true",
                    help="the reward stage before per-block checkpointing: one checkpoint around each UNet call "
                         "at the gradient steps, no checkpoints inside it (to measure what per-block saves)")
    ap.add_argument("--cache-text-embeddings", action="store_true",
                    help="the trainer's --cache-text-embeddings (text encoders freed after encoding the prompts)")
    ap.add_argument("--stage", choices=["reward", "align"], default="reward", help="the step measured")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps of the sampling chain (the 'full' baseline "
                                                          "and the doubled-steps row use it too); fewer keep "
                                                          "real-size CPU runs short, memory is nearly flat in it")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "longalign" / "bench"))
    ap.add_argument("--grad-steps", type=int, help="DDIM steps with gradients (default: 5, or the largest divisor "
                    "of --steps up to 5)")
    ap.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="truncated", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.grad_steps is None:  # the paper's K = 5 where --steps allows; the same K for the 2x-steps run
        args.grad_steps = max(k for k in range(1, 6) if args.steps % k == 0)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.single:
        print(json.dumps(one_run(args)))
        return
    mib = lambda r: f"{r['peak_bytes'] / 2**20:9.1f} MiB" if "peak_bytes" in r else "   failed"  # noqa: E731
    sec = lambda r: f"{r['seconds']:7.2f} s" if "seconds" in r else r.get("error", "")  # noqa: E731
    print(f"[shipped Trainer; {args.stage} stage, {args.shape} shapes, {args.resolution}px, batch {args.batch}, "
          f"device {args.device}{', --compile-unet' if args.compile_unet else ''}"
          f"{', --no-gradient-checkpointing' if args.no_gradient_checkpointing else ''}"
          f"{', whole-UNet checkpoint (no per-block)' if args.whole_unet_checkpoint else ''}]")
    results = {}
    n = args.steps
    runs = [("truncated", n)] if args.stage == "align" else [("truncated", n), ("full", n), ("truncated", 2 * n)]
    for mode, steps in runs:
        if args.only and mode != args.only:
            continue
        r = spawn(args, mode, steps)
        results[(mode, steps)] = r
        print(f"  {mode:9s} {steps:3d} steps: peak {mib(r)}  step time {sec(r)}  ({r.get('device', '')}, "
              f"{r.get('dtype', '')})")
        if "phases" in r:
            print("      " + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(r["phases"].items(), key=lambda kv: -kv[1])))
            print(f"      held before the step {r['held_bytes'] / 2**30:.2f} GiB, process peak (loading included) "
                  f"{r['process_peak_bytes'] / 2**30:.2f} GiB")
            if args.shape in ("sd15", "sdxl") and mode == "truncated" and steps == n:
                for name, count, nbytes, dtype in r["parts"]:
                    print(f"      {name:55s} {count / 1e6:9.1f} M  {nbytes / 2**30:6.2f} GiB  {dtype}")
    t, f, t2 = results.get(("truncated", n)), results.get(("full", n)), results.get(("truncated", 2 * n))
    if t and f and "peak_bytes" in t and "peak_bytes" in f:
        print(f"  truncated / full at {n} steps: memory {t['peak_bytes'] / f['peak_bytes']:.3f}x (target <= 0.06x at "
              f"50), time {t['seconds'] / f['seconds']:.2f}x")
    if t and t2 and "peak_bytes" in t and "peak_bytes" in t2:
        print(f"  truncated {2 * n} / {n} steps: memory {t2['peak_bytes'] / t['peak_bytes']:.2f}x (target <= 1.25x), "
              f"time {t2['seconds'] / t['seconds']:.2f}x")


if __name__ == "__main__":
    main()
