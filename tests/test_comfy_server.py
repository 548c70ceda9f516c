"""A full workflow through a real ComfyUI server (headless, CPU, 127.0.0.1 only). Skips without COMFYUI_PATH.

checkpoint -> LongAlign Text Encode (positive, ~300 tokens) + LongAlign Text Encode (negative) -> KSampler ->
VAEDecode -> SaveImage, plus the report into "Preview as Text". The pack is installed into a scratch
custom_nodes/ the way ComfyUI Manager would install it. Set COMFYUI_PYTHON to the interpreter of ComfyUI's
environment if it is not this one.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from comfy_support import COMFYUI_PATH, build_tiny_sd15_checkpoint, install_pack, requires_comfy
from longalign_core.examples import EXAMPLE_NEGATIVE, EXAMPLE_PROMPT

pytestmark = requires_comfy

LONG_300 = EXAMPLE_PROMPT + " " + EXAMPLE_PROMPT.replace("lighthouse", "windmill")[:420]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, timeout=30):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_clip_dir):
    base = tmp_path_factory.mktemp("comfy_base")
    build_tiny_sd15_checkpoint(base / "models" / "checkpoints" / "tiny_sd15.safetensors")
    shutil.copytree(tiny_clip_dir, base / "models" / "denscore" / "tiny-denscore")
    install_pack(base / "custom_nodes")
    port = free_port()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(
        [python, os.path.join(COMFYUI_PATH, "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
         "--disable-auto-launch", "--disable-api-nodes", "--database-url", "sqlite:///:memory:", "--log-stdout",
         "--base-directory", str(base)],
        cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail("ComfyUI exited during start-up:\n" + (base / "server.log").read_text()[-4000:])
            try:
                if http("GET", url + "/system_stats", timeout=5)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.time() > deadline:
                pytest.fail("ComfyUI did not start in 120 s:\n" + (base / "server.log").read_text()[-4000:])
            time.sleep(0.5)
        yield url, base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def run_workflow(url, workflow, timeout=300):
    status, resp = http("POST", url + "/prompt", {"prompt": workflow, "client_id": "longalign-tests"})
    assert status == 200 and "prompt_id" in resp, f"workflow rejected: {json.dumps(resp)[:3000]}"
    pid = resp["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        _, hist = http("GET", f"{url}/history/{pid}")
        entry = (hist or {}).get(pid)
        if entry and entry.get("status", {}).get("completed") is not None:
            assert entry["status"].get("status_str") != "error", json.dumps(entry["status"])[:4000]
            return entry
        time.sleep(0.3)
    pytest.fail(f"workflow {pid} did not finish in {timeout} s")


def test_node_is_registered(server):
    url, base = server
    status, info = http("GET", url + "/object_info/LongAlignTextEncode")
    assert status == 200 and "LongAlignTextEncode" in info, (base / "server.log").read_text()[-3000:]
    node = info["LongAlignTextEncode"]
    assert node["category"] == "LongAlign/conditioning"
    assert node["output"] == ["CONDITIONING", "STRING"]
    required = node["input"]["required"]
    assert set(required) == {"clip", "text", "token_budget", "overflow", "split_mode", "long_sentences"}
    assert all(spec[1].get("tooltip") for spec in required.values())
    assert "IMPORT FAILED" not in (base / "server.log").read_text()


def test_long_prompt_workflow_samples_an_image(server):
    url, base = server
    workflow = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "LongAlignTextEncode", "inputs": {
            "clip": ["1", 1], "text": LONG_300, "token_budget": 240, "overflow": "extend",
            "split_mode": "sentence", "long_sentences": "split"}},
        "3": {"class_type": "LongAlignTextEncode", "inputs": {
            "clip": ["1", 1], "text": EXAMPLE_NEGATIVE, "token_budget": 240, "overflow": "extend",
            "split_mode": "sentence", "long_sentences": "split"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 1,
            "steps": 2, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "longalign_e2e"}},
        "8": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }
    entry = run_workflow(url, workflow)
    images = entry["outputs"]["7"]["images"]
    assert len(images) == 1
    path = base / "output" / images[0]["subfolder"] / images[0]["filename"]
    from PIL import Image

    with Image.open(path) as img:
        assert img.size == (64, 64)
    report = entry["outputs"]["8"]["text"][0]
    assert "segments" in report and "extended to 480" in report and "cut" not in report


def test_batch_scored_with_denscore_chart_and_best_of_n(server):
    url, base = server
    common = {"denscore_model": ["9", 0], "images": ["6", 0], "text": EXAMPLE_PROMPT, "omega": 0.3,
              "reference_prompts": "", "split_mode": "sentence"}
    workflow = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "LongAlignTextEncode", "inputs": {
            "clip": ["1", 1], "text": EXAMPLE_PROMPT, "token_budget": 240, "overflow": "extend",
            "split_mode": "sentence", "long_sentences": "split"}},
        "3": {"class_type": "LongAlignTextEncode", "inputs": {
            "clip": ["1", 1], "text": "", "token_budget": 240, "overflow": "extend",
            "split_mode": "sentence", "long_sentences": "split"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 3}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 3,
            "steps": 2, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "9": {"class_type": "LongAlignPreferenceModelLoader", "inputs": {
            "model_name": "tiny-denscore", "kind": "auto", "precision": "fp32"}},
        "10": {"class_type": "LongAlignDenscoreScore", "inputs": dict(common)},
        "11": {"class_type": "LongAlignDenscoreBestOfN", "inputs": dict(common, rank_by="score")},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "longalign_best"}},
        "13": {"class_type": "SaveImage", "inputs": {"images": ["10", 5], "filename_prefix": "longalign_chart"}},
        "14": {"class_type": "PreviewAny", "inputs": {"source": ["11", 3]}},
    }
    entry = run_workflow(url, workflow)
    outputs = entry["outputs"]
    assert "images" in outputs["10"] and "Denscore x100" in outputs["10"]["text"][0]
    assert "image 2" in outputs["10"]["text"][0]
    best = outputs["12"]["images"]
    assert len(best) == 1
    chart = outputs["13"]["images"][0]
    from PIL import Image

    with Image.open(base / "output" / chart["subfolder"] / chart["filename"]) as img:
        assert img.size[0] >= 600
    assert outputs["14"]["text"][0].startswith("best: image ")
