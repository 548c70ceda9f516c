"""Bad-input catalogue for longalign_core and its CLIs (encode, score, lora): each case gives a realistic user
mistake and checks the exit code or exception type, that the message names the file/option/line, that no
traceback is printed, that previous outputs are byte-identical and that no temp file is left (errors_support).

The CLI cases run ``main`` through ``run_cli`` in-process (the models stay loaded, the catalogue stays fast);
``TestEntryPoints`` runs each ``python -m`` once in a subprocess.
"""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from errors_support import (
    api_error,
    assert_unchanged,
    cli_error,
    module_errors,
    previous_outputs,
    snapshot,
    symlink_loop,
    truncate,
    watched,
)
from PIL import Image
from safetensors.torch import load_file, save_file

from longalign_core import encode, lora, score
from longalign_core.denscore import segment_score
from longalign_core.errors import BadConfigError, BadInputError, BadModelFileError, LongAlignError, run_cli

ENC = "python -m longalign_core.encode"
SCORE = "python -m longalign_core.score"
LORA = "python -m longalign_core.lora"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

TINY_UNET = dict(_class_name="UNet2DConditionModel", sample_size=16, in_channels=4, out_channels=4,
                 block_out_channels=[32, 64], layers_per_block=1,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=24, attention_head_dim=4,
                 norm_num_groups=8)


# ------------------------------------------------------------------------------------------------------------
# Fixtures: tiny real model folders, and an output folder holding a previous run's outputs


@pytest.fixture(scope="module")
def clip_text_dir(tmp_path_factory, tiny_text_encoder, clip_tokenizer):
    """A plain CLIPTextModel folder (config + safetensors + tokenizer), the documented ``--model`` form."""
    path = tmp_path_factory.mktemp("clip_text")
    tiny_text_encoder.save_pretrained(path)
    clip_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A tiny T5 encoder folder (config + safetensors, as saved by transformers; no tokenizer needed here)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(4)
    path = tmp_path_factory.mktemp("t5")
    T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)).save_pretrained(
        path)
    return path


@pytest.fixture(scope="module")
def sd_with_t5_dir(tmp_path_factory, t5_dir, clip_tokenizer):
    """A diffusers-style folder whose text_encoder/ is a T5 encoder (not a CLIP)."""
    path = tmp_path_factory.mktemp("sd_t5")
    shutil.copytree(t5_dir, path / "text_encoder")
    clip_tokenizer.save_pretrained(path / "tokenizer")
    return path


@pytest.fixture
def out_dir(tmp_path):
    """A folder with a previous run's outputs in it (checked byte-identical after each failed run)."""
    folder = tmp_path / "out"
    previous_outputs(folder, "cond.safetensors", "report.json", "scores.csv", "scores.png", "lora.safetensors")
    return folder


