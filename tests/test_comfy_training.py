"""LongAlign Train LoRA and LongAlign Evaluate LoRA in a real ComfyUI server (headless, CPU, 127.0.0.1), on the
SD1.5 stand-in checkpoint and a tiny preference model folder, against the same runs of ``python -m
trainer.finetune`` / ``python -m trainer.evaluate`` on the command line. Skips without COMFYUI_PATH.

Runs are tiny (64 px, 2 sampling steps, rank 4, 4 steps) so that the whole file takes a few minutes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_support import Server, http, import_comfy, install_pack, requires_comfy, start_comfy, stop_comfy

pytestmark = requires_comfy

REPO = Path(__file__).resolve().parents[1]
CKPT, DENSCORE = "sd15_standin.safetensors", "tiny_denscore"
PROMPTS = ["A lighthouse on a cliff. Waves crash below. Gulls circle the tower.",
           "A red fox sits on a mossy rock. Behind it a waterfall drops into a pool.",
           "A market street at dusk. Lanterns hang over the stalls. A cat sleeps on a crate."]
TINY = "--lr-warmup-steps 0 --validation-prompts 1 --validation-steps 2"
STEPS = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_clip_dir, standin_checkpoints):
    base = tmp_path_factory.mktemp("training_nodes")
    models = base / "models"
    standin_checkpoints.place("sd15", models / "checkpoints" / CKPT)
    shutil.copytree(tiny_clip_dir, models / "denscore" / DENSCORE)
    broken = models / "denscore" / "broken_denscore"  # listed (config.json + weights) but unreadable
    shutil.copytree(tiny_clip_dir, broken)
    (broken / "config.json").write_text("{ not json")
    (models / "loras").mkdir(parents=True)
    (base / "input").mkdir()
    (base / "input" / "train_prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    _not_trainable_files(models / "checkpoints")
    install_pack(base / "custom_nodes")
    proc, srv = start_comfy(base)
    try:
        yield srv
    finally:
        stop_comfy(proc)


def _not_trainable_files(folder: Path) -> None:
    """Headers of an SD3-, a Flux- and an SD1.5-inpainting-shaped file (tiny tensors: only names and shapes
    matter, the node reads nothing else)."""
    vae = {"first_stage_model.encoder.conv_in.weight": torch.zeros(1), "first_stage_model.decoder.conv_in.weight":
           torch.zeros(1)}
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(1), **vae},
              str(folder / "sd3_like.safetensors"))
    save_file({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(1), **vae},
              str(folder / "flux_like.safetensors"))
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3),
               "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(1), **vae},
              str(folder / "inpainting_like.safetensors"))


def train_inputs(**over) -> dict:
    inputs = dict(mode="train", ckpt_name=CKPT, preference_model=DENSCORE, prompts="\n".join(PROMPTS),
                  prompts_file="(none)", lora_name="node_lora", steps=STEPS, lora_rank=4, learning_rate=0.01,
                  batch_size=1, gradient_accumulation=1, resolution=64, sample_steps=2, gradient_steps=1, omega=0.3,
                  training_seed=0, reward_direction="auto", mixed_precision="no", checkpoint_every=1, overwrite=False,
                  strength=1.0, validation_every=0, extra_options=TINY)
    inputs.update(over)
    return inputs


def train_graph(**over) -> dict:
    return {"1": {"class_type": "LongAlignTrainLoRA", "inputs": train_inputs(**over)},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 2]}}}


def cli_train(server: Server, out: Path, steps: int = STEPS) -> Path:
    """``python -m trainer.finetune`` with the options the node got, written out by hand."""
    prompts = out.parent / f"{out.name}-prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cmd = [sys.executable, "-m", "trainer.finetune", "--model", str(server.base / "models/checkpoints" / CKPT),
           "--reward-model", str(server.base / "models/denscore" / DENSCORE), "--prompts", str(prompts),
           "--output-dir", str(out), "--train-steps", str(steps), "--lora-rank", "4", "--learning-rate", "0.01",
           "--batch-size", "1", "--gradient-accumulation-steps", "1", "--resolution", "64", "--sample-steps", "2",
           "--sample-grad-steps", "1", "--reward-omega", "0.3", "--seed", "0", "--reward-direction", "auto",
           "--mixed-precision", "no", "--checkpoint-every", "1", "--validation-every", "0", *TINY.split()]
    _run(cmd)
    return out / "longalign_lora.safetensors"


def _run(cmd: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    output = (proc.stdout + proc.stderr)[-5000:]
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{output}"


def queue(server: Server, prompt: dict) -> str:
    status, resp = http("POST", server.url + "/prompt", {"prompt": prompt, "client_id": "longalign-training"})
    assert status == 200, f"rejected (HTTP {status}): {json.dumps(resp)[:3000]}"
    return resp["prompt_id"]


def wait(server: Server, pid: str, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        entry = (http("GET", f"{server.url}/history/{pid}")[1] or {}).get(pid)
        if entry and entry.get("status", {}).get("completed") is not None:
            return entry
        time.sleep(0.2)
    pytest.fail(f"prompt {pid} did not finish in {timeout} s:\n{server.log_text()[-3000:]}")


def error_of(entry: dict) -> str:
    """The message ComfyUI's error dialog shows for a failed prompt."""
    assert entry["status"]["status_str"] == "error", json.dumps(entry["status"])[:2000]
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors, json.dumps(entry["status"])[:2000]
    return errors[0]["exception_message"].rstrip("\n")  # ComfyUI ends it with a newline


