"""A full disk is named (issue 26 item 3): a write failing for lack of space or an I/O error ends with one paragraph
naming the path and the free space, the last good checkpoint intact and no temporary file left; a run whose
output folder cannot hold a checkpoint and the LoRA is refused up front; damaged files a resume reads are named;
a truncated training image is named before a model loads.

The real full disk is a small tmpfs mounted by the test (skipped, saying why, where mounting is not allowed);
the finer paths inject ENOSPC."""

from __future__ import annotations

import errno
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from longalign_core.errors import DiskFullError, run_cli
from longalign_core.io_utils import append_text, atomic_path
from trainer.checkpoints import checkpoints
from trainer_support import FAST, one_thread, run_cli_cases  # noqa: F401  (autouse fixture)

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 24 MiB at ``tmp_path/disk`` (root and mount(2) needed: skipped otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill ({done.stderr.strip() or 'mount failed'})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path, leave: int) -> Path:
    """A file that leaves ``leave`` bytes free on ``folder``'s filesystem."""
    import shutil

    filler = folder / "filler"
    with filler.open("wb") as f:
        f.write(b"\0" * max(0, shutil.disk_usage(folder).free - leave))
    return filler


def leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def one_paragraph(stderr: str, prog: str = "python -m trainer.finetune") -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith(f"{prog}: error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------------------------
# A real full disk


def test_a_disk_too_small_for_one_checkpoint_is_refused_before_the_first_step(small_disk):
    fill(small_disk, 1 << 20)  # 1 MiB free: less than a checkpoint (about 1 MiB) + the LoRA + the margin
    out = small_disk / "run"
    proc = subprocess.run([sys.executable, "-m", "trainer.finetune", "--output-dir", str(out), *FAST,
                           "--train-steps", "4"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    line = one_paragraph(proc.stderr)
    assert re.search(rf"--output-dir {out}: {out} has (1\.0 MiB|10\d\d\.\d KiB|9\d\d\.\d KiB) free, and this run "
                     rf"needs at least 1[78]\.\d MiB \(one checkpoint, about 1\.\d MiB", line), line
    assert "refused before the first step" in line
    assert not (out / "train_log.csv").exists() and checkpoints(out) == []


def test_the_disk_filling_during_a_run_is_named_and_the_last_checkpoint_resumes(tmp_path, small_disk):
    args = [*FAST, "--train-steps", "6", "--checkpoint-every", "2", "--checkpoints-keep", "1", "--seed", "5",
            "--sample-steps", "8"]
    straight = subprocess.run([sys.executable, "-m", "trainer.finetune", "--output-dir", str(tmp_path / "straight"),
                               *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = small_disk / "run"
    proc = subprocess.Popen([sys.executable, "-m", "trainer.finetune", "--output-dir", str(out), *args], cwd=REPO,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not checkpoints(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    filler = fill(small_disk, 48 << 10)  # room for a few log rows, not for the step-4 checkpoint (about 1 MiB)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    line = one_paragraph(err)
    assert f"writing {out / 'checkpoints' / 'checkpoint-000004.tmp'} failed: the disk is full" in line
    assert f"{out / 'checkpoints'} has " in line and " KiB free" in line
    assert f"The last complete checkpoint, {out / 'checkpoints' / 'checkpoint-000002'}, is intact" in line
    assert [p.name for p in checkpoints(out)] == ["checkpoint-000002"] and not leftovers(out)
    filler.unlink()
    command = shlex.split(line.split("resume with: ", 1)[1])
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=REPO, env=ENV, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(str(tmp_path / "straight" / "longalign_lora.safetensors"))
    b = load_file(str(out / "longalign_lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_append_that_fills_the_disk_is_cut_back_to_whole_rows(small_disk):
    log = small_disk / "log.csv"
    log.write_text("step,loss\n1,0.5\n")
    fill(small_disk, 4096)
    with pytest.raises(DiskFullError, match=rf"writing {log} failed: the disk is full .*; {small_disk} has "):
        append_text(log, "2,0.25\n" * 4000)  # 28 KB: the first 4 KiB get written, then ENOSPC
    assert log.read_text() == "step,loss\n1,0.5\n"


# ------------------------------------------------------------------------------------------------------------
# Injected failures: the atomic writer, the CLI boundary, the evaluation's writes


@pytest.mark.parametrize("failure, said", [
    (ENOSPC, "the disk is full (or over quota)"),
    (OSError(errno.EIO, "Input/output error"), "an I/O error"),
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), "the disk is full ("),
    (RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file "
                  "write failed"), "the disk is full or failing")], ids=["ENOSPC", "EIO", "safetensors", "torch.save"])
def test_the_atomic_writer_names_the_path_and_keeps_the_old_file(tmp_path, failure, said):
    target = tmp_path / "lora.safetensors"
    target.write_text("the good one")
    with pytest.raises(DiskFullError) as info:
        with atomic_path(target) as tmp:
            Path(tmp).write_text("half")
            raise failure
    text = str(info.value)
    assert text.startswith(f"writing {target} failed: {said}") and f"; {tmp_path} has " in text and " free." in text
    assert target.read_text() == "the good one" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_other_failures_pass_through_the_atomic_writer(tmp_path):
    with pytest.raises(ValueError, match="a bug"):
        with atomic_path(tmp_path / "x.json"):
            raise ValueError("a bug")
    assert list(tmp_path.iterdir()) == []


def test_the_cli_boundary_names_a_disk_error_raised_anywhere(tmp_path, capsys):
    def library_write(_argv):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "logs" / "events.out"))

    assert run_cli(library_write, [], prog="prog") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prog: error: writing {tmp_path / 'logs' / 'events.out'} failed: the disk is full")
    assert f"{tmp_path} has " in err and err.count("\n") == 1

    def stream_write(_argv):
        raise RuntimeError("basic_ios::clear: iostream error")

    assert run_cli(stream_write, [], prog="prog") == 2
    assert "prog: error: a write failed: basic_ios::clear: iostream error (the disk is full or failing" in \
        capsys.readouterr().err

    def bug(_argv):
        raise RuntimeError("an ordinary bug")

    with pytest.raises(RuntimeError, match="an ordinary bug"):
        run_cli(bug, [], prog="prog")


def test_the_evaluation_names_a_full_disk_for_its_images_and_scores_and_resumes(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from test_evaluate import FAST as EVAL_FAST, PROMPTS
    from trainer.evaluate import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = [*EVAL_FAST, "--prompts", str(prompts), "--batch-size", "2"]  # one prompt a group: 3 groups
    assert run_cli(main, [*args, "--output-dir", str(tmp_path / "whole")]) == 0
    capsys.readouterr()

    out = tmp_path / "png"
    monkeypatch.setattr(Image.Image, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    assert run_cli(main, [*args, "--output-dir", str(out)], prog="python -m trainer.evaluate") == 2
    line = one_paragraph(capsys.readouterr().err, "python -m trainer.evaluate")
    assert f"writing {out / 'images' / 'base' / 'p000-s0.png'} failed: the disk is full" in line
    assert not leftovers(out) and not [p for p in out.rglob(".*")]
    monkeypatch.undo()

    out = tmp_path / "csv"
    calls = []

    def append_fails_second(path, text):
        calls.append(path)
        if len(calls) == 2:
            raise DiskFullError(f"writing {path} failed: the disk is full (injected)")
        append_text(path, text)

    import longalign_core.io_utils as io_utils

    monkeypatch.setattr(io_utils, "append_text", append_fails_second)  # evaluate imports it where it is used
    assert run_cli(main, [*args, "--output-dir", str(out)], prog="python -m trainer.evaluate") == 2
    line = one_paragraph(capsys.readouterr().err, "python -m trainer.evaluate")
    assert f"writing {out / 'scores.csv'} failed" in line and f"{out / 'scores.csv'} are kept" in line
    assert line.endswith(f"continue with: python -m trainer.evaluate {shlex.join(args)} --output-dir {out} --resume")
    monkeypatch.undo()
    assert run_cli(main, [*args, "--output-dir", str(out), "--resume"]) == 0
    assert (out / "scores.csv").read_text() == (tmp_path / "whole" / "scores.csv").read_text()


# ------------------------------------------------------------------------------------------------------------
# Damaged files a resume reads


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from test_evaluate import FAST as EVAL_FAST, PROMPTS
    from trainer.evaluate import main

    folder = tmp_path_factory.mktemp("evaluated")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    args = [*EVAL_FAST, "--prompts", str(folder / "prompts.txt"), "--output-dir", str(folder / "out")]
    assert run_cli(main, args) == 0
    return folder, args


@pytest.mark.parametrize("damage", ["settings_not_json", "settings_binary", "scores_nul", "scores_binary",
                                    "scores_header"])
def test_damaged_evaluation_files_are_named_on_resume(tmp_path, evaluated, damage, capsys):
    import shutil

    from trainer.evaluate import main

    folder, args = evaluated
    out = tmp_path / "out"
    shutil.copytree(folder / "out", out)
    args = [a if a != str(folder / "out") else str(out) for a in args]
    settings, scores = out / "evaluation.json", out / "scores.csv"
    lines = scores.read_bytes().split(b"\n")
    write, expected = {
        "settings_not_json": (lambda: settings.write_text('{"model": "x", "seeds"'),
                              rf"{settings}:1: the evaluation's settings file is damaged \(not valid JSON: .*restore "
                              rf"it from a copy, or start again in another --output-dir"),
        "settings_binary": (lambda: settings.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe"),
                            rf"{settings}:1: the evaluation's settings file is damaged \(not UTF-8 text at byte 0\)"),
        "scores_nul": (lambda: scores.write_bytes(b"\n".join(lines[:3]) + b"\n" + b"\0" * 300),
                       rf"{scores}:4: scores.csv is damaged \(NUL bytes.*delete that line and every one after it"),
        "scores_binary": (lambda: scores.write_bytes(b"\n".join(lines[:2]) + b"\n\xff\xfe\x00garbage\n"),
                          rf"{scores}:3: scores.csv is damaged \(not UTF-8 text"),
        "scores_header": (lambda: scores.write_bytes(b"arm,lo\xc3\xa9\n" + b"\n".join(lines[1:])),
                          rf"{scores}:1: scores.csv is damaged \(its header is"),
    }[damage]
    write()
    damaged = (settings if damage.startswith("settings") else scores).read_bytes()
    for extra in (["--resume"], ["--report-only"]):  # the report reads both files too
        assert run_cli(main, [*args, *extra], prog="python -m trainer.evaluate") == 2, extra
        line = one_paragraph(capsys.readouterr().err, "python -m trainer.evaluate")
        assert re.search(expected, line), line
    assert (settings if damage.startswith("settings") else scores).read_bytes() == damaged  # named, not rewritten


def test_a_damaged_training_log_is_named_on_resume(tmp_path, capsys):
    from trainer.config import TrainConfig
    from trainer.finetune import Trainer, main

    args = ["--output-dir", str(tmp_path / "run"), *FAST, "--train-steps", "2", "--checkpoint-every", "1"]
    Trainer(TrainConfig.from_args(args)).train()
    log = tmp_path / "run" / "train_log.csv"
    log.write_bytes(log.read_bytes()[:40] + b"\xff\xfe\0\0")
    assert run_cli(main, [*args, "--train-steps", "3", "--resume", "latest"], prog="python -m trainer.finetune") == 2
    line = one_paragraph(capsys.readouterr().err)
    assert f"{log} is damaged (" in line and "delete it (the rows before the checkpoint are lost" in line


# ------------------------------------------------------------------------------------------------------------
# Training images: named before a model loads


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"A cat number {i}. A dog in the garden.")
    return folder


def test_a_truncated_image_is_named_before_a_model_loads_held_out_or_not(tmp_path, image_folder):
    """One PNG of four cut short, each in turn (one of them is the held-out validation row, which was never
    checked), and a JPEG cut in half (PIL's verify passes it: it has no checksums)."""
    import shutil

    from PIL import Image

    cases, cut = {}, {}
    for i in range(5):
        folder = tmp_path / f"case{i}"
        shutil.copytree(image_folder, folder)
        if i == 4:
            (folder / "3.png").unlink()
            with Image.open(image_folder / "3.png") as img:
                img.save(folder / "3.jpg", quality=90)
            cut[i] = folder / "3.jpg"
        else:
            cut[i] = folder / f"{i}.png"
        data = cut[i].read_bytes()
        cut[i].write_bytes(data[: len(data) // 2])
        cases[str(i)] = ["--stage", "align", "--prompts", str(folder), "--output-dir", str(tmp_path / f"out{i}"),
                         *FAST, "--validation-prompts", "1", "--train-steps", "2"]
    runs = run_cli_cases(cases)
    for i, run in runs.items():
        assert run.returncode == 2, (i, run.stdout[-2000:], run.stderr[-2000:])
        line = one_paragraph(run.stderr)
        assert f"{cut[int(i)]}: the image cannot be read" in line and "truncated or not an image" in line
        assert "Running training" not in run.stdout and not (tmp_path / f"out{i}").exists()  # nothing loaded


# ------------------------------------------------------------------------------------------------------------
# The dry run's disk estimate, and the checkpoint size worked out before one is written


def test_the_dry_run_reports_the_disk_and_the_estimate_covers_a_real_checkpoint(tmp_path):
    from trainer.config import TrainConfig
    from trainer.disk import checkpoint_bytes
    from trainer.finetune import Trainer, dry_run

    cfg = TrainConfig.from_args(["--output-dir", str(tmp_path / "run"), *FAST, "--train-steps", "40",
                                 "--checkpoint-every", "10", "--checkpoints-keep", "2", "--validation-every", "20"])
    result = dry_run(cfg)
    measured = result["checkpoint_bytes"]
    disk = result["disk"]
    # steps 10, 20 and 30 checkpoint; 2 kept plus the one being written: 3 at once
    assert disk["checkpoints"] == 3 * measured
    assert disk["validation images"] > 0 and result["validations"] == 3  # steps 0, 20 and 40
    assert disk["logs"] == 40 * 1024 and disk["total"] == sum(v for k, v in disk.items() if k != "total")
    assert 100_000 < disk["LoRA"] < measured
    assert "**Disk: " in result["report"] and f"in {tmp_path / 'run'} at most" in result["report"]
    assert "free" in result["report"].split("**Disk: ")[1].split("\n")[0]
    # the size check before the first step works the checkpoint out from what trains: at least the real one,
    # not far above it
    run = Trainer(TrainConfig.from_args(["--output-dir", str(tmp_path / "other"), *FAST]))
    estimate = checkpoint_bytes(run.parts.lora, run.acc.num_processes)
    assert measured <= estimate <= 1.15 * measured, (estimate, measured)