@pytest.fixture
def prompts_dir(tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def unet_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("unet") / "config.json"
    path.write_text(json.dumps(TINY_UNET))
    return path


@pytest.fixture(scope="module")
def targets(unet_config):
    return lora.lora_targets(unet_config)


def longsd_list(targets, rank=4, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    tensors = []
    for t in targets:
        up_shape = (t.weight_shape[0], rank) + ((1, 1) if t.kind == "conv" else ())
        down_shape = (rank, t.weight_shape[1]) + t.weight_shape[2:]
        tensors += [torch.randn(up_shape, generator=g) * scale, torch.randn(down_shape, generator=g) * scale]
    return tensors


@pytest.fixture
def good_pt(tmp_path, targets):
    path = tmp_path / "longsd.pt"
    torch.save([t.half() for t in longsd_list(targets)], path)
    return path


@pytest.fixture(scope="module")
def score_images(tmp_path_factory):
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("score_images")
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def ref_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "reference.txt"
    path.write_text("A red fox on a rock. The sky is orange.\nA blue boat on a calm sea.\nA lighthouse at night.\n")
    return path


@pytest.fixture(scope="module")
def denscore(tiny_clip_dir):
    from longalign_core.preference import load_preference_model

    return load_preference_model(tiny_clip_dir)


@pytest.fixture
def model_copy(tmp_path, tiny_clip_dir):
    """A private copy of the tiny Denscore folder, to damage."""
    dst = tmp_path / "Denscore"
    shutil.copytree(tiny_clip_dir, dst, ignore=shutil.ignore_patterns("longalign_direction-*"))
    return dst


def enc_args(out_dir, *args):
    return [*args, "--out", out_dir / "cond.safetensors", "--report", out_dir / "report.json"]


def score_args(out_dir, model, images, *args):
    return ["--model", model, "--images", images, *args, "--csv", out_dir / "scores.csv",
            "--plot", out_dir / "scores.png"]


# ------------------------------------------------------------------------------------------------------------
# encode CLI


class TestEncodeModel:
    def test_t5_text_encoder_is_refused_before_anything_is_written(self, sd_with_t5_dir, out_dir, capsys):
        r = cli_error(encode.main, enc_args(out_dir, "A fox.", "--model", sd_with_t5_dir), capsys, prog=ENC,
                      names=["--model", sd_with_t5_dir / "text_encoder", "'t5'", "CLIPTextModel"], watch=[out_dir])
        assert "conditioning" not in r.stdout  # refused before encoding

    def test_plain_t5_folder_is_refused(self, t5_dir, out_dir, capsys):
        cli_error(encode.main, enc_args(out_dir, "A fox.", "--model", t5_dir), capsys, prog=ENC,
                  names=[t5_dir, "'t5'"], watch=[out_dir])

    def test_plain_clip_text_model_folder_works(self, clip_text_dir, clip_tokenizer, tiny_text_encoder, tmp_path,
                                                capsys):
        """The documented CLIPTextModel-folder form (was a TypeError inside transformers): same conditioning as
        the model run directly."""
        from longalign_core import CLIPSegmentEncoder

        out = tmp_path / "cond.safetensors"
        assert run_cli(encode.main, ["A cat. A dog on a mat.", "--model", str(clip_text_dir), "--out", str(out)],
                       prog=ENC) == 0
        expected = CLIPSegmentEncoder(clip_tokenizer, tiny_text_encoder).encode(["A cat. A dog on a mat."]).cond
        torch.testing.assert_close(load_file(str(out))["cond"], expected)

    def test_missing_model_folder(self, tmp_path, out_dir, capsys):
        cli_error(encode.main, enc_args(out_dir, "x", "--model", tmp_path / "no" / "such"), capsys, prog=ENC,
                  names=["--model", tmp_path / "no" / "such", "not found"], watch=[out_dir])

    def test_single_weights_file_given_as_model(self, tmp_path, out_dir, capsys):
        f = tmp_path / "v1-5-pruned.safetensors"
        f.write_bytes(b"x" * 10)
        cli_error(encode.main, enc_args(out_dir, "x", "--model", f), capsys, prog=ENC,
                  names=[f, "single file", "diffusers folder"], watch=[out_dir])

    def test_config_json_not_json(self, tmp_path, out_dir, capsys):
        folder = tmp_path / "m"
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "clip_text_model",\n  oops}')
        cli_error(encode.main, enc_args(out_dir, "x", "--model", folder), capsys, prog=ENC,
                  names=[f"{folder / 'config.json'}:2", "not valid JSON"], watch=[out_dir])

    def test_truncated_weights_file(self, tmp_path, clip_text_dir, out_dir, capsys):
        folder = tmp_path / "m"
        shutil.copytree(clip_text_dir, folder)
        truncate(clip_text_dir / "model.safetensors", folder / "model.safetensors", 0.3)
        cli_error(encode.main, enc_args(out_dir, "x", "--model", folder), capsys, prog=ENC,
                  names=["--model", folder / "model.safetensors", "truncated", "download"], watch=[out_dir])

    def test_empty_folder(self, tmp_path, out_dir, capsys):
        (tmp_path / "empty").mkdir()
        cli_error(encode.main, enc_args(out_dir, "x", "--model", tmp_path / "empty"), capsys, prog=ENC,
                  names=[tmp_path / "empty", "text_encoder/config.json"], watch=[out_dir])

    def test_clip_skip_beyond_the_layers(self, clip_text_dir, out_dir, capsys):
        cli_error(encode.main, enc_args(out_dir, "x", "--model", clip_text_dir, "--clip-skip", "7"), capsys,
                  prog=ENC, names=["clip_skip", "0..2", "7"], watch=[out_dir])


class TestEncodePrompts:
    def test_bad_jsonl_record_names_file_and_line(self, prompts_dir, out_dir, capsys):
        p = prompts_dir / "p.jsonl"
        p.write_text('{"prompt": "A fox."}\n{"prompt": "A cat." "x"}\n')
        cli_error(encode.main, enc_args(out_dir, "--prompt-file", p), capsys, prog=ENC,
                  names=[f"{p}:2", "not valid JSON", "column"], watch=[out_dir])

    def test_non_string_prompt_is_named_as_such(self, prompts_dir, out_dir, capsys):
        p = prompts_dir / "p.jsonl"
        p.write_text('{"prompt": "A fox."}\n{"prompt": 42}\n')
        r = cli_error(encode.main, enc_args(out_dir, "--prompt-file", p), capsys, prog=ENC,
                      names=[f"{p}:2", "is an int (42)", "not a string"], watch=[out_dir])
        assert "empty" not in r.stderr

    def test_jsonl_line_that_is_not_an_object(self, prompts_dir, out_dir, capsys):
        p = prompts_dir / "p.jsonl"
        p.write_text('["A fox."]\n')
        cli_error(encode.main, enc_args(out_dir, "--prompt-file", p), capsys, prog=ENC,
                  names=[f"{p}:1", "list"], watch=[out_dir])

    def test_jsonl_without_prompt_key(self, prompts_dir, out_dir, capsys):
        p = prompts_dir / "p.jsonl"
        p.write_text('\n{"text": "A fox."}\n')
        cli_error(encode.main, enc_args(out_dir, "--prompt-file", p), capsys, prog=ENC,
                  names=[f"{p}:2", "'prompt'", "'text'"], watch=[out_dir])

    def test_missing_prompt_file(self, prompts_dir, out_dir, capsys):
        cli_error(encode.main, enc_args(out_dir, "--prompt-file", prompts_dir / "nope.txt"), capsys, prog=ENC,
                  names=["--prompt-file", prompts_dir / "nope.txt", "not found"], watch=[out_dir])

    def test_prompt_file_is_a_folder(self, prompts_dir, out_dir, capsys):
        cli_error(encode.main, enc_args(out_dir, "--prompt-file", prompts_dir), capsys, prog=ENC,
                  names=["--prompt-file", prompts_dir, "is a folder"], watch=[out_dir])

    def test_empty_prompt_file(self, prompts_dir, out_dir, capsys):
        (prompts_dir / "p.txt").write_bytes(b"")
        cli_error(encode.main, enc_args(out_dir, "--prompt-file", prompts_dir / "p.txt"), capsys, prog=ENC,
                  names=[prompts_dir / "p.txt", "empty"], watch=[out_dir])

    def test_blank_lines_only(self, prompts_dir, out_dir, capsys):
        (prompts_dir / "p.txt").write_text("\n   \n\n")
        cli_error(encode.main, enc_args(out_dir, "--prompt-file", prompts_dir / "p.txt"), capsys, prog=ENC,
                  names=[prompts_dir / "p.txt", "no prompts"], watch=[out_dir])

    def test_prompt_file_not_utf8(self, prompts_dir, out_dir, capsys):
        (prompts_dir / "p.txt").write_bytes("A fox.\nA café in Zürich.\n".encode("latin-1"))
        cli_error(encode.main, enc_args(out_dir, "--prompt-file", prompts_dir / "p.txt"), capsys, prog=ENC,
                  names=[f"{prompts_dir / 'p.txt'}:2", "UTF-8"], watch=[out_dir])

    def test_json_file_instead_of_jsonl(self, prompts_dir, out_dir, capsys):
        (prompts_dir / "p.json").write_text(json.dumps([{"prompt": "A fox."}]))
        cli_error(encode.main, enc_args(out_dir, "--prompt-file", prompts_dir / "p.json"), capsys, prog=ENC,
                  names=[prompts_dir / "p.json", ".jsonl"], watch=[out_dir])

    def test_bom_and_crlf_prompt_file_reads_like_a_clean_one(self, prompts_dir, tmp_path):
        """Messy but legitimate: a Windows editor's UTF-8 BOM and CRLF line ends change no prompt."""
        from types import SimpleNamespace

        clean, messy = prompts_dir / "clean.txt", prompts_dir / "messy.txt"
        clean.write_bytes("A fox. A café.\nA cat.\n".encode())
        messy.write_bytes("\ufeffA fox. A café.\r\nA cat.\r\n".encode())
        read = lambda p: encode.read_prompts(SimpleNamespace(prompt=None, prompt_file=str(p)))  # noqa: E731
        assert read(messy) == read(clean) == ["A fox. A café.", "A cat."]
        clean.write_bytes(b"A fox.\nOn a rock.\n\nA cat.\n")  # blocks separated by a blank line
        messy.write_bytes(b"A fox.\r\nOn a rock.\r\n\r\nA cat.\r\n")
        assert read(messy) == read(clean) == ["A fox.\nOn a rock.", "A cat."]

    def test_prompt_file_symlink_loop(self, prompts_dir, out_dir, capsys):
        loop = symlink_loop(prompts_dir, "p.txt")
        cli_error(encode.main, enc_args(out_dir, "--prompt-file", loop), capsys, prog=ENC,
                  names=[loop, "symbolic link loop"], watch=[out_dir])

    @pytest.mark.skipif(IS_ROOT, reason="root reads files whatever their permissions")
    def test_unreadable_prompt_file(self, prompts_dir, out_dir, capsys):
        p = prompts_dir / "p.txt"
        p.write_text("A fox.\n")
        p.chmod(0)
        cli_error(encode.main, enc_args(out_dir, "--prompt-file", p), capsys, prog=ENC,
                  names=[p, "permissions"], watch=[out_dir])

    def test_prompt_and_prompt_file_both(self, prompts_dir, out_dir, capsys):
        (prompts_dir / "p.txt").write_text("A fox.\n")
        cli_error(encode.main, enc_args(out_dir, "A cat.", "--prompt-file", prompts_dir / "p.txt"), capsys,
                  prog=ENC, names=["--prompt-file", "not both"], watch=[out_dir])

    def test_overflow_error_names_the_budget(self, clip_text_dir, out_dir, capsys):
        cli_error(encode.main, enc_args(out_dir, "A red fox. " * 40, "--overflow", "error", "--budget", "75",
                                        "--model", clip_text_dir), capsys, prog=ENC, names=["token budget is 75", "extend"], watch=[out_dir])


class TestEncodeOptions:
    @pytest.mark.parametrize("value", ["0", "-5"])
    def test_budget_below_one(self, value, out_dir, capsys):
        cli_error(encode.main, enc_args(out_dir, "x", "--budget", value), capsys, prog=ENC,
                  names=["--budget", value, "1..4096"], watch=[out_dir])

    def test_huge_token_budget_is_refused_not_allocated(self, out_dir, capsys):
        cli_error(encode.main, enc_args(out_dir, "x", "--token-budget", str(10 ** 13)), capsys, prog=ENC,
                  names=["--budget", str(10 ** 13), "1..4096"], watch=[out_dir])

    def test_batch_size_zero(self, out_dir, capsys):
        cli_error(encode.main, enc_args(out_dir, "x", "--batch-size", "0"), capsys, prog=ENC,
                  names=["--batch-size", "got 0"], watch=[out_dir])

    def test_negative_clip_skip(self, out_dir, capsys):
        cli_error(encode.main, enc_args(out_dir, "x", "--clip-skip", "-1"), capsys, prog=ENC,
                  names=["--clip-skip", "-1"], watch=[out_dir])

    def test_unknown_device(self, out_dir, capsys):
        cli_error(encode.main, enc_args(out_dir, "x", "--device", "gpu0"), capsys, prog=ENC,
                  names=["--device", "'gpu0'"], watch=[out_dir])

    @pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
    def test_cuda_device_without_gpu(self, out_dir, capsys):
        cli_error(encode.main, enc_args(out_dir, "x", "--device", "cuda"), capsys, prog=ENC,
                  names=["--device cuda", "--device cpu"], watch=[out_dir])

    def test_out_is_a_folder(self, out_dir, capsys):
        cli_error(encode.main, ["x", "--out", out_dir], capsys, prog=ENC, names=["--out", out_dir, "folder"],
                  watch=[out_dir])

    def test_out_parent_is_a_file(self, out_dir, capsys):
        target = out_dir / "report.json" / "cond.safetensors"
        cli_error(encode.main, ["x", "--out", target], capsys, prog=ENC,
                  names=["--out", out_dir / "report.json", "not a folder"], watch=[out_dir])

    def test_out_and_report_same_file(self, out_dir, capsys):
        f = out_dir / "cond.safetensors"
        cli_error(encode.main, ["x", "--out", f, "--report", f], capsys, prog=ENC,
                  names=["--out", "--report", "same file"], watch=[out_dir])

    def test_bad_choice_is_argparse_exit_2(self, capsys):
        with pytest.raises(SystemExit) as info:
            run_cli(encode.main, ["x", "--overflow", "grow"], prog=ENC)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "--overflow" in err and "'grow'" in err and "Traceback" not in err


class TestRunCli:
    def test_debug_shows_the_traceback_of_a_user_error(self, out_dir, capsys):
        rc = run_cli(encode.main, ["x", "--budget", "0", "--debug"], prog=ENC)
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" in err and "--budget must be" in err

    def test_a_real_bug_keeps_its_traceback(self, monkeypatch, out_dir):
        def broken(*args, **kwargs):
            raise ZeroDivisionError("a bug")

        monkeypatch.setattr(encode, "embedded_default_encoder", broken)
        before = snapshot(out_dir)
        with pytest.raises(ZeroDivisionError):
            run_cli(encode.main, [str(a) for a in enc_args(out_dir, "x")], prog=ENC)
        assert_unchanged(before, out_dir)

    def test_a_bug_raising_plain_value_error_is_not_hidden(self):
        def main(argv):
            raise ValueError("internal invariant broken")

        with pytest.raises(ValueError, match="internal invariant"):
            run_cli(main, [], prog="x")

    def test_os_error_naming_a_file_is_a_user_error(self, capsys, tmp_path):
        def main(argv):
            raise OSError(28, "No space left on device", str(tmp_path / "big.bin"))

        assert run_cli(main, [], prog="x") == 2
        err = capsys.readouterr().err
        assert str(tmp_path / "big.bin") in err and "disk is full" in err and "Traceback" not in err

    def test_failed_write_leaves_no_temp_file_and_the_old_output(self, clip_text_dir, out_dir, monkeypatch, capsys):
        """A write that fails half-way (disk full) keeps the previous output and removes its temp file."""
        import safetensors.torch

        def full_disk(tensors, filename, metadata=None):
            with open(filename, "wb") as f:
                f.write(b"half")
            raise OSError(28, "No space left on device", filename)

        monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
        cli_error(encode.main, enc_args(out_dir, "A fox.", "--model", clip_text_dir), capsys, prog=ENC,
                  names=["disk is full"],
                  watch=[out_dir])


# ------------------------------------------------------------------------------------------------------------
# Images (Python API): range, dtype, channels, once, with the fix in the message


class TestImages:
    @pytest.mark.parametrize("make, fix", [
        (lambda x: x * 255, "divide by 255"),
        (lambda x: x * 2 - 1, "(images + 1) / 2"),
        (lambda x: (x * 255).to(torch.uint8), "images.float() / 255"),
        (lambda x: x.permute(0, 2, 3, 1).contiguous(), "permute(0, 3, 1, 2)"),
        (lambda x: x[:, :1] * 0 + torch.nan, "grey"),
        (lambda x: x.double() * 1e6, "rescale"),
        (lambda x: x * 1.3 - 0.15, "images.clamp(0, 1)"),
    ], ids=["0-255 floats", "[-1,1]", "uint8", "channels-last", "grey", "huge", "overshoot"])
    def test_bad_images_are_refused_with_the_conversion(self, denscore, make, fix):
        x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        err = api_error(lambda: segment_score(denscore, make(x), "A fox."), BadInputError, names=[fix])
        assert isinstance(err, ValueError)

    def test_uint8_never_gives_nan_scores(self, denscore):
        x = (torch.rand(1, 3, 32, 32) * 255).to(torch.uint8)
        api_error(lambda: segment_score(denscore, x, "A fox."), BadInputError, names=["uint8"])

    def test_small_resampling_overshoot_is_accepted(self, denscore):
        x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 1.08 - 0.04
        assert torch.isfinite(segment_score(denscore, x, "A fox.").score).all()

    def test_non_string_prompt_is_named_not_called_empty(self, denscore):
        x = torch.rand(2, 3, 32, 32)
        err = api_error(lambda: segment_score(denscore, x, ["A fox.", 7]), BadInputError,
                        names=["prompt 1", "is an int", "not a string"])
        assert "empty" not in str(err)

    def test_sixteen_bit_grey_png_is_read_at_its_depth(self, tmp_path):
        rng = np.random.default_rng(3)
        grey = rng.integers(0, 65536, (24, 20), dtype=np.uint16)
        grey[0, 0], grey[0, 1] = 0, 65535
        Image.fromarray(grey).save(tmp_path / "g16.png")
        expected = torch.from_numpy(grey.astype(np.float64) / 65535).float()  # written out independently
        got = score.load_image(tmp_path / "g16.png")
        assert got.shape == (3, 24, 20)
        for c in range(3):
            torch.testing.assert_close(got[c], expected, atol=1e-6, rtol=0)

    @pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK"])
    def test_eight_bit_modes_match_pil_rgb(self, tmp_path, mode):
        rng = np.random.default_rng(4)
        rgb = Image.fromarray(rng.integers(0, 255, (16, 12, 3), dtype=np.uint8))
        img = rgb.convert(mode)
        path = tmp_path / ("x.png" if mode != "CMYK" else "x.jpg")
        img.save(path)
        with Image.open(path) as reread:
            expected = torch.from_numpy(np.asarray(reread.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
        torch.testing.assert_close(score.load_image(path), expected)


# ------------------------------------------------------------------------------------------------------------
# score CLI


class TestScoreCli:
    def test_sixteen_bit_grey_png_scores_as_the_independent_conversion(self, tmp_path, tiny_clip_dir, denscore,
                                                                        ref_prompts, capsys):
        from longalign_core.denscore import segment_score
        from longalign_core.reference_direction import direction_from_prompts

        rng = np.random.default_rng(5)
        grey = (np.linspace(0, 65535, 40 * 40).reshape(40, 40) * rng.uniform(0.2, 1, (40, 40))).astype(np.uint16)
        images = tmp_path / "imgs"
        images.mkdir()
        Image.fromarray(grey).save(images / "g16.png")
        out = tmp_path / "s.csv"
        assert run_cli(score.main, ["--model", str(tiny_clip_dir), "--images", str(images), "--prompt", "A fox.",
                                    "--reference-prompts", str(ref_prompts), "--csv", str(out),
                                    "--plot", str(tmp_path / "s.png")], prog=SCORE) == 0
        row = next(r for r in csv.DictReader(out.open()) if r["segment"] == "all")
        pixels = torch.from_numpy(grey.astype(np.float32) / 65535)[None, None].expand(1, 3, -1, -1)
        v = direction_from_prompts(denscore, ref_prompts.read_text().splitlines())
        expected = segment_score(denscore, pixels, "A fox.", direction=v).score[0]
        assert float(row["score"]) == pytest.approx(float(expected), abs=1e-5)
        clipped = torch.from_numpy(np.minimum(grey, 255).astype(np.float32) / 255)[None, None].expand(1, 3, -1, -1)
        wrong = segment_score(denscore, clipped, "A fox.", direction=v).score[0]
        assert abs(float(wrong) - float(expected)) > 1e-4  # the test could tell the old conversion apart

    def test_truncated_png_names_the_file(self, tmp_path, score_images, tiny_clip_dir, out_dir, capsys):
        images = tmp_path / "imgs"
        shutil.copytree(score_images, images)
        truncate(score_images / "b.png", images / "b.png", 0.5)
        cli_error(score.main, score_args(out_dir, tiny_clip_dir, images, "--prompt", "A fox."), capsys,
                  prog=SCORE, names=[images / "b.png", "truncated"], watch=[out_dir, images])

    def test_text_file_named_png(self, tmp_path, score_images, tiny_clip_dir, out_dir, capsys):
        images = tmp_path / "imgs"
        shutil.copytree(score_images, images)
        (images / "c.png").write_text("not an image")
        cli_error(score.main, score_args(out_dir, tiny_clip_dir, images, "--prompt", "A fox."), capsys,
                  prog=SCORE, names=[images / "c.png", "not an image"], watch=[out_dir])

    def test_empty_image_file(self, tmp_path, tiny_clip_dir, out_dir, capsys):
        (tmp_path / "e.png").write_bytes(b"")
        cli_error(score.main, score_args(out_dir, tiny_clip_dir, tmp_path / "e.png", "--prompt", "A fox."),
                  capsys, prog=SCORE, names=["--images", tmp_path / "e.png", "empty"], watch=[out_dir])

    def test_folder_without_images(self, tmp_path, tiny_clip_dir, out_dir, capsys):
        (tmp_path / "imgs").mkdir()
        (tmp_path / "imgs" / "notes.txt").write_text("x")
        cli_error(score.main, score_args(out_dir, tiny_clip_dir, tmp_path / "imgs", "--prompt", "A fox."),
                  capsys, prog=SCORE, names=["--images", tmp_path / "imgs", "no images"], watch=[out_dir])

    def test_missing_image(self, tmp_path, tiny_clip_dir, out_dir, capsys):
        cli_error(score.main, score_args(out_dir, tiny_clip_dir, tmp_path / "gone.png", "--prompt", "A fox."),
                  capsys, prog=SCORE, names=["--images", tmp_path / "gone.png", "not found"], watch=[out_dir])

    def test_dangling_link_inside_the_folder(self, tmp_path, score_images, tiny_clip_dir, out_dir, capsys):
        images = tmp_path / "imgs"
        shutil.copytree(score_images, images)
        os.symlink(tmp_path / "moved-away.png", images / "c.png")
        cli_error(score.main, score_args(out_dir, tiny_clip_dir, images, "--prompt", "A fox."), capsys,
                  prog=SCORE, names=[images / "c.png", "not found"], watch=[out_dir])

    def test_image_symlink_loop(self, tmp_path, tiny_clip_dir, out_dir, capsys):
        loop = symlink_loop(tmp_path, "x.png")
        cli_error(score.main, score_args(out_dir, tiny_clip_dir, loop, "--prompt", "A fox."), capsys,
                  prog=SCORE, names=[loop, "symbolic link loop"], watch=[out_dir])

    def test_batch_size_zero(self, score_images, tiny_clip_dir, out_dir, capsys):
        cli_error(score.main, score_args(out_dir, tiny_clip_dir, score_images, "--prompt", "x", "--batch-size",
                                         "0"), capsys, prog=SCORE, names=["--batch-size", "got 0"], watch=[out_dir])

    def test_omega_out_of_range(self, score_images, tiny_clip_dir, out_dir, capsys):
        cli_error(score.main, score_args(out_dir, tiny_clip_dir, score_images, "--prompt", "x", "--omega", "3"),
                  capsys, prog=SCORE, names=["--omega", "[0, 1]", "3"], watch=[out_dir])

    def test_bad_jsonl_line(self, prompts_dir, score_images, tiny_clip_dir, out_dir, capsys):
        p = prompts_dir / "p.jsonl"
        p.write_text('{"image": "a.png", "prompt": "A fox."}\n\n{"image": "b.png", prompt: "x"}\n')
        cli_error(score.main, score_args(out_dir, tiny_clip_dir, score_images, "--prompts", p), capsys,
                  prog=SCORE, names=[f"{p}:3", "not valid JSON"], watch=[out_dir])

    def test_non_string_prompt_in_jsonl(self, prompts_dir, score_images, tiny_clip_dir, out_dir, capsys):
        p = prompts_dir / "p.jsonl"
        p.write_text('{"image": "a.png", "prompt": "A fox."}\n{"image": "b.png", "prompt": ["A", "cat"]}\n')
        cli_error(score.main, score_args(out_dir, tiny_clip_dir, score_images, "--prompts", p), capsys,
                  prog=SCORE, names=[f"{p}:2", "'prompt' is a list"], watch=[out_dir])

    def test_duplicate_image_in_jsonl(self, prompts_dir, score_images, tiny_clip_dir, out_dir, capsys):
        p = prompts_dir / "p.jsonl"
        p.write_text('{"image": "a.png", "prompt": "A fox."}\n{"image": "a.png", "prompt": "A cat."}\n')
        cli_error(score.main, score_args(out_dir, tiny_clip_dir, score_images, "--prompts", p), capsys,
                  prog=SCORE, names=[f"{p}:2", "line 1", "a.png"], watch=[out_dir])

    def test_txt_prompt_count_mismatch(self, prompts_dir, score_images, tiny_clip_dir, out_dir, capsys):
        p = prompts_dir / "p.txt"
        p.write_text("A fox.\n")
        cli_error(score.main, score_args(out_dir, tiny_clip_dir, score_images, "--prompts", p), capsys,
                  prog=SCORE, names=[p, "1 prompts for 2 images"], watch=[out_dir])

    def test_csv_prompts_file_is_refused(self, prompts_dir, score_images, tiny_clip_dir, out_dir, capsys):
        p = prompts_dir / "p.csv"
        p.write_text("image,prompt\na.png,A fox.\n")
        cli_error(score.main, score_args(out_dir, tiny_clip_dir, score_images, "--prompts", p), capsys,
                  prog=SCORE, names=["--prompts", p, ".csv"], watch=[out_dir])

    def test_corrupt_model_safetensors_names_the_file(self, model_copy, score_images, out_dir, capsys):
        truncate(model_copy / "model.safetensors", model_copy / "model.safetensors", 0.4)
        cli_error(score.main, score_args(out_dir, model_copy, score_images, "--prompt", "x"), capsys, prog=SCORE,
                  names=[model_copy / "model.safetensors", "download its model.safetensors again"], watch=[out_dir])

    def test_garbage_model_safetensors(self, model_copy, score_images, out_dir, capsys):
        (model_copy / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage" + b"\0" * 64)
        cli_error(score.main, score_args(out_dir, model_copy, score_images, "--prompt", "x"), capsys, prog=SCORE,
                  names=[model_copy / "model.safetensors", "not a valid safetensors"], watch=[out_dir])

    def test_model_config_is_not_clip(self, model_copy, score_images, out_dir, capsys):
        (model_copy / "config.json").write_text('{"model_type": "t5"}')
        cli_error(score.main, score_args(out_dir, model_copy, score_images, "--prompt", "x"), capsys, prog=SCORE,
                  names=[model_copy, "'t5'", "CLIPModel"], watch=[out_dir])

    def test_missing_processor_folder_is_not_silently_replaced(self, tmp_path, tiny_clip_dir, score_images,
                                                              out_dir, capsys):
        cli_error(score.main, score_args(out_dir, tiny_clip_dir, score_images, "--prompt", "x", "--processor",
                                         tmp_path / "CLIP-H"), capsys, prog=SCORE,
                  names=[tmp_path / "CLIP-H", "processor folder", "not found"], watch=[out_dir])

    def test_missing_model_folder(self, tmp_path, score_images, out_dir, capsys):
        cli_error(score.main, score_args(out_dir, tmp_path / "models" / "Denscore", score_images, "--prompt", "x"),
                  capsys, prog=SCORE, names=[tmp_path / "models" / "Denscore", "not found"], watch=[out_dir])

    def test_corrupt_open_clip_checkpoint(self, tmp_path, score_images, out_dir, capsys):
        ckpt = tmp_path / "HPS_v2_compressed.pt"
        ckpt.write_bytes(b"PK\x03\x04" + b"\0" * 100)
        cli_error(score.main, score_args(out_dir, ckpt, score_images, "--prompt", "x"), capsys, prog=SCORE,
                  names=[ckpt, "truncated or corrupt"], watch=[out_dir])

    def test_csv_is_a_folder(self, score_images, tiny_clip_dir, out_dir, capsys):
        cli_error(score.main, ["--model", tiny_clip_dir, "--images", score_images, "--prompt", "x", "--csv",
                               out_dir], capsys, prog=SCORE, names=["--csv", out_dir, "folder"], watch=[out_dir])

    def test_csv_and_plot_same_file(self, score_images, tiny_clip_dir, out_dir, capsys):
        f = out_dir / "scores.csv"
        cli_error(score.main, ["--model", tiny_clip_dir, "--images", score_images, "--prompt", "x", "--csv", f,
                               "--plot", f], capsys, prog=SCORE, names=["--csv", "--plot", "same file"],
                  watch=[out_dir])

    def test_empty_reference_prompts(self, prompts_dir, score_images, tiny_clip_dir, out_dir, capsys):
        (prompts_dir / "ref.txt").write_text("\n\n")
        cli_error(score.main, score_args(out_dir, tiny_clip_dir, score_images, "--prompt", "x",
                                         "--reference-prompts", prompts_dir / "ref.txt"), capsys, prog=SCORE,
                  names=["--reference-prompts", prompts_dir / "ref.txt", "no prompts"], watch=[out_dir])


class TestDirectionCache:
    @pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "no direction"])
    def test_corrupt_cache_is_recomputed_with_a_warning(self, tmp_path, denscore, ref_prompts, damage, caplog):
        from longalign_core.reference_direction import direction_from_prompts, direction_key

        prompts = ref_prompts.read_text().splitlines()
        expected = direction_from_prompts(denscore, prompts)
        cache = tmp_path / "longalign_direction-x.safetensors"
        direction_from_prompts(denscore, prompts, cache_file=cache)
        if damage == "truncated":
            truncate(cache, cache, 0.6)
        elif damage == "garbage":
            cache.write_bytes(os.urandom(300))
        elif damage == "empty":
            cache.write_bytes(b"")
        else:
            save_file({"other": torch.ones(3)}, str(cache), metadata={"key": direction_key(denscore, prompts)})
        with caplog.at_level("WARNING", logger="LongAlign"):
            v = direction_from_prompts(denscore, prompts, cache_file=cache)
        torch.testing.assert_close(v, expected)
        assert str(cache) in caplog.text and "recomputed" in caplog.text
        torch.testing.assert_close(load_file(str(cache))["direction"], expected)  # rewritten, valid again
        assert sorted(p.name for p in tmp_path.iterdir()) == [cache.name]  # no temp file


# ------------------------------------------------------------------------------------------------------------
# LoRA: API and CLI


class TestLora:
    def test_values_beyond_fp16_are_refused_not_written_as_inf(self, tmp_path, targets, unet_config, out_dir,
                                                                 capsys):
        tensors = longsd_list(targets)
        tensors[5] = tensors[5].clone()
        tensors[5][0, 0] = 1e6
        src = tmp_path / "big.pt"
        torch.save(tensors, src)
        cli_error(lora.main, [src, out_dir / "lora.safetensors", "--unet-config", unet_config], capsys, prog=LORA,
                  names=[targets[2].path, "1e+06", "--dtype fp32"], watch=[out_dir])
        dst = tmp_path / "fp32.safetensors"
        assert run_cli(lora.main, [str(src), str(dst), "--unet-config", str(unet_config), "--dtype", "fp32"],
                       prog=LORA) == 0
        written = load_file(str(dst))
        name = targets[2].kohya_name
        assert torch.equal(written[f"{name}.lora_down.weight"], tensors[5])  # kept exactly, finite

    def test_nan_values_are_refused(self, tmp_path, targets, unet_config, out_dir, capsys):
        tensors = longsd_list(targets)
        tensors[0] = tensors[0].clone()
        tensors[0][1, 1] = float("nan")
        torch.save(tensors, tmp_path / "nan.pt")
        cli_error(lora.main, [tmp_path / "nan.pt", out_dir / "lora.safetensors", "--unet-config", unet_config],
                  capsys, prog=LORA, names=[targets[0].path, "NaN"], watch=[out_dir])

    def test_pair_shape_error_quotes_shapes_from_the_layer_and_the_files_rank(self, tmp_path, targets):
        tensors = longsd_list(targets, rank=4)
        k = 3
        out_ch, in_ch = targets[k].weight_shape[:2]
        tensors[2 * k + 1] = torch.zeros(in_ch + 5, *targets[k].weight_shape[1:])  # a broken down: (in+5, in, …)
        torch.save(tensors, tmp_path / "bad.pt")
        kernel = list(targets[k].weight_shape[2:])
        up_extra = [1, 1] if targets[k].kind == "conv" else []
        api_error(lambda: lora.read_longsd_lora(tmp_path / "bad.pt", targets), lora.LoraFormatError,
                  names=[tmp_path / "bad.pt", f"LoRA pair {k}", "rank 4",
                         f"expected up {[out_ch, 4] + up_extra} and down {[4, in_ch] + kernel}"])

    def test_swapped_up_and_down_are_called_swapped(self, tmp_path, targets):
        tensors = longsd_list(targets, rank=4)
        k = next(i for i, t in enumerate(targets) if t.kind == "linear")
        tensors[2 * k], tensors[2 * k + 1] = tensors[2 * k + 1], tensors[2 * k]
        torch.save(tensors, tmp_path / "swapped.pt")
        api_error(lambda: lora.read_longsd_lora(tmp_path / "swapped.pt", targets), lora.LoraFormatError,
                  names=[f"LoRA pair {k}", "swapped"])

    def test_missing_lora_file_is_called_missing(self, tmp_path, targets, unet_config, out_dir, capsys):
        r = cli_error(lora.main, [tmp_path / "sd15-reward-3750.pt", out_dir / "lora.safetensors", "--unet-config",
                                  unet_config], capsys, prog=LORA,
                      names=[tmp_path / "sd15-reward-3750.pt", "not found"], watch=[out_dir])
        assert "corrupt" not in r.stderr and "truncated" not in r.stderr
        err = api_error(lambda: lora.load_lora(tmp_path / "x.safetensors", targets), BadModelFileError,
                        names=["not found"])
        assert "corrupt" not in str(err)

    @pytest.mark.parametrize("state", ["missing", "empty", "folder"])
    def test_longsd_reader_names_the_file_state(self, tmp_path, targets, state):
        """The reader itself (nodes and the trainer call it without the CLI's checks)."""
        path = tmp_path / "sd15-reward-3750.pt"
        if state == "empty":
            path.write_bytes(b"")
        elif state == "folder":
            path.mkdir()
        word = {"missing": "not found", "empty": "empty", "folder": "is a folder"}[state]
        err = api_error(lambda: lora.read_longsd_lora(path, targets), lora.LoraFormatError, names=[path, word])
        assert "corrupt" not in str(err)

    def test_truncated_lora_pt(self, tmp_path, good_pt, unet_config, out_dir, capsys):
        bad = truncate(good_pt, tmp_path / "half.pt")
        cli_error(lora.main, [bad, out_dir / "lora.safetensors", "--unet-config", unet_config], capsys, prog=LORA,
                  names=[bad, "truncated or corrupt"], watch=[out_dir])

    def test_empty_lora_file(self, tmp_path, unet_config, out_dir, capsys):
        (tmp_path / "e.pt").write_bytes(b"")
        cli_error(lora.main, [tmp_path / "e.pt", out_dir / "lora.safetensors", "--unet-config", unet_config],
                  capsys, prog=LORA, names=[tmp_path / "e.pt", "empty"], watch=[out_dir])

    def test_corrupt_kohya_safetensors(self, tmp_path, targets, good_pt):
        pairs = lora.read_longsd_lora(good_pt, targets)
        path = lora.save_kohya(pairs, tmp_path / "k.safetensors")
        truncate(path, path, 0.5)
        api_error(lambda: lora.load_lora(path, targets), BadModelFileError,
                  names=[path, "not a valid safetensors file"], watch=[tmp_path])

    def test_pickle_with_code_is_refused_by_the_cli(self, tmp_path, unet_config, out_dir, capsys):
        marker = tmp_path / "pwned"

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        torch.save([torch.zeros(1), Payload()], tmp_path / "evil.pt")
        cli_error(lora.main, [tmp_path / "evil.pt", out_dir / "lora.safetensors", "--unet-config", unet_config],
                  capsys, prog=LORA, names=[tmp_path / "evil.pt", "pickled"], watch=[out_dir])
        assert not marker.exists()

    def test_src_is_a_folder(self, tmp_path, unet_config, out_dir, capsys):
        cli_error(lora.main, [tmp_path, out_dir / "lora.safetensors", "--unet-config", unet_config], capsys,
                  prog=LORA, names=[tmp_path, "is a folder"], watch=[out_dir])

    def test_src_already_safetensors(self, tmp_path, out_dir, capsys):
        (tmp_path / "k.safetensors").write_bytes(b"x" * 20)
        cli_error(lora.main, [tmp_path / "k.safetensors", out_dir / "new.safetensors"], capsys, prog=LORA,
                  names=[tmp_path / "k.safetensors", "already a .safetensors"], watch=[out_dir])

    def test_dst_wrong_extension(self, good_pt, out_dir, capsys):
        cli_error(lora.main, [good_pt, out_dir / "lora.pt"], capsys, prog=LORA,
                  names=["dst", out_dir / "lora.pt", ".safetensors"], watch=[out_dir])

    def test_dst_is_a_folder(self, good_pt, out_dir, capsys):
        cli_error(lora.main, [good_pt, out_dir], capsys, prog=LORA, names=["dst", out_dir, "folder"],
                  watch=[out_dir])

    def test_unet_config_not_json(self, tmp_path, good_pt, out_dir, capsys):
        cfg = tmp_path / "config.json"
        cfg.write_text('{\n "block_out_channels": [32, 64],\n}')
        cli_error(lora.main, [good_pt, out_dir / "lora.safetensors", "--unet-config", cfg], capsys, prog=LORA,
                  names=[f"{cfg}:3", "not valid JSON"], watch=[out_dir])

    def test_unet_config_of_another_model(self, tmp_path, good_pt, out_dir, capsys):
        cfg = tmp_path / "config.json"
        cfg.write_text('{"model_type": "clip_text_model"}')
        cli_error(lora.main, [good_pt, out_dir / "lora.safetensors", "--unet-config", cfg], capsys, prog=LORA,
                  names=[cfg, "not a diffusers UNet config"], watch=[out_dir])

    def test_missing_unet_config(self, tmp_path, good_pt, out_dir, capsys):
        cli_error(lora.main, [good_pt, out_dir / "lora.safetensors", "--unet-config", tmp_path / "nope"], capsys,
                  prog=LORA, names=[tmp_path / "nope", "no UNet config.json"], watch=[out_dir])

    def test_lora_for_another_unet(self, good_pt, out_dir, capsys):
        """The tiny LoRA against the default SD1.5 layout: the count does not match."""
        cli_error(lora.main, [good_pt, out_dir / "lora.safetensors"], capsys, prog=LORA,
                  names=[good_pt, "LoRA targets", "base model"], watch=[out_dir])


# ------------------------------------------------------------------------------------------------------------
# Preference model loader (Python API)


class TestPreferenceApi:
    def test_config_json_garbage(self, model_copy):
        from longalign_core.preference import load_preference_model

        (model_copy / "config.json").write_text("{not json")
        api_error(lambda: load_preference_model(model_copy), BadModelFileError,
                  names=[model_copy / "config.json", "not valid JSON"])

    def test_empty_weights_file(self, model_copy):
        from longalign_core.preference import load_preference_model

        (model_copy / "model.safetensors").write_bytes(b"")
        api_error(lambda: load_preference_model(model_copy), BadModelFileError,
                  names=[model_copy / "model.safetensors", "empty"])

    def test_weights_file_is_a_folder(self, model_copy):
        from longalign_core.preference import load_preference_model

        (model_copy / "model.safetensors").unlink()
        (model_copy / "model.safetensors").mkdir()
        api_error(lambda: load_preference_model(model_copy), BadModelFileError,
                  names=[model_copy / "model.safetensors", "folder"])

    def test_corrupt_t5_adapter_weights(self, tmp_path, tiny_adapter_dir):
        from longalign_core.t5_branch import load_text_adapter

        folder = tmp_path / "s28750_adapter"
        shutil.copytree(tiny_adapter_dir, folder)
        weights = folder / "diffusion_pytorch_model.safetensors"
        truncate(weights, weights, 0.5)
        api_error(lambda: load_text_adapter(folder), BadModelFileError, names=[weights, "truncated", "download"])

    def test_corrupt_t5_encoder_weights(self, tmp_path, t5_dir, tiny_adapter_dir):
        from longalign_core.t5_branch import load_t5_branch

        folder = tmp_path / "t5-large"
        shutil.copytree(t5_dir, folder)
        (folder / "model.safetensors").write_bytes(os.urandom(64))
        api_error(lambda: load_t5_branch(folder, tiny_adapter_dir), BadModelFileError,
                  names=[folder / "model.safetensors", "not a valid safetensors"])

    def test_errors_are_one_vocabulary(self):
        from longalign_core.io_utils import CheckpointError
        from longalign_core.preference import PreferenceModelError

        for cls in (lora.LoraFormatError, PreferenceModelError, CheckpointError):
            assert issubclass(cls, BadModelFileError) and issubclass(cls, ValueError)
        assert issubclass(BadConfigError, LongAlignError) and issubclass(BadInputError, LongAlignError)


# ------------------------------------------------------------------------------------------------------------
# The real entry points, once each (subprocess): one paragraph, exit 2, no traceback


def test_entry_points_print_one_paragraph(tmp_path, score_images):
    """The real ``python -m`` entry points (run side by side to keep the catalogue fast): exit 2, one
    paragraph naming the option or file, no traceback (``--debug``: TestRunCli)."""
    outs = [tmp_path / f"out{i}" for i in range(3)]
    for o in outs:
        previous_outputs(o, "cond.safetensors", "scores.csv", "lora.safetensors")
    module_errors([
        ("longalign_core.encode", ["x", "--budget", "0", "--out", outs[0] / "cond.safetensors"],
         ["--budget", "got 0"], [outs[0]]),
        ("longalign_core.score", ["--model", tmp_path / "nope", "--images", score_images, "--prompt", "x",
                                  "--batch-size", "0", "--csv", outs[1] / "scores.csv"], ["--batch-size"], [outs[1]]),
        ("longalign_core.lora", [tmp_path / "missing.pt", outs[2] / "lora.safetensors"],
         [tmp_path / "missing.pt", "not found"], [outs[2]]),
    ], cwd=tmp_path)


def test_watched_helper_sees_a_left_temp_file(tmp_path):
    """The catalogue's own check can fail: a stray temp file is reported."""
    with pytest.raises(AssertionError, match="appeared"):
        with watched(tmp_path):
            (tmp_path / ".cond.safetensors.x.tmp").write_bytes(b"")
