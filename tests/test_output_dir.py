"""A second run into a used --output-dir (issue 27 point 3): refused unless --resume or --overwrite-output-dir,
so that two runs' logs never mix in one report."""

import csv

import pytest

from trainer.finetune import cli
from trainer.outputs import RUN_MARKERS, held_run
from trainer_support import FAST, one_thread  # noqa: F401  (autouse fixture)

ONE_STEP = [*FAST, "--train-steps", "1", "--sample-steps", "2", "--sample-grad-steps", "1"]


def old_run(folder):
    """What an earlier run leaves: a log of 9 steps, a checkpoint, a validation at step 0."""
    (folder / "checkpoints" / "checkpoint-000009").mkdir(parents=True)
    with (folder / "train_log.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"])
        w.writerows([[s, 0.9] for s in range(9)])
    (folder / "validation.csv").write_text("step,denscore,text_relevant,text_irrelevant\n0,0.5,0.1,0.4\n")
    (folder / "notes.txt").write_text("the user's own file")


@pytest.mark.parametrize("marker", RUN_MARKERS)
def test_a_folder_holding_a_run_is_refused(tmp_path, capsys, marker):
    out = tmp_path / "run"
    out.mkdir()
    (out / marker).mkdir() if marker == "checkpoints" else (out / marker).write_text("x")
    assert cli(["--output-dir", str(out), *ONE_STEP]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and marker in err
    assert "--resume latest" in err and "--overwrite-output-dir" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == [marker]  # nothing written


def test_config_and_v_caches_alone_are_not_a_run(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "longalign_direction-abc.safetensors").write_bytes(b"")
    assert held_run(tmp_path) == []


def test_overwrite_starts_afresh(tmp_path, capsys):
    out = tmp_path / "run"
    old_run(out)
    assert cli(["--output-dir", str(out), *ONE_STEP, "--overwrite-output-dir"]) == 0
    with (out / "train_log.csv").open() as f:
        steps = [int(float(r["step"])) for r in csv.DictReader(f)]
    assert steps == [1]  # only the new run's step, nothing appended to the old log
    with (out / "validation.csv").open() as f:
        assert [float(r["text_relevant"]) for r in csv.DictReader(f)][0] != 0.1
    assert not (out / "checkpoints" / "checkpoint-000009").exists()
    assert (out / "notes.txt").read_text() == "the user's own file"  # only the run's outputs are deleted
    assert "deleted the earlier run's" in capsys.readouterr().out


def test_the_two_demos_have_their_own_folders():
    from trainer.config import TrainConfig

    assert TrainConfig.from_args([]).output_dir == "outputs/longalign-demo"
    assert TrainConfig.from_args(["--model", "embedded-sdxl"]).output_dir == "outputs/longalign-demo-sdxl"
    assert TrainConfig.from_args(["--model", "embedded-sdxl", "--output-dir", "x"]).output_dir == "x"
