"""Shared pieces of the trainer tests: fast settings, long captions with known token counts, CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

#: A few seconds per step on the built-in tiny pipeline at 32 px.
FAST = ["--resolution", "32", "--dataloader-workers", "0", "--sample-steps", "4", "--sample-grad-steps", "2", "--train-batch-size", "2",
        "--validation-prompts", "1", "--validation-steps", "2", "--validation-every", "0", "--lora-rank", "4",
        "--learning-rate", "1e-3", "--lr-warmup-steps", "0"]

SENTENCES = ["A red fox sits on a mossy rock near the river bank", "Behind it a waterfall drops into a deep pool",
             "The sky is orange and the sea is calm tonight", "A lighthouse keeper climbs the winding stairs",
             "Gulls circle above the fishing boats in the harbour", "Soft morning light falls across the old bridge"]


@pytest.fixture(autouse=True)
def one_thread():
    """The test machine is shared: one intra-op thread is several times faster than two under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def long_caption(target_tokens: int, offset: int = 0) -> str:
    """Plain sentences (each well under CLIP's 75-token window) until the merged length reaches the target."""
    out, k = [], offset
    while merged_tokens(". ".join(out) + ".") < target_tokens if out else True:
        out.append(SENTENCES[k % len(SENTENCES)])
        k += 1
    return ". ".join(out) + "."


def merged_tokens(caption: str) -> int:
    """Independent count of the merged CLIP tokens of a caption of plain sentences: per sentence one start token
    plus its content tokens (the real CLIP tokenizer, no special tokens)."""
    from longalign_core.clip_vocab import load_clip_tokenizer

    tok = load_clip_tokenizer()
    sentences = [s.strip() + "." for s in caption.split(".") if s.strip()]
    return sum(1 + len(tok(s, add_special_tokens=False)["input_ids"]) for s in sentences)


def run_module(args: list[str], timeout: float = 600, nproc: int = 1, port: int = 29531):
    """``python -m trainer.finetune ARGS`` (or under torchrun with ``nproc`` CPU processes)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(port), "-m", "trainer.finetune", *args]
    else:
        cmd = [sys.executable, "-m", "trainer.finetune", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


#: Runs each case through ``trainer.finetune.cli`` (what ``python -m trainer.finetune`` calls) in this one process,
#: with its own stdout and stderr, and prints them as JSON.
_CASES = r"""
import contextlib, io, json, sys
from trainer.finetune import cli
out = {}
for name, argv in json.loads(sys.stdin.read()).items():
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            rc = cli(argv)
        except SystemExit as exc:
            rc = exc.code
    out[name] = {"returncode": rc, "stdout": o.getvalue(), "stderr": e.getvalue()}
print("CASES " + json.dumps(out))
"""


def run_cli_cases(cases: dict[str, list[str]], timeout: float = 600) -> dict:
    """Several ``python -m trainer.finetune`` invocations that end early (user mistakes) in one fresh interpreter:
    {name: object with returncode, stdout, stderr}. One start-up instead of one per case."""
    import json
    from types import SimpleNamespace

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _CASES], cwd=REPO, env=env, capture_output=True, text=True,
                          input=json.dumps(cases), timeout=timeout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("CASES ")), None)
    assert proc.returncode == 0 and line, (proc.stdout + proc.stderr)[-3000:]
    return {k: SimpleNamespace(**v) for k, v in json.loads(line[len("CASES "):]).items()}


def reward_loss(trainer, prompts: list[str], gen: torch.Generator, dump: dict | None = None):
    """The reward loss of ``prompts`` with the run's parts and the V the run's loop would give a step of them."""
    from trainer import objective

    parts = trainer.parts
    return objective.reward_loss(trainer.cfg, trainer.acc, parts.lora, parts.text, parts.base, parts.scoring.judge,
                                 prompts, gen, parts.scoring.reward_v.for_prompts(prompts), dump)


def align_loss(trainer, batch, gen: torch.Generator):
    """The align-stage loss of ``batch`` with the run's parts."""
    from trainer import objective

    parts = trainer.parts
    return objective.align_loss(trainer.cfg, trainer.acc, parts.lora, parts.text, parts.base, batch, gen)


def align_batch(trainer, step: int, micro: int = 0):
    """The align-stage micro-batch the loop takes at (step, micro) on this process."""
    return trainer.parts.data.align.batch(step, micro, trainer.acc.process_index, trainer.acc.num_processes)
