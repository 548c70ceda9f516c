"""The trainer's configuration: precedence, held-out validation prompts, the report, and what a user's mistake
prints (one paragraph naming the option or file, exit code 2, no traceback)."""

from __future__ import annotations

import json

import pytest

from longalign_core.errors import BadConfigError
from trainer.config import EMBEDDED_PROFILE, TrainConfig
from trainer_support import FAST, one_thread  # noqa: F401


# ------------------------------------------------------------------------------------------------------------
# Precedence: flags > config file > demo profile (no --model) > defaults


def test_precedence(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('train_steps = 100\nlora_rank = 8\nlearning_rate = 1e-4\nsplit_mode = "reference"\n')
    c = TrainConfig.from_args(["--config", str(toml)])
    assert c.model is None  # the demo profile applies, but under the file
    assert (c.train_steps, c.lora_rank, c.learning_rate, c.split_mode) == (100, 8, 1e-4, "reference")
    assert (c.train_batch_size, c.sample_steps) == (EMBEDDED_PROFILE["train_batch_size"],
                                                    EMBEDDED_PROFILE["sample_steps"])  # profile > defaults
    assert c.sample_guidance == 7.5  # neither file nor profile: the default
    c = TrainConfig.from_args(["--config", str(toml), "--train-steps", "9"])
    assert (c.train_steps, c.lora_rank) == (9, 8)  # flag > file
    c = TrainConfig.from_args(["--config", str(toml), "--train-step", "7", "--batch-size", "3"])
    assert (c.train_steps, c.train_batch_size) == (7, 3)  # an abbreviated flag and the alias count as flags
    toml.write_text('model = "/models/sd15"\nreward_model = "/models/denscore"\nprompts = "captions.txt"\n')
    c = TrainConfig.from_args(["--config", str(toml)])
    assert (c.train_steps, c.lora_rank, c.output_dir) == (3750, 32, "outputs/longalign-run")  # no demo profile
    c = TrainConfig.from_args([])
    assert (c.train_steps, c.output_dir) == (EMBEDDED_PROFILE["train_steps"], "outputs/longalign-demo")
    assert (c.overflow, c.split_mode, c.long_segments, c.lora_dropout, c.mixed_precision) == (
        "truncate", "sentence", "split", 0.1, None)
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"validation_prompts": "held.txt", "init_lora": "a.pt", "reward_omega": 1}))
    c = TrainConfig.from_args(["--config", str(js)])
    assert (c.validation_prompts, c.init_lora, c.reward_omega) == ("held.txt", ["a.pt"], 1.0)
    assert TrainConfig.from_args(["--validation-prompts", "4"]).validation_prompts == 4


