"""A full workflow through a real ComfyUI server (headless, CPU, 127.0.0.1 only). Skips without COMFYUI_PATH.

checkpoint -> LongAlign Text Encode (positive, ~300 tokens) + LongAlign Text Encode (negative) -> KSampler ->
VAEDecode -> SaveImage, plus the report into "Preview as Text". The pack is installed into a scratch
custom_nodes/ the way ComfyUI Manager would install it. Set COMFYUI_PYTHON to the interpreter of ComfyUI's
environment if it is not this one.
"""

import shutil

import pytest

from comfy_support import http, install_pack, requires_comfy, start_comfy, stop_comfy
from longalign_core.examples import EXAMPLE_NEGATIVE, EXAMPLE_PROMPT

pytestmark = requires_comfy

LONG_300 = EXAMPLE_PROMPT + " " + EXAMPLE_PROMPT.replace("lighthouse", "windmill")[:420]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_clip_dir, standin_checkpoints):
    base = tmp_path_factory.mktemp("comfy_base")
    standin_checkpoints.place("sd15", base / "models" / "checkpoints" / "tiny_sd15.safetensors")
    shutil.copytree(tiny_clip_dir, base / "models" / "denscore" / "tiny-denscore")
    install_pack(base / "custom_nodes")
    proc, srv = start_comfy(base)
    try:
        yield srv.url, base, srv
    finally:
        stop_comfy(proc)


def run_workflow(srv, workflow):
    return srv.run(workflow, "workflow")


def test_node_is_registered(server):
    url, base, srv = server
    status, info = http("GET", url + "/object_info/LongAlignTextEncode")
    assert status == 200 and "LongAlignTextEncode" in info, (base / "server.log").read_text()[-3000:]
    node = info["LongAlignTextEncode"]
    assert node["category"] == "LongAlign/conditioning"
    assert node["output"] == ["CONDITIONING", "STRING", "INT", "INT"]
    assert node["output_name"][1:] == ["report", "segments", "tokens"]
    required = node["input"]["required"]
    assert set(required) == {"clip", "text", "token_budget", "overflow", "split_mode", "long_sentences"}
    assert all(spec[1].get("tooltip") for spec in required.values())
    assert "IMPORT FAILED" not in (base / "server.log").read_text()


def test_long_prompt_workflow_samples_an_image(server):
    url, base, srv = server
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
    entry = run_workflow(srv, workflow)
    images = entry["outputs"]["7"]["images"]
    assert len(images) == 1
    path = base / "output" / images[0]["subfolder"] / images[0]["filename"]
    from PIL import Image

    with Image.open(path) as img:
        assert img.size == (64, 64)
    report = entry["outputs"]["8"]["text"][0]
    assert "segments" in report and "extended to 480" in report and "cut" not in report


def test_batch_scored_with_denscore_chart_and_best_of_n(server):
    url, base, srv = server
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
    entry = run_workflow(srv, workflow)
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
