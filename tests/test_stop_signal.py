"""A stop keeps the work (issue 26 item 2): SIGTERM / SIGINT to a real ``python -m trainer.finetune`` finishes the
step under way, checkpoints it (whatever --checkpoint-every says), prints the command that resumes, exits 143 /
130, and the resumed run ends with the LoRA of an uninterrupted one, bit for bit; the same for the evaluation's
prompt groups and its scores.csv; a second signal stops at once and leaves no temporary file."""

from __future__ import annotations

import csv
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from trainer.checkpoints import checkpoints
from trainer.stop_signal import StopNow, StopSignal, Stopped, resume_command, run_stoppable
from trainer_support import FAST, one_thread  # noqa: F401  (autouse fixture)

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
#: 8 steps, no periodic checkpoint before the end: a checkpoint after a stop can only be the stop's.
TRAIN = [*FAST, "--train-steps", "8", "--checkpoint-every", "100", "--checkpoints-keep", "10", "--seed", "3"]


def start(module: str, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def logged_steps(out: Path) -> list[int]:
    path = out / "train_log.csv"
    if not path.is_file():
        return []
    return [int(r["step"]) for r in csv.DictReader(path.open()) if r.get("step", "").isdigit()]


def wait_until(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the signal could be sent"


def temporary_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


def resume_line(stderr: str, prog: str) -> list[str]:
    """The command of the one "stopped by …; … Resume with: COMMAND" line, runnable here."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith(f"{prog}: stopped by ")]
    assert len(lines) == 1, stderr[-3000:]
    command = shlex.split(lines[0].split("Resume with: ", 1)[1])
    assert command[:3] == ["python", "-m", prog.split()[-1]]
    return [sys.executable, *command[1:]]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_checkpoints_the_step_under_way_and_the_resumed_lora_is_bit_identical(tmp_path, signum):
    straight = subprocess.run([sys.executable, "-m", "trainer.finetune", "--output-dir", str(tmp_path / "straight"),
                               *TRAIN], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "stopped"
    proc = start("trainer.finetune", ["--output-dir", str(out), *TRAIN])
    wait_until(proc, lambda: 2 in logged_steps(out))
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err[-3000:]  # 143 / 130, as docs/trainer.md says
    steps = logged_steps(out)
    n = steps[-1]
    assert steps == list(range(1, n + 1)) and 2 <= n < 8, steps  # the step under way finished and was logged
    assert [p.name for p in checkpoints(out)] == [f"checkpoint-{n:06d}"]  # 100 does not divide it
    assert not (out / "longalign_lora.safetensors").exists() and not temporary_files(out)
    command = resume_line(err, "python -m trainer.finetune")
    assert command[-2:] == ["--resume", "latest"] and "--output-dir" in command
    resumed = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {n}" in resumed.stdout + resumed.stderr
    a = load_file(str(tmp_path / "straight" / "longalign_lora.safetensors"))
    b = load_file(str(out / "longalign_lora.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert logged_steps(out) == list(range(1, 9))


def worker_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (its children, by their RANK environment variable)."""
    found = {}
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    for pid in (children.read_text().split() if children.exists() else []):
        try:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(pid)
    return found


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc (Linux)")
def test_a_signal_to_one_of_two_processes_stops_both_after_the_same_step(tmp_path):
    """torchrun, 2 CPU processes; SIGTERM to rank 1 only: the stop is agreed each step, so both ranks write the
    checkpoint of the same step together (no rank waits for the other forever) and the main one says how to
    resume."""
    out = tmp_path / "ddp"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29561", "-m", "trainer.finetune", "--output-dir", str(out), *TRAIN], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(proc, lambda: 1 in logged_steps(out))
    ranks = worker_pids(proc)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    steps = logged_steps(out)
    n = steps[-1]
    assert steps == list(range(1, n + 1)) and n < 8, (steps, err[-3000:])
    assert [p.name for p in checkpoints(out)] == [f"checkpoint-{n:06d}"], err[-3000:]
    assert len(list((checkpoints(out)[0]).glob("random_states_*.pkl"))) == 2  # both ranks saved theirs
    assert err.count("python -m trainer.finetune: stopped by SIGTERM") == 1  # the main process's line only
    assert "Resume with: the same launcher (2 processes) running python -m trainer.finetune" in err
    assert not temporary_files(out)


def test_a_second_signal_stops_at_once_and_leaves_no_temporary_file(tmp_path):
    """A slow step (40 DDIM steps): the second SIGTERM lands inside it, and the run ends there, without
    finishing or checkpointing it."""
    out = tmp_path / "run"
    proc = start("trainer.finetune", ["--output-dir", str(out), *TRAIN, "--sample-steps", "40"])
    wait_until(proc, lambda: 1 in logged_steps(out))
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped at once by a second SIGTERM" in err and "Traceback" not in err
    assert logged_steps(out) == [1]  # step 2 was under way: not finished, not logged, not checkpointed
    assert checkpoints(out) == [] and not temporary_files(out)


def test_sigint_in_the_evaluation_then_resume_gives_the_same_scores(tmp_path):
    from test_evaluate import PROMPTS, random_lora
    from trainer.loading.embedded import embedded_pipeline_dir

    prompts = tmp_path / "prompts.txt"  # 12 prompts, one group each per arm: 24 groups
    prompts.write_text("".join(f"{p} Number {k}.\n" for k in range(4) for p in PROMPTS))
    lora = random_lora(tmp_path / "a.safetensors", embedded_pipeline_dir(0) / "unet", 1)
    args = ["--steps", "2", "--resolution", "32", "--seeds", "1", "--batch-size", "1", "--bootstrap", "200",
            "--prompts", str(prompts), "--lora", str(lora)]
    whole = subprocess.run([sys.executable, "-m", "trainer.evaluate", *args, "--output-dir", str(tmp_path / "whole")],
                           cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "cut"
    proc = start("trainer.evaluate", [*args, "--output-dir", str(out)])
    scores = out / "scores.csv"
    wait_until(proc, lambda: scores.is_file() and scores.read_text().count("\n") > 1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    written = scores.read_text()
    full = (tmp_path / "whole" / "scores.csv").read_text()
    assert full.startswith(written) and written != full  # whole groups, and not all of them
    assert not (out / "report.md").exists() and not temporary_files(out)
    command = resume_line(err, "python -m trainer.evaluate")
    assert command[-1] == "--resume"
    resumed = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert scores.read_text().startswith(written)  # the groups written before the stop are kept as they were
    assert scores.read_text() == full  # byte for byte (scores depend on their arm, prompt and seed alone)


# ------------------------------------------------------------------------------------------------------------
# The module itself


def test_handlers_are_restored_and_a_signal_before_arming_stops_at_once():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopSignal("the test") as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        with pytest.raises(StopNow, match="during start-up") as info:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert info.value.exit_code == 143 and stop.requested is None
        stop.arm()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert stop.requested == signal.SIGINT  # the first one after arming: a request, no exception
        with pytest.raises(StopNow, match="second SIGINT") as info:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert info.value.exit_code == 130
    assert {s: signal.getsignal(s) for s in before} == before


def test_run_stoppable_prints_one_line_and_returns_the_code(capsys):
    def work(stop):
        raise Stopped(signal.SIGTERM, "3 of 6 groups are written", ["--resume"])

    assert run_stoppable(work, "x", "python -m trainer.evaluate", ["--seeds", "2", "--resume"]) == 143
    err = capsys.readouterr().err
    assert err == ("python -m trainer.evaluate: stopped by SIGTERM; 3 of 6 groups are written. Resume with: "
                   "python -m trainer.evaluate --seeds 2 --resume\n")


def test_resume_command_replaces_an_earlier_resume():
    latest = ["--resume", "latest"]
    assert resume_command("p", ["--resume", "out/ckpt-4", "--seed", "1"], latest) == "p --seed 1 --resume latest"
    assert resume_command("p", ["--resume=latest", "--prompts", "a b.txt"], latest) == \
        "p --prompts 'a b.txt' --resume latest"
    assert resume_command("p", ["--resume", "--seeds", "2"], ["--resume"]) == "p --seeds 2 --resume"


def test_the_stop_is_agreed_over_processes():
    """With several processes every one asks at the same point of the step; one that received the signal makes
    all of them stop (an accelerate stand-in whose gather returns every process's value, as gloo/NCCL would)."""
    from types import SimpleNamespace

    def acc(others: list[int]):
        return SimpleNamespace(num_processes=1 + len(others), device=torch.device("cpu"),
                               gather=lambda t: torch.cat([t, torch.tensor(others, dtype=t.dtype)]))

    stop = StopSignal("the step under way")
    assert stop.agreed(acc([0, 0])) is None
    assert stop.agreed(acc([0, int(signal.SIGTERM)])) == signal.SIGTERM  # another process received it
    stop.requested = signal.SIGINT
    assert stop.agreed(acc([0])) == signal.SIGINT