def test_type_errors_name_the_file_and_key(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('train_steps = "ten"\n')
    with pytest.raises(BadConfigError, match=r"run\.toml: train_steps must be an integer, got 'ten' \(str\)"):
        TrainConfig.from_args(["--config", str(toml)])
    toml.write_text("gradient_checkpointing = 1\n")
    with pytest.raises(BadConfigError, match="gradient_checkpointing must be true or false"):
        TrainConfig.from_args(["--config", str(toml)])
    toml.write_text('overflow = "grow"\n')
    with pytest.raises(BadConfigError, match="--overflow 'grow' is not one of extend, truncate, error"):
        TrainConfig.from_args(["--config", str(toml)])


def test_validation_prompts_are_held_out(tmp_path):
    from trainer.parts import TrainingData

    prompts = [f"Prompt number {i}. It has two sentences." for i in range(20)]
    (tmp_path / "p.txt").write_text("\n".join(prompts))

    def split(*extra):
        data = TrainingData.load(TrainConfig.from_args(["--prompts", str(tmp_path / "p.txt"), *extra]))
        return data.prompts, data.validation_prompts

    train, val = split("--validation-prompts", "3")
    assert len(val) == 3 and val != prompts[:3] and not set(val) & set(train)
    assert sorted(train + val) == sorted(prompts)
    assert split("--validation-prompts", "3") == (train, val)  # derived from the seed
    assert split("--validation-prompts", "3", "--seed", "1")[1] != val
    (tmp_path / "v.txt").write_text(prompts[5] + "\nA held-out prompt.\n")
    train, val = split("--validation-prompts", str(tmp_path / "v.txt"))
    assert val == [prompts[5], "A held-out prompt."] and prompts[5] not in train and len(train) == 19
    with pytest.raises(BadConfigError, match="would hold out every one of the 20 training prompts"):
        split("--validation-prompts", "20")


# ------------------------------------------------------------------------------------------------------------
# User mistakes on the command line: exit code 2, one paragraph naming the option or file, no traceback


def check_user_error(proc, *names: str) -> str:
    err = proc.stderr
    assert proc.returncode == 2, (proc.stdout + err)[-3000:]
    assert "Traceback" not in err and "Traceback" not in proc.stdout, err[-3000:]
    line = [ln for ln in err.splitlines() if "error:" in ln]
    assert line, err[-2000:]
    for name in names:
        assert name in line[-1], line[-1]
    return line[-1]


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory):
    """Every command-line mistake below, run through ``python -m trainer.finetune``'s entry point in one fresh
    interpreter (one start-up for all of them), as (returncode, stdout, stderr) per case; plus the files."""
    from trainer.checkpoints import checkpoints
    from trainer.finetune import Trainer
    from trainer_support import run_cli_cases

    tmp = tmp_path_factory.mktemp("mistakes")
    out = ["--output-dir", str(tmp / "run")]
    files = {"bad_type": tmp / "types.toml", "bad_syntax": tmp / "syntax.toml",
             "not_a_string": tmp / "numbers.jsonl", "bad_record": tmp / "broken.jsonl"}
    files["bad_type"].write_text('train_steps = "ten"\n')
    files["bad_syntax"].write_text("train_steps = 10\nsplit_mode = reference\n")
    files["not_a_string"].write_text('{"prompt": "A red fox."}\n{"prompt": 5}\n')
    files["bad_record"].write_text('{"prompt": "A red fox."}\n{"prompt": "A blue bird."}\n{"prompt": "A cat.",\n')
    # a run with checkpoints whose newest LoRA weights are then cut short, as by a full disk
    resume = ["--output-dir", str(tmp / "ckpt"), *FAST, "--sample-steps", "2", "--sample-grad-steps", "1",
              "--train-steps", "3", "--checkpoint-every", "1", "--checkpoints-keep", "5"]
    Trainer(TrainConfig.from_args(resume)).train()
    files["first"], files["latest"] = checkpoints(tmp / "ckpt")[-2:]
    weights = files["latest"] / "lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    cases = {
        "fp16": [*out, "--mixed-precision", "fp16"], "batch": [*out, "--batch-size", "0"],
        "budget": [*out, "--token-budget", "1000000000"],
        "bad_type": [*out, "--config", str(files["bad_type"])],
        "bad_syntax": [*out, "--config", str(files["bad_syntax"])],
        "not_a_string": [*out, *FAST, "--prompts", str(files["not_a_string"])],
        "bad_record": [*out, *FAST, "--prompts", str(files["bad_record"])],
        "corrupt": [*resume, "--resume", "latest"],
    }
    return files, run_cli_cases(cases)


def test_cli_option_mistakes(mistakes):
    _, runs = mistakes
    check_user_error(runs["fp16"], "--mixed-precision fp16", "CPU", "bf16")
    check_user_error(runs["batch"], "--train-batch-size (--batch-size)", ">= 1")
    check_user_error(runs["budget"], "--token-budget", "1..4096")


def test_cli_config_file_mistakes(mistakes):
    files, runs = mistakes
    check_user_error(runs["bad_type"], str(files["bad_type"]), "train_steps", "an integer")
    check_user_error(runs["bad_syntax"], str(files["bad_syntax"]), "TOML syntax error", "line 2")


def test_cli_prompts_file_mistakes(mistakes):
    files, runs = mistakes
    check_user_error(runs["not_a_string"], f"{files['not_a_string']}:2", "string")
    check_user_error(runs["bad_record"], f"{files['bad_record']}:3", "not valid JSON")


def test_cli_corrupt_checkpoint_offers_the_previous_one(mistakes):
    files, runs = mistakes
    line = check_user_error(runs["corrupt"], str(files["latest"]), f"--resume {files['first']}")
    assert "corrupt or incomplete" in line
