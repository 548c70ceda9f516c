"""`python -m longalign_core.encode`: the embedded default and real model folders."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from longalign_core import CLIPSegmentEncoder
from longalign_core.encode import load_encoder, main


def test_cli_on_a_diffusers_style_folder(tmp_path, tiny_text_encoder, clip_tokenizer, capsys):
    sd_dir = tmp_path / "sd15"
    tiny_text_encoder.save_pretrained(sd_dir / "text_encoder")
    clip_tokenizer.save_pretrained(sd_dir / "tokenizer")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "A cat. A dog on a mat."}) + "\n" + json.dumps({"prompt": ""}) + "\n")
    out, report = tmp_path / "cond.safetensors", tmp_path / "report.json"
    assert main(["--prompt-file", str(prompts), "--model", str(sd_dir), "--out", str(out),
                 "--report", str(report)]) == 0
    cond = load_file(str(out))["cond"]
    expected = CLIPSegmentEncoder(clip_tokenizer, tiny_text_encoder).encode(["A cat. A dog on a mat.", ""]).cond
    torch.testing.assert_close(cond, expected)
    reports = json.loads(report.read_text())
    assert [len(r["segments"]) for r in reports] == [2, 1] and all(r["lossless"] for r in reports)
    assert "2 segments" in capsys.readouterr().out


def test_load_encoder_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="text_encoder/config.json"):
        load_encoder(str(tmp_path))
    with pytest.raises(ValueError, match="single file"):
        load_encoder(str(tmp_path / "model.safetensors"))


def test_bad_jsonl_line_is_reported(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: expected an object with a 'prompt'"):
        main(["--prompt-file", str(prompts)])


def test_embedded_default_main_job_runs(tmp_path):
    """The README's first command: no arguments, built-in prompt and encoder, no network."""
    out = tmp_path / "cond.safetensors"
    proc = subprocess.run([sys.executable, "-m", "longalign_core.encode", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "",
                                                                          "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "14 segments" in proc.stdout and "conditioning: (1, 240, 768)" in proc.stdout
    assert load_file(str(out))["cond"].shape == (1, 240, 768)
