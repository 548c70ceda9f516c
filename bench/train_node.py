"""LongAlign Train LoRA against the same run of ``python -m trainer.finetune``: the node's overhead, and ComfyUI's
own memory while the child trains.

    COMFYUI_PATH=/path/to/ComfyUI python bench/train_node.py            # with ComfyUI's interpreter
    COMFYUI_PATH=... python bench/train_node.py --steps 20 --pairs 5

A real ComfyUI server (headless, CPU, 127.0.0.1) with the pack installed, as in tests/test_comfy_training.py. The
workload: the built-in tiny models on the CPU (``--model embedded --reward-model embedded`` through the node's
``extra_options``; the node still checks its ``ckpt_name``, an SD1.5-shaped stand-in file), ``--steps`` steps of
the reward stage at 64 px, batch 2, 10 sampling steps, rank 4, two held-out validation prompts, a checkpoint every
5 steps. Each pair runs the node (the clock: POST /prompt to the prompt's history saying done; the node's log
gives its child's own wall time, so "the node beyond its child" — checks, unloading, starting the child, reading
its output, publishing the LoRA, reading the report, the server's queue — is measured within one run, free of
the machine's load swings) and then the same command line the node ran (read from the run's ``node_log.txt``) as
a plain subprocess into another folder. The first ``--warmup`` pairs are not counted. Target: the node's overhead
≤ 5 % of its wall time.

ComfyUI's own memory: the server's resident set (VmRSS) when idle after start-up (the pack imported, no model
loaded), sampled every 0.2 s while the node's child trains (its peak), and after the prompt. The child's own
memory is not ComfyUI's and is not counted.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = ["A lighthouse on a cliff. Waves crash below. Gulls circle the tower at dawn.",
           "A red fox sits on a mossy rock. Behind it a waterfall drops into a green pool.",
           "A market street at dusk. Lanterns hang over the stalls. A cat sleeps on a crate.",
           "An old library with tall shelves. A ladder leans on the books. Dust floats in the light.",
           "A snowy mountain village. Smoke rises from the chimneys. A sled waits by a door.",
           "A desert road at noon. A lone truck raises dust. Mesas stand on the horizon."]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def node_inputs(name: str, steps: int) -> dict:
    return dict(mode="train", ckpt_name="sd15_standin.safetensors", preference_model="tiny_denscore",
                prompts="\n".join(PROMPTS), prompts_file="(none)", lora_name=name, steps=steps, lora_rank=4,
                learning_rate=2e-3, batch_size=2, gradient_accumulation=1, resolution=64, sample_steps=10,
                gradient_steps=5, omega=0.3, seed=0, reward_direction="auto", mixed_precision="no",
                checkpoint_every=5, overwrite=False, strength=1.0, validation_every=0,
                extra_options="--model embedded --reward-model embedded --lr-warmup-steps 0 "
                              "--validation-prompts 2 --validation-steps 10")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1, help="first pairs not counted (they create the embedded "
                                                           "models' cache and warm the disk cache)")
    args = ap.parse_args()
    import torch
    from transformers import CLIPImageProcessor, CLIPModel

    from longalign_core.clip_vocab import load_clip_tokenizer
    from standins import comfy_server as cs
    from standins.comfy_checkpoints import build_tiny_sd15_checkpoint
    from standins.tiny_clip import tiny_clip_config

    base = Path(tempfile.mkdtemp(prefix="longalign-bench-node-"))
    models = base / "models"
    build_tiny_sd15_checkpoint(models / "checkpoints" / "sd15_standin.safetensors")
    torch.manual_seed(1)
    denscore = models / "denscore" / "tiny_denscore"
    CLIPModel(tiny_clip_config()).save_pretrained(denscore, safe_serialization=True)
    load_clip_tokenizer().save_pretrained(denscore)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(denscore)
    cs.install_pack(base / "custom_nodes")
    proc, server = cs.start_comfy(base)
    try:
        time.sleep(3)
        idle = rss_mib(proc.pid)
        print(f"ComfyUI idle after start-up: {idle:.0f} MiB resident")
        rows, peaks = [], []
        for pair in range(args.pairs):
            name = f"bench_{pair}"
            samples, done = [], threading.Event()

            def sample():
                while not done.is_set():
                    samples.append(rss_mib(proc.pid))
                    time.sleep(0.2)

            sampler = threading.Thread(target=sample)
            t0 = time.perf_counter()
            sampler.start()
            server.run({"1": {"class_type": "LongAlignTrainLoRA", "inputs": node_inputs(name, args.steps)}}, name,
                       timeout=3600)
            node = time.perf_counter() - t0
            done.set()
            sampler.join()
            peaks.append(max(samples))
            run_dir = base / "output" / "longalign" / "train" / name
            log_lines = (run_dir / "node_log.txt").read_text().splitlines()
            command = next(line[2:] for line in log_lines if line.startswith("$ "))
            child = float(re.search(r", ([0-9.]+) s\]$", log_lines[-1]).group(1))  # the child's own wall time
            cli_args = shlex.split(command)
            out = cli_args.index("--output-dir") + 1
            cli_args[out] = str(base / "cli" / name)
            env = dict(os.environ, PYTHONPATH=str(base / "custom_nodes" / cs.PACK_NAME))
            t0 = time.perf_counter()
            subprocess.run(cli_args, cwd=base / "custom_nodes" / cs.PACK_NAME, env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cli = time.perf_counter() - t0
            if pair >= args.warmup:
                rows.append((node, child, cli))
            print(f"pair {pair}{' (warm-up, not counted)' if pair < args.warmup else ''}: node {node:.2f} s "
                  f"(its child {child:.2f} s, the node beyond it {node - child:.2f} s), CLI {cli:.2f} s; ComfyUI "
                  f"resident while training: peak {peaks[-1]:.0f} MiB")
        after = rss_mib(proc.pid)
        n = len(rows)
        node_mean, child_mean, cli_mean = (sum(r[i] for r in rows) / n for i in range(3))
        print(f"\n| runs | node (POST to done) | its child | the node beyond its child | the same CLI run |\n"
              f"|---|---|---|---|---|\n| {n} × {args.steps} steps | {node_mean:.2f} s | {child_mean:.2f} s | "
              f"{node_mean - child_mean:.2f} s = {(node_mean - child_mean) / node_mean:.1%} | {cli_mean:.2f} s "
              f"(node − CLI: {node_mean - cli_mean:+.2f} s = {(node_mean - cli_mean) / node_mean:+.1%}) |")
        print(f"\nComfyUI resident: idle {idle:.0f} MiB, peak while the child trained {max(peaks):.0f} MiB "
              f"(+{max(peaks) - idle:.0f} MiB), after {after:.0f} MiB")
    finally:
        cs.stop_comfy(proc)
        import shutil

        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
