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
    from trainer.embedded import embedded_pipeline_dir

    targets = lora_targets(embedded_pipeline_dir(seed) / "unet")
    g = torch.Generator().manual_seed(1234)
    pairs = {}
    for t in targets:
        conv = (1, 1) if t.kind == "conv" else ()
        pairs[t.path] = (torch.randn((t.weight_shape[0], 4, *conv), generator=g) * 0.05,
                         torch.randn((4, *t.weight_shape[1:]), generator=g) * 0.05)
    return save_kohya(pairs, path, {"format": "kohya"})


def report(title: str, phases: dict, total: float) -> float:
    from trainer.eval_report import GENERATION_PHASES

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=None, help="the first N evaluation prompts (default: all 64)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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
    cfg = evaluation.cfg
    print(f"evaluation of 2 arms × {len(evaluation.prompts)} prompts × {cfg.seeds} seeds on the embedded models "
          f"(DDIM {cfg.steps} steps, {cfg.resolution} px, CPU, {torch.get_num_threads()} thread(s), torch "
          f"{torch.__version__})")
    report("as run (python -m trainer.evaluate, fresh process):", cli, cli["total"])
    report("strict (libraries imported before the clock):", phases, total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
