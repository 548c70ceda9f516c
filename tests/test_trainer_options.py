"""trainer.options: a dataclass as the command line and the config file (TrainConfig and EvalConfig use it). A new
field is an option, a config-file key and a checked value with no other edit; every mistake names the option or
the file and key."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import pytest

from longalign_core.errors import BadConfigError
from trainer.config import TrainConfig
from trainer.evaluate.config import EvalConfig
from trainer.options import add_field_options, coerce_fields, field_kinds, option, read_config_file


@dataclass
class NewOptions:
    """Fields as another branch would add them to TrainConfig: nothing else is edited."""
    overwrite_output_dir: bool = option(False, "write into a used --output-dir")
    gradient_checkpointing: bool = option(True, "recompute in the backward")
    prompt_field: str | None = option(None, "the .jsonl field with the prompt")
    sample_count: int | None = option(None, "samples", aliases=["--samples"])
    guidance: float = option(7.5, "guidance")
    held_out: int | str | None = option(None, "a count or a prompts file")
    extra_lora: list[str] = option(list, "LoRA files", nargs="*")

    def __post_init__(self):
        bad = coerce_fields(self, {})
        if bad:
            raise BadConfigError("; ".join(bad))


def parse(argv):
    ap = argparse.ArgumentParser()
    add_field_options(ap, NewOptions, {})
    return NewOptions(**{k: v for k, v in vars(ap.parse_args(argv)).items() if v is not None})


def test_a_new_field_is_a_kebab_case_option_with_no_other_edit():
    o = parse(["--overwrite-output-dir", "--no-gradient-checkpointing", "--prompt-field", "caption", "--samples",
               "3", "--guidance", "5", "--held-out", "12", "--extra-lora", "a.safetensors", "b.pt"])
    assert o == NewOptions(True, False, "caption", 3, 5.0, 12, ["a.safetensors", "b.pt"])
    assert parse(["--held-out", "held.txt"]).held_out == "held.txt"  # a count or a file name
    assert parse([]) == NewOptions()
    with pytest.raises(SystemExit):  # argparse's own one-line error and exit code 2
        parse(["--sample-count", "three"])


@pytest.mark.parametrize("key, value, expected", [
    ("sample_count", "3", "must be an integer, got '3' (str)"),
    ("overwrite_output_dir", 1, "must be true or false, got 1 (int)"),
    ("guidance", True, "must be a number, got True (bool)"),
    ("prompt_field", 5, "must be a string, got 5 (int)"),
    ("extra_lora", ["a.pt", 2], "must be a list of strings"),
    ("held_out", 1.5, "must be a count or a file name, got 1.5 (float)"),
    ("gradient_checkpointing", None, "must be true or false, got None (NoneType)"),
])
def test_config_file_values_are_checked_against_the_field_type(tmp_path, key, value, expected):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({key: value}))
    with pytest.raises(BadConfigError, match=f"run.json: {key} {expected}".replace("(", r"\(").replace(")", r"\)")):
        read_config_file(path, NewOptions, "prog")


def test_config_file_values_that_fit_are_converted(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('guidance = 5\nextra_lora = "a.pt"\nheld-out = "7"\nprompt_field = "caption"\n')
    assert read_config_file(path, NewOptions, "prog") == {"guidance": 5.0, "extra_lora": ["a.pt"], "held_out": 7,
                                                          "prompt_field": "caption"}
    path.write_text("guidanse = 5\n")
    with pytest.raises(BadConfigError, match="unknown option 'guidanse'; did you mean 'guidance'"):
        read_config_file(path, NewOptions, "prog")
    path.write_text("zzz = 5\n")
    with pytest.raises(BadConfigError, match="unknown option 'zzz'; see prog --help"):
        read_config_file(path, NewOptions, "prog")


def test_a_field_type_the_options_cannot_read_is_refused_by_name():
    @dataclass
    class Odd:
        weights: dict = option(dict, "a table")

    with pytest.raises(TypeError, match="Odd.weights: .*dict.* is not a type trainer.options reads"):
        add_field_options(argparse.ArgumentParser(), Odd, {})


@pytest.mark.parametrize("cls", [TrainConfig, EvalConfig])
def test_help_lists_each_option_once_in_kebab_case_with_its_default(cls):
    text = cls.parser("description").format_help()
    for name in field_kinds(cls):
        if "_" in name:
            assert f"--{name} " not in text and f"--{name.replace('_', '-')}" in text, name
    options = text.split("options:")[1]  # below the usage line
    assert options.count("--train-steps TRAIN_STEPS" if cls is TrainConfig else "--seeds SEEDS") == 1
    assert "--no-dry-run" in text if cls is TrainConfig else "--no-resume" in text
    assert "(default: 0.3)" in text  # --reward-omega / --omega
