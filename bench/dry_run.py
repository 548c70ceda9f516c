"""Benchmark: how close ``--dry-run``'s projected run time comes to the run it projects.

    python bench/dry_run.py                     # the embedded SD1.5 demo, 5 steps
    python bench/dry_run.py --model embedded-sdxl --train-steps 10

Both halves run the shipped code in fresh processes with the same options (the CPU demo profile, ``--train-steps``
steps, a checkpoint and validations as the profile sets them): one ``trainer.finetune.dry_run`` (its projection:
start-up (interpreter and imports, the process's age when the dry run begins) + loading + the first step's warm-up
+ steps × the measured step + validations + checkpoints + writing the outputs), one real ``Trainer(cfg).train()``
timed from the launch of its process to its exit, as a user waits for it. Target: the projection within 25 % of
the real run.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def single(mode: str, flags: list[str]) -> dict:
    from trainer.config import TrainConfig
    from trainer.finetune import Trainer

    cfg = TrainConfig.from_args(flags)
    if mode == "dry":
        from trainer.dry_run import process_age
        from trainer.finetune import dry_run

        r = dry_run(cfg, startup=process_age())
        return {"projected": r["total_seconds"], "startup": r["startup_seconds"], "load": r["load_seconds"],
                "warmup": max(0.0, r["step"]["warmup_seconds"] - r["step"]["seconds"]),
                "step": r["step"]["seconds"], "validation": r["validation_seconds"],
                "validations": r["validations"], "checkpoints": r["checkpoints"],
                "checkpoint": r["checkpoint_seconds"], "outputs": r["outputs_seconds"]}
    Trainer(cfg).train()
    return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded", choices=["embedded", "embedded-sdxl"])
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--single", choices=["dry", "real"], help=argparse.SUPPRESS)
    ap.add_argument("--flags", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.single:
        print(json.dumps(single(args.single, json.loads(args.flags))))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("dry", "real"):
            flags = ["--model", args.model, "--train-steps", str(args.train_steps), "--checkpoint-every", "2",
                     "--validation-every", "0", "--output-dir", str(Path(tmp) / mode)]
            t0 = time.perf_counter()  # the real run: from its process's launch to its exit
            out = subprocess.run([sys.executable, __file__, "--single", mode, "--flags", json.dumps(flags)],
                                 capture_output=True, text=True, cwd=REPO, env={**os.environ})
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            results.update(json.loads(out.stdout.strip().splitlines()[-1]))
            if mode == "real":
                results["real"] = time.perf_counter() - t0
    r = results
    print(f"[--dry-run vs the run, {args.model}, {args.train_steps} steps, demo profile, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}]")
    print(f"  projected {r['projected']:.1f} s = start-up {r['startup']:.1f} s + loading {r['load']:.1f} s + warm-up "
          f"{r['warmup']:.1f} s + {args.train_steps} × {r['step']:.2f} s + {r['validations']} × "
          f"{r['validation']:.2f} s validation + {r['checkpoints']} × {r['checkpoint']:.2f} s checkpoint + outputs "
          f"{r['outputs']:.1f} s")
    print(f"  real run {r['real']:.1f} s -> projection / real = {r['projected'] / r['real']:.2f} "
          f"(target within 25 %: 0.75..1.25)")


if __name__ == "__main__":
    main()
