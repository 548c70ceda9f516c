"""The training nodes' ComfyUI-free half: the child-process runner (progress lines, Cancel, how a child ended) and
the node inputs turned into the trainer's and the evaluation's options, checked against their own parsers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from longalign_core import child_process as cp
from longalign_core import training_job as job
from longalign_core.errors import BadInputError
from longalign_core.run_folder import CHECKPOINT_STATE_FILE

NODE_INPUTS = dict(mode="train", checkpoint="/m/sd15.safetensors", preference_model="/m/denscore/Denscore",
                   prompts_path="/runs/x/prompts.txt", output_dir="/runs/x", steps=7, lora_rank=6,
                   learning_rate=2.5e-4, batch_size=3, gradient_accumulation=2, resolution=128, sample_steps=12,
                   gradient_steps=4, omega=0.45, seed=11, reward_direction="training", mixed_precision="bf16",
                   checkpoint_every=5, validation_every=3)


# -- the options ------------------------------------------------------------------------------------------------


def test_train_arguments_are_read_by_the_trainer_as_the_node_meant():
    from trainer.config import TrainConfig

    cfg = TrainConfig.from_args(job.train_arguments(**NODE_INPUTS))
    assert (cfg.model, cfg.reward_model, cfg.prompts, cfg.output_dir) == (
        "/m/sd15.safetensors", "/m/denscore/Denscore", "/runs/x/prompts.txt", "/runs/x")
    assert (cfg.train_steps, cfg.lora_rank, cfg.learning_rate, cfg.train_batch_size,
            cfg.gradient_accumulation_steps, cfg.resolution, cfg.sample_steps, cfg.sample_grad_steps,
            cfg.reward_omega, cfg.seed, cfg.reward_direction, cfg.mixed_precision, cfg.checkpoint_every,
            cfg.validation_every) == (7, 6, 2.5e-4, 3, 2, 128, 12, 4, 0.45, 11, "training", "bf16", 5, 3)
    assert cfg.resume is None and cfg.dry_run is False


def test_modes_zero_and_auto_and_extra_options():
    from trainer.config import TrainConfig

    auto = dict(NODE_INPUTS, resolution=0, mixed_precision="auto")
    assert TrainConfig.from_args(job.train_arguments(**dict(auto, mode="resume"))).resume == "latest"
    fit = TrainConfig.from_args(job.train_arguments(**dict(auto, mode="will it fit")))
    assert fit.dry_run is True and fit.resolution is None and fit.mixed_precision is None
    extra = job.extra_arguments("--lr-warmup-steps 0 --seed 99 --prompts 'a b.txt'")
    cfg = TrainConfig.from_args(job.train_arguments(**NODE_INPUTS, extra=extra))
    assert (cfg.lr_warmup_steps, cfg.seed, cfg.prompts) == (0, 99, "a b.txt")  # extra options come last
    with pytest.raises(BadInputError, match="extra_options"):
        job.extra_arguments("--prompts 'unclosed")


def test_node_defaults_are_the_trainers_and_the_evaluations():
    import dataclasses

    from trainer.config import TrainConfig
    from trainer.evaluate.config import EvalConfig

    train = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert job.TRAIN_DEFAULTS == {k: train[k] for k in job.TRAIN_DEFAULTS}
    evaluate = {f.name: f.default for f in dataclasses.fields(EvalConfig)}
    assert job.EVALUATE_DEFAULTS == {k: evaluate[k] for k in job.EVALUATE_DEFAULTS}
    from trainer.config import CHOICES

    assert job.REWARD_DIRECTIONS == CHOICES["reward_direction"]
    assert job.MIXED_PRECISIONS == ("auto", *CHOICES["mixed_precision"])


def test_evaluate_arguments_are_read_by_the_evaluation():
    from trainer.evaluate.config import EvalConfig

    args = job.evaluate_arguments(mode="resume", checkpoint="/m/sd.safetensors",
                                  loras=[("/l/a.safetensors", 1.0), ("/l/b.safetensors", 0.5)],
                                  preference_model="/m/d", prompts_path=None, num_prompts=0, seeds=3, steps=0, seed=4,
                                  output_dir="/o/e", resolution=64)
    cfg = EvalConfig.from_args(args)
    assert cfg.lora == ["/l/a.safetensors:1.0", "/l/b.safetensors:0.5"] and cfg.resume is True
    assert (cfg.num_prompts, cfg.steps, cfg.prompts, cfg.seeds, cfg.seed, cfg.resolution) == \
        (None, None, None, 3, 4, 64)
    from trainer.evaluate.arms import parse_lora_spec

    assert parse_lora_spec(cfg.lora[1]) == ("/l/b.safetensors", 0.5)


def test_lora_names():
    assert job.clean_lora_name(" my_lora.safetensors ") == "my_lora"
    assert job.clean_lora_name("v2-run.3") == "v2-run.3"
    for bad in ("", "  ", "../x", "a/b", "a\\b", "c:x", "what?", ".."):
        with pytest.raises(BadInputError, match="lora_name"):
            job.clean_lora_name(bad)


def test_training_prompts(tmp_path):
    with pytest.raises(BadInputError, match="no training prompts"):
        job.training_prompts_file("  \n\n", job.NO_FILE, tmp_path / "input", tmp_path / "run")
    path = job.training_prompts_file("first one.\n\n  second one. \n", job.NO_FILE, tmp_path / "input",
                                     tmp_path / "run")
    assert path.read_text() == "first one.\nsecond one.\n"
    (tmp_path / "input" / "sub").mkdir(parents=True)
    (tmp_path / "input" / "sub" / "p.jsonl").write_text('{"prompt": "x"}\n')
    (tmp_path / "input" / "image.png").write_bytes(b"")
    assert job.list_prompt_files(tmp_path / "input") == [job.NO_FILE, "sub/p.jsonl"]
    assert job.training_prompts_file("ignored", "sub/p.jsonl", tmp_path / "input", tmp_path / "run") == \
        tmp_path / "input" / "sub" / "p.jsonl"
    with pytest.raises(BadInputError, match="gone.txt"):
        job.training_prompts_file("", "gone.txt", tmp_path / "input", tmp_path / "run")


def _checkpoint(run: Path, step: int) -> None:
    folder = run / "checkpoints" / f"checkpoint-{step:06d}"
    folder.mkdir(parents=True)
    (folder / CHECKPOINT_STATE_FILE).write_text(json.dumps({"step": step}))


def test_a_used_name_is_refused_unless_resume_or_overwrite(tmp_path):
    run, lora = tmp_path / "run", tmp_path / "loras" / "x.safetensors"
    lora.parent.mkdir()
    lora.write_bytes(b"lora")
    with pytest.raises(BadInputError, match="already exists.*overwrite"):
        job.prepare_train_run("train", run, lora, "x", overwrite=False)
    with pytest.raises(BadInputError, match="no checkpoint"):
        job.prepare_train_run("resume", run, lora, "x", overwrite=False)
    _checkpoint(run, 3)
    (run / "checkpoints" / "checkpoint-000004.tmp").mkdir()  # an interrupted save is not a checkpoint
    job.prepare_train_run("resume", run, lora, "x", overwrite=False)
    lora.unlink()
    with pytest.raises(BadInputError, match="checkpoint of step 3.*mode resume"):
        job.prepare_train_run("train", run, lora, "x", overwrite=False)
    assert run.is_dir()
    job.prepare_train_run("will it fit", run, lora, "x", overwrite=False)
    assert run.is_dir()
    job.prepare_train_run("train", run, lora, "x", overwrite=True)
    assert not run.exists()


def test_publish_lora_is_whole_or_absent(tmp_path):
    src, dst = tmp_path / "run" / job.RUN_LORA_FILE, tmp_path / "loras" / "x.safetensors"
    with pytest.raises(BadInputError, match="wrote no"):
        job.publish_lora(src, dst)
    assert not dst.parent.exists() or not any(dst.parent.iterdir())
    src.parent.mkdir()
    src.write_bytes(b"0123456789" * 1000)
    assert job.publish_lora(src, dst).read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dst.parent.iterdir()) == ["x.safetensors"]


def test_evaluation_folder_is_refused_or_resumed_by_name(tmp_path):
    with pytest.raises(BadInputError, match="no evaluation named 'e'"):
        job.prepare_evaluation("resume", tmp_path, "e")
    job.prepare_evaluation("evaluate", tmp_path, "e")
    (tmp_path / job.EVALUATION_SETTINGS_FILE).write_text("{}")
    with pytest.raises(BadInputError, match="already holds an evaluation"):
        job.prepare_evaluation("evaluate", tmp_path, "e")
    job.prepare_evaluation("resume", tmp_path, "e")
    from trainer.evaluate.files import SETTINGS_FILE

    assert job.EVALUATION_SETTINGS_FILE == SETTINGS_FILE


# -- the runner -------------------------------------------------------------------------------------------------


def test_progress_lines(monkeypatch, capsys):
    monkeypatch.delenv(cp.PROGRESS_ENV, raising=False)
    cp.report_progress(step=1)
    assert capsys.readouterr().out == ""
    monkeypatch.setenv(cp.PROGRESS_ENV, "1")
    cp.report_progress(step=2, total=5, image=Path("/x/a.png"))
    line = capsys.readouterr().out.rstrip("\n")
    assert cp.split_progress(line) == ("", {"step": 2, "total": 5, "image": "/x/a.png"})
    # behind a tqdm bar that shares the pipe without a newline
    assert cp.split_progress("training:  25%|##  | 1/4\r" + line) == ("training:  25%|##  | 1/4\r",
                                                                      {"step": 2, "total": 5, "image": "/x/a.png"})
    assert cp.split_progress("loss 0.5") == ("loss 0.5", None)
    assert cp.split_progress(cp.PROGRESS_PREFIX + "{broken")[1] is None
    assert cp.split_progress(cp.PROGRESS_PREFIX + "[1, 2]")[1] is None


#: A stand-in for the trainer: a step every 0.2 s; SIGINT finishes the step under way, keeps a checkpoint of it,
#: says how to resume and exits with 130 (the trainer's contract).
FAKE_TRAINER = textwrap.dedent("""
    import json, os, signal, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from longalign_core.child_process import report_progress
    run, total = Path(sys.argv[2]), int(sys.argv[3])
    stop = []
    signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    print("loading", flush=True)
    for step in range(1, total + 1):
        time.sleep(0.2)
        report_progress(step=step, total=total, seconds_per_step=0.2, eta=0.2 * (total - step))
        if stop:
            folder = run / "checkpoints" / f"checkpoint-{step:06d}"
            folder.mkdir(parents=True)
            (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
            print(f"stopped: checkpoint of step {step} kept; resume with --resume latest", flush=True)
            sys.exit(130)
    if len(sys.argv) > 4:
        print("python -m trainer.finetune: error: " + sys.argv[4], file=sys.stderr, flush=True)
        sys.exit(2)
    print("done", flush=True)
""")


def _fake_run(tmp_path: Path, total: int, *extra: str) -> cp.ChildRun:
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(script), str(repo), str(tmp_path / "run"), str(total), *extra]
    return cp.ChildRun(cmd, cwd=tmp_path, env=cp.child_environment(repo), log_file=tmp_path / "run" / "log.txt")


def test_child_progress_reaches_the_callback_and_the_log_keeps_the_rest(tmp_path):
    seen = []
    result = _fake_run(tmp_path, 3).run(seen.append, lambda: False, poll_seconds=0.05)
    assert result.returncode == 0 and not result.cancelled
    assert [p["step"] for p in seen] == [1, 2, 3] and seen[-1]["eta"] == 0
    assert result.tail == ["loading", "done"] and result.last_progress["step"] == 3
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "loading" in log and "done" in log and cp.PROGRESS_PREFIX not in log and "[exit code 0, " in log
    assert cp.outcome_message(result, "training", "python -m trainer.finetune", "kept") is None


def test_cancel_stops_the_child_after_the_step_under_way_with_its_checkpoint(tmp_path):
    seen = []
    result = _fake_run(tmp_path, 50).run(seen.append, lambda: len(seen) >= 2, poll_seconds=0.05)
    assert result.cancelled and result.returncode == 130
    step = seen[-1]["step"]
    assert 2 <= step <= 4  # the step under way when Cancel came, not the 50th
    assert cp.latest_checkpoint(tmp_path / "run") == (tmp_path / "run" / "checkpoints" / f"checkpoint-{step:06d}",
                                                      step)
    message = cp.outcome_message(result, "training", "python -m trainer.finetune",
                                 cp.checkpoint_kept(tmp_path / "run", "mode resume continues from it"))
    assert message.startswith(f"training cancelled: the checkpoint of step {step} is kept in ")
    assert message.endswith("mode resume continues from it.")


def test_the_childs_own_mistake_paragraph_is_shown_as_it_is(tmp_path):
    paragraph = "--sample-steps (3) must be a multiple of --sample-grad-steps (2)"
    result = _fake_run(tmp_path, 1, paragraph).run(lambda p: None, lambda: False, poll_seconds=0.05)
    assert result.returncode == 2
    assert cp.outcome_message(result, "training", "python -m trainer.finetune", "kept") == paragraph


def test_a_child_killed_from_outside_is_named_with_the_last_checkpoint(tmp_path):
    import signal

    run = _fake_run(tmp_path, 50)
    seen = []

    def on_progress(p):
        seen.append(p)
        if p["step"] == 2:
            _checkpoint(tmp_path / "run", 2)
            run.proc.send_signal(signal.SIGKILL)

    result = run.run(on_progress, lambda: False, poll_seconds=0.05)
    assert result.returncode == -signal.SIGKILL and not result.cancelled
    message = cp.outcome_message(result, "training", "python -m trainer.finetune",
                                 cp.checkpoint_kept(tmp_path / "run", "mode resume continues from it"))
    assert "killed by SIGKILL" in message and "checkpoint of step 2 is kept" in message and "loading" in message
    odd = cp.outcome_message(cp.ChildResult(1, False, ["Traceback …", "RuntimeError: boom"]), "evaluation",
                             "python -m trainer.evaluate", "nothing kept")
    assert "stopped with exit code 1: nothing kept" in odd and odd.endswith("RuntimeError: boom")
    for code, name in ((130, "SIGINT"), (143, "SIGTERM")):  # the trainer kept the step (trainer/stop_signal.py)
        stopped = cp.outcome_message(cp.ChildResult(code, False, ["…"]), "training", "python -m trainer.finetune",
                                     "the checkpoint of step 3 is kept")
        assert f"stopped from outside ComfyUI ({name}" in stopped and stopped.endswith("step 3 is kept.")


def test_missing_training_packages_give_the_exact_commands():
    assert cp.missing_training_packages(lambda name: object()) == []
    missing = cp.missing_training_packages(lambda name: None if name == "peft" else object())
    assert missing == ["peft>=0.12,<1"]
    message = cp.install_command_message(missing, python="/opt/comfy/venv/bin/python")
    assert 'python_embeded\\python.exe -m pip install "peft>=0.12,<1"' in message
    assert '"/opt/comfy/venv/bin/python" -m pip install "peft>=0.12,<1"' in message
    assert "Training needs peft," in message and "\n" not in message


def test_training_packages_match_the_requirements():
    """The node asks for what requirements.txt installs (ComfyUI Manager) and what pyproject's train extra lists."""
    import tomllib

    repo = Path(__file__).resolve().parents[1]
    requirements = [line.strip() for line in (repo / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    extra = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    for _, requirement in cp.TRAINING_PACKAGES:
        assert requirement in requirements and requirement in extra


def test_the_trainer_prints_progress_only_when_asked():
    """The trainer's module prints through report_progress (one format for both ends)."""
    out = subprocess.run([sys.executable, "-c", "from longalign_core.child_process import report_progress; "
                          "report_progress(step=1)"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], env={"PATH": "", cp.PROGRESS_ENV: "1"})
    assert cp.split_progress(out.stdout.strip())[1] == {"step": 1}