def loras(server: Server) -> list[str]:
    return sorted(p.name for p in (server.base / "models" / "loras").iterdir())


def assert_same_tensors(a: Path, b: Path) -> None:
    sa, sb = load_file(str(a)), load_file(str(b))
    assert sorted(sa) == sorted(sb)
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def forget_direction(server: Server) -> None:
    for cached in (server.base / "models" / "denscore" / DENSCORE).glob("longalign_direction-*"):
        cached.unlink()


def child_pids(run_dir: Path) -> list[int]:
    """Processes running ``trainer.finetune`` into ``run_dir`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"trainer.finetune" in cmd and str(run_dir).encode() in cmd:
                found.append(int(entry.name))
    return found


def wait_for_checkpoint(run_dir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not (run_dir / "checkpoints" / f"checkpoint-{step:06d}" / "trainer_state.json").is_file():
        assert time.time() < deadline, f"no checkpoint of step {step} in {run_dir} after {timeout} s"
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------------------------------


def test_will_it_fit_reports_and_writes_no_lora(server):
    """The report comes out; the LoRA name and MODEL outputs block what is downstream (an Evaluate node queued
    with it would otherwise evaluate no LoRA, or an older one of that name)."""
    graph = train_graph(mode="will it fit", lora_name="fit_check")
    graph["3"] = {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}
    entry = server.run(graph, "will it fit")
    assert "3" not in entry["outputs"], entry["outputs"].get("3")
    text = entry["outputs"]["2"]["text"][0]
    assert "peak" in text.lower() and "step" in text, text
    assert text == entry["outputs"]["1"]["text"][0]
    assert loras(server) == []
    assert not (server.base / "output" / "longalign" / "train" / "fit_check").exists()


def test_train_writes_the_clis_lora_which_the_stock_loader_loads_whole(server, tmp_path, caplog):
    entry = server.run(train_graph(), "train")
    lora = server.base / "models" / "loras" / "node_lora.safetensors"
    assert loras(server) == ["node_lora.safetensors"]
    summary = entry["outputs"]["2"]["text"][0]
    assert str(lora) in summary and "report" in summary.lower()
    assert entry["outputs"]["1"]["images"], "the report is the node's preview"
    run = server.base / "output" / "longalign" / "train" / "node_lora"
    assert (run / "report.png").is_file() and (run / "validation" / "step-000004.png").is_file()

    assert_same_tensors(lora, cli_train(server, tmp_path / "cli"))

    comfy = import_comfy()
    import comfy.lora

    model, clip = comfy.sd.load_checkpoint_guess_config(str(server.base / "models/checkpoints" / CKPT))[:2]
    state = load_file(str(lora))
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(model, clip, state, 1.0, 1.0)  # what stock LoraLoader does
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    layers = [k for k in state if k.endswith(".lora_down.weight")]
    assert len(patched.patches) == len(layers) > 0


def test_a_used_lora_name_is_refused_without_resume_or_overwrite(server):
    before = loras(server)
    if "node_lora.safetensors" not in before:
        pytest.skip("needs the LoRA of the train test")
    # strength differs from the train test's graph: ComfyUI would answer an identical one from its cache
    message = error_of(wait(server, queue(server, train_graph(strength=0.5))))
    assert "node_lora" in message and "already exists" in message and "overwrite" in message
    assert loras(server) == before


def test_cancel_keeps_the_step_and_resume_equals_an_uninterrupted_run(server, tmp_path):
    run = server.base / "output" / "longalign" / "train" / "cancelled"
    pid = queue(server, train_graph(lora_name="cancelled"))
    wait_for_checkpoint(run, 1)
    asked = time.time()
    assert http("POST", server.url + "/interrupt", {})[0] == 200
    entry = wait(server, pid)
    stopped = time.time() - asked
    assert entry["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
    assert not child_pids(run), "the child still runs after Cancel"
    assert not (run / "longalign_lora.safetensors").exists(), "the run went on to the end"
    assert "cancelled.safetensors" not in loras(server)
    steps = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*")
                   if (p / "trainer_state.json").is_file())
    assert steps and steps[-1] < STEPS, steps
    assert stopped < 120  # a step here takes seconds
    assert f"training cancelled: the checkpoint of step {steps[-1]} is kept" in server.log_text()

    server.run(train_graph(lora_name="cancelled", mode="resume"), "resume")
    reference = tmp_path / "uninterrupted"
    assert_same_tensors(server.base / "models" / "loras" / "cancelled.safetensors", cli_train(server, reference))


def test_evaluate_scores_equal_the_clis(server, tmp_path):
    """The node's scores.csv is the CLI's, byte for byte. Each run computes the judge's V afresh (the cache next to
    the judge is removed before each). V read back from that cache once differed from a fresh one by up to 3e-8:
    MKL's results depended on memory alignment, different in each process, until the trainer's package set
    MKL_CBWR (tests/test_score_invariance.py)."""
    lora = server.base / "models" / "loras" / "node_lora.safetensors"
    if not lora.is_file():
        pytest.skip("needs the LoRA of the train test")
    cli = tmp_path / "cli_eval"
    forget_direction(server)
    _run([sys.executable, "-m", "trainer.evaluate", "--model", str(server.base / "models/checkpoints" / CKPT),
          "--lora", f"{lora}:1.0", "--reward-model", str(server.base / "models/denscore" / DENSCORE),
          "--num-prompts", "2", "--seeds", "1", "--steps", "2", "--seed", "0", "--resolution", "64",
          "--output-dir", str(cli)])
    inputs = dict(mode="evaluate", ckpt_name=CKPT, lora_name="node_lora", strength=1.0, lora_name_2="",
                  strength_2=1.0, preference_model=DENSCORE, prompts="", num_prompts=2, seeds=1, steps=2, first_seed=0,
                  run_name="eval_check", resolution=64, extra_options="")
    graph = {"1": {"class_type": "LongAlignEvaluateLoRA", "inputs": inputs},
             "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 2]}}}
    forget_direction(server)
    entry = server.run(graph, "evaluate")
    node_dir = server.base / "output" / "longalign" / "eval" / "eval_check"
    assert "win" in entry["outputs"]["2"]["text"][0].lower()
    assert entry["outputs"]["1"]["images"], "the report is the node's preview"
    assert (node_dir / "scores.csv").read_text() == (cli / "scores.csv").read_text()
    graph["1"]["inputs"]["first_seed"] = 1  # not ComfyUI's cached answer to the same graph
    again = error_of(wait(server, queue(server, graph)))
    assert "eval_check" in again and "already holds an evaluation" in again and "resume" in again


@pytest.mark.parametrize("over, expected", [
    ({"ckpt_name": "flux_like.safetensors"}, ["flux_like.safetensors", "Flux", "cannot fine-tune"]),
    ({"ckpt_name": "sd3_like.safetensors"}, ["sd3_like.safetensors", "Stable Diffusion 3", "cannot fine-tune"]),
    ({"ckpt_name": "inpainting_like.safetensors"}, ["inpainting_like.safetensors", "9 input channels"]),
    ({"preference_model": "broken_denscore"}, ["broken_denscore", "config.json", "unreadable"]),
    ({"prompts": " \n "}, ["no training prompts", "prompts_file"]),
    ({"prompts_file": "train_prompts.txt", "sample_steps": 3, "gradient_steps": 2},
     ["--sample-steps (3) must be a multiple of --sample-grad-steps (2)"]),
    ({"lora_name": "../escape"}, ["'../escape'", "not a usable file name"]),
], ids=["flux", "sd3", "inpainting", "unreadable_preference_model", "empty_prompts", "trainer_paragraph",
        "bad_name"])
def test_bad_input_is_one_message_and_nothing_under_loras(server, over, expected):
    before = loras(server)
    started = time.time()
    message = error_of(wait(server, queue(server, train_graph(**{"lora_name": "bad_input", **over}))))
    for part in expected:
        assert part in message, message
    assert "Traceback" not in message and "\n" not in message
    assert loras(server) == before
    if "sample_steps" not in over:  # refused before the trainer starts: no model loaded, no child
        assert time.time() - started < 20


def test_a_missing_preference_model_is_refused_at_queue_time(server):
    status, resp = http("POST", server.url + "/prompt", {"prompt": train_graph(preference_model="gone")})
    assert status == 400
    text = json.dumps(resp)
    assert "'gone' is not in ComfyUI/models/denscore/" in text and DENSCORE in text


def test_a_child_killed_from_outside_is_named_with_its_last_checkpoint(server):
    run = server.base / "output" / "longalign" / "train" / "killed"
    pid = queue(server, train_graph(lora_name="killed", steps=50))
    wait_for_checkpoint(run, 1)
    for child in child_pids(run):
        os.kill(child, signal.SIGKILL)
    message = error_of(wait(server, pid))
    assert "killed by SIGKILL" in message and "checkpoint of step" in message and "mode resume" in message
    assert "killed.safetensors" not in loras(server)
