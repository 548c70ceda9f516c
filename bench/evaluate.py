"""Scoring overhead of ``python -m trainer.evaluate``: the time an evaluation spends beyond generating its images.

    python bench/evaluate.py                  # the no-argument demo's workload, with one LoRA arm
    python bench/evaluate.py --seeds 4 --prompts 32

The workload: the built-in tiny models on the CPU, the base and one LoRA arm (random rank-4 pairs on every
LongAlign target of the embedded UNet, saved in the trainer's kohya format), the shipped 64 evaluation prompts
× 2 seeds, DDIM 10 steps, 64 px, the built-in tiny judge. "Generating the images" is the evaluation's own phase
timer over loading the base model and the LoRA, merging it, text encoding, sampling and decoding; everything
else (loading the judge and V, scoring, writing images and scores.csv, report.md/png and the grids, whatever no
phase covers) is the overhead. The clock runs from setting the evaluation up to the report being written.
Measured twice, side by side:

* **as run** — ``python -m trainer.evaluate`` in a fresh process: importing diffusers and transformers happens
  while the base model loads and counts as generation, as in the demo run;
* **strict** — in this process after diffusers and transformers are imported (making the LoRA imports them):
  only the work itself is timed.

Prints each phase and the ratio overhead / total (target ≤ 10 %). The seconds depend on the machine and its load.

    python bench/evaluate.py --processes 2    # also under torchrun with 2 CPU processes: same scores.csv, wall time
    python bench/evaluate.py --cost           # images and GPU time per arm for benchmark prompt sets (no run)

``--processes N`` runs the same command under ``torchrun --nproc_per_node N`` (gloo) and checks that its
``scores.csv`` is byte for byte the one-process one. ``--cost`` counts the floating-point operations of one image
at the published SD1.5 and SDXL shapes (the UNet's CFG step with the evaluation's 240-token conditioning, the VAE
decode, the CLIP-H/14 judge's image tower), on the meta device with ``torch.utils.flop_counter`` (nothing runs),
and projects the GPU time per arm from the one GPU time the project has measured: SD1.5 shapes at 512 px, bf16,
batch 1 on an H100, 5.3 s for a 50-step chain and 12.2 s for a 100-step chain (``bench/train.py``, 2026-11-26,
the README of commit f24343c): the 50 extra steps, all without gradients, took 0.138 s each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def random_lora(path: Path, seed: int = 0) -> Path:
    """Rank-4 random (up, down) pairs for every LongAlign target of the embedded SD1.5-shaped UNet."""
    from longalign_core.lora import lora_targets, save_kohya
    from trainer.loading.embedded import embedded_pipeline_dir

    targets = lora_targets(embedded_pipeline_dir(seed) / "unet")
    g = torch.Generator().manual_seed(1234)
    pairs = {}
    for t in targets:
        conv = (1, 1) if t.kind == "conv" else ()
        pairs[t.path] = (torch.randn((t.weight_shape[0], 4, *conv), generator=g) * 0.05,
                         torch.randn((4, *t.weight_shape[1:]), generator=g) * 0.05)
    return save_kohya(pairs, path, {"format": "kohya"})


def report(title: str, phases: dict, total: float) -> float:
    from trainer.evaluate.report import GENERATION_PHASES

    generation = sum(phases.get(k, 0.0) for k in GENERATION_PHASES)
    untimed = total - sum(v for k, v in phases.items() if k != "total")
    print(f"\n{title}\n| phase | seconds |\n|---|---|")
    for name, seconds in sorted(phases.items(), key=lambda kv: -kv[1]):
        if name != "total":
            print(f"| {name} ({'generation' if name in GENERATION_PHASES else 'overhead'}) | {seconds:.2f} |")
    print(f"| outside the phases (overhead) | {untimed:.2f} |")
    rest = total - generation
    print(f"total {total:.2f} s: generating the images {generation:.2f} s, everything else {rest:.2f} s "
          f"-> overhead {rest / total:.1%} of the total (target <= 10 %)")
    return rest / total


#: The measured GPU time (see the docstring): seconds per DDIM step with CFG, SD1.5 shapes, 512 px, batch 1, H100.
H100_SD15_STEP = (12.2 - 5.3) / 50
#: Benchmark prompt sets: (prompts, images per prompt their protocol asks for).
PROMPT_SETS = {"DPG-Bench": (1065, 4), "LongBench-T2I": (500, 2), "the pack's 64 evaluation prompts": (64, 2)}


def image_flops(shape: str) -> dict[str, float]:
    """FLOPs of one image at a published shape: the UNet per CFG step (2 rows, 240-token conditioning), the VAE
    decode, the judge's image tower (CLIP-H/14, 224 px); counted on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from longalign_core.lora import load_unet_config

    side, ctx = (128, 2048) if shape == "sdxl" else (64, 768)

    def count(fn) -> float:
        with torch.device("meta"), FlopCounterMode(display=False) as fc:
            fn()
        return float(fc.get_total_flops())

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(load_unet_config("sdxl" if shape == "sdxl" else None))
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
        judge = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1280, intermediate_size=5120,
                                                               num_hidden_layers=32, num_attention_heads=16,
                                                               image_size=224, patch_size=14, projection_dim=1024))
    extra = {"added_cond_kwargs": {"text_embeds": torch.zeros(2, 1280, device="meta"),
                                   "time_ids": torch.zeros(2, 6, device="meta")}} if shape == "sdxl" else {}
    return {"unet_step": count(lambda: unet(torch.zeros(2, 4, side, side), torch.tensor([500, 500]),
                                            encoder_hidden_states=torch.zeros(2, 240, ctx), **extra)),
            "decode": count(lambda: vae.decode(torch.zeros(1, 4, side, side))),
            "judge": count(lambda: judge(pixel_values=torch.zeros(1, 3, 224, 224)))}


def duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def cost(steps: int = 25) -> None:
    """Images and projected GPU hours per arm for the benchmark prompt sets, SD1.5 (512 px) and SDXL (1024 px)."""
    flops = {shape: image_flops(shape) for shape in ("sd15", "sdxl")}
    rate = flops["sd15"]["unet_step"] / H100_SD15_STEP  # FLOP/s the measured H100 step achieved
    print("FLOPs per image (counted on the meta device; UNet per CFG step with 240 conditioning tokens):")
    per_image = {}
    for shape, f in flops.items():
        total = steps * f["unet_step"] + f["decode"] + f["judge"]
        per_image[shape] = total / rate
        print(f"  {shape}: UNet {f['unet_step'] / 1e12:.2f} TFLOP per step × {steps} steps, VAE decode "
              f"{f['decode'] / 1e12:.2f}, judge {f['judge'] / 1e12:.2f} -> {total / 1e12:.1f} TFLOP; at the measured "
              f"H100 rate ({rate / 1e12:.1f} TFLOP/s: {H100_SD15_STEP:.3f} s per SD1.5 CFG step, batch 1) "
              f"{per_image[shape]:.1f} s per image")
    print("\n| prompt set | images per arm | SD1.5 512 px, 1 GPU | 8 GPUs | SDXL 1024 px, 1 GPU | 8 GPUs |\n"
          "|---|---|---|---|---|---|")
    for name, (prompts, seeds) in PROMPT_SETS.items():
        images = prompts * seeds
        cells = [duration(images * per_image[s] / g) for s in ("sd15", "sdxl") for g in (1, 8)]
        print(f"| {name} ({prompts} × {seeds}) | {images} | " + " | ".join(cells) + " |")


def processes(argv: list[str], n: int, env: dict, tmp: str) -> None:
    """The same evaluation under torchrun with ``n`` CPU processes: wall time, and the scores byte for byte."""
    runs = {}
    for count in (1, n):
        out = Path(tmp) / f"procs{count}"
        launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(count), "--master_port", "29571"] \
            if count > 1 else []
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *launch, "-m", "trainer.evaluate", *argv, "--output-dir", str(out)],
                       cwd=tmp, env=env, check=True, capture_output=True, text=True)
        runs[count] = (time.perf_counter() - t0, (out / "scores.csv").read_bytes())
    same = runs[1][1] == runs[n][1]
    print(f"\n1 process: {runs[1][0]:.1f} s wall; {n} processes (torchrun, gloo): {runs[n][0]:.1f} s wall "
          f"({runs[1][0] / runs[n][0]:.2f}x); scores.csv {'byte for byte the same' if same else 'DIFFERS'}")
    assert same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=None, help="the first N evaluation prompts (default: all 64)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--processes", type=int, default=0, help="also run under torchrun with N CPU processes")
    ap.add_argument("--cost", action="store_true", help="only print images and projected GPU time per arm")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.cost:
        cost()
        return 0
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        lora = random_lora(Path(tmp) / "bench_lora.safetensors")
        argv = ["--lora", str(lora), "--seeds", str(args.seeds)]
        if args.prompts:
            argv += ["--num-prompts", str(args.prompts)]
        # as run: the command line in a fresh process; its own timer writes timings.json
        env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run([sys.executable, "-m", "trainer.evaluate", *argv, "--output-dir", str(Path(tmp) / "cli")],
                       cwd=tmp, env=env, check=True, capture_output=True, text=True)
        cli = json.loads((Path(tmp) / "cli" / "timings.json").read_text())
        # strict: in this process, the libraries already imported
        from trainer.evaluate import EvalConfig, Evaluation

        t0 = time.perf_counter()
        evaluation = Evaluation(EvalConfig.from_args([*argv, "--output-dir", str(Path(tmp) / "strict")]),
                                announce=lambda *a, **k: None)
        phases = evaluation.run()
        total = time.perf_counter() - t0
        assert "## Against the base" in (Path(tmp) / "strict" / "report.md").read_text()
        if args.processes > 1:
            processes(argv, args.processes, env, tmp)
    cfg = evaluation.cfg
    print(f"evaluation of 2 arms × {len(evaluation.prompts)} prompts × {cfg.seeds} seeds on the embedded models "
          f"(DDIM {cfg.steps} steps, {cfg.resolution} px, CPU, {torch.get_num_threads()} thread(s), torch "
          f"{torch.__version__})")
    report("as run (python -m trainer.evaluate, fresh process):", cli, cli["total"])
    report("strict (libraries imported before the clock):", phases, total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
