"""The dry run's projection counts start-up (issue 27 point 7): the process's interpreter start and imports, the
first step's warm-up beyond a measured step, and writing the outputs, besides loading, steps, validations and
checkpoints."""

import pytest

from trainer.config import TrainConfig
from trainer.dry_run import process_age, project
from trainer.finetune import dry_run
from trainer_support import FAST, one_thread  # noqa: F401  (autouse fixture)


def test_projection_adds_start_up_warm_up_and_outputs():
    cfg = TrainConfig.from_args([*FAST, "--train-steps", "10", "--validation-every", "5", "--checkpoint-every", "4"])
    p = project(cfg, load=10.0, step=2.0, validation=3.0, checkpoint=1.0, startup=5.0, warmup=6.0, outputs=4.0)
    # validations at 0, 5 and the end (3); checkpoints at 4 and 8 (2); warm-up: 6 s less the measured 2 s step
    assert (p["validations"], p["checkpoints"]) == (3, 2)
    assert p["total_seconds"] == pytest.approx(5 + 10 + (6 - 2) + 10 * 2 + 3 * 3 + 2 * 1 + 4)


def test_dry_run_measures_outputs_and_warm_up_and_reports_them(tmp_path):
    cfg = TrainConfig.from_args(["--output-dir", str(tmp_path / "run"), *FAST, "--train-steps", "3",
                                 "--checkpoint-every", "2"])
    r = dry_run(cfg, startup=1.5)
    assert r["startup_seconds"] == 1.5 and r["outputs_seconds"] > 0 and r["step"]["warmup_seconds"] > 0
    parts = (1.5 + r["load_seconds"] + max(0.0, r["step"]["warmup_seconds"] - r["step"]["seconds"])
             + 3 * r["step"]["seconds"] + r["validations"] * r["validation_seconds"]
             + r["checkpoints"] * r["checkpoint_seconds"] + r["outputs_seconds"])
    assert r["total_seconds"] == pytest.approx(parts)
    assert "start-up 2 s + loading" in r["report"] and "writing the outputs" in r["report"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["dry_run.md"]


def test_process_age_is_the_time_since_the_process_started():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import time; time.sleep(1.0); from trainer.dry_run import "
                          "process_age; print(process_age())"], capture_output=True, text=True, check=True,
                         cwd=__import__("conftest").REPO)
    assert 1.0 <= float(out.stdout) < 30
    assert process_age() > 0
