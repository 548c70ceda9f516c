"""Helpers for tests against a real ComfyUI checkout (``COMFYUI_PATH``); those tests skip without it.

Nothing here copies ComfyUI code: it imports the checkout the user points at, the way ComfyUI's own loader
would (:mod:`standins.comfy_host`), and builds random-weight checkpoints of the shapes ComfyUI detects.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

# The host-side stand-ins (ComfyUI imported, this pack loaded as a custom node, random CLIP objects) live in
# standins/, shared with bench/; the tests import them from here as well.
from standins.comfy_host import (  # noqa: F401
    CLIP_SHAPES, COMFYUI_PATH, REPO, comfy_version, host_clip, import_comfy, load_pack, random_clip_text_state_dict)

requires_comfy = pytest.mark.skipif(not COMFYUI_PATH, reason="set COMFYUI_PATH to a ComfyUI checkout to run")

#: Test files that need a real ComfyUI besides ``test_comfy_*.py`` and tests marked ``requires_comfy``:
#: ``./dev test`` runs them (marker ``comfyui``) in ComfyUI's interpreter and everything else in the project's own.
COMFY_TEST_FILES = {"test_workflows_e2e.py", "test_browser.py", "test_browser_help.py", "test_packaging.py"}


def needs_comfy(item) -> bool:
    """A test that needs a real ComfyUI: a ComfyUI test file, or a test marked ``requires_comfy``."""
    name = item.path.name
    return name in COMFY_TEST_FILES or name.startswith("test_comfy_") or any(
        m.name == "skipif" and "COMFYUI_PATH" in str(m.kwargs.get("reason", "")) for m in item.iter_markers())


# -- pytest hooks (conftest.py re-exports them) -----------------------------------------------------------------


@pytest.hookimpl(trylast=True)  # after the terminal reporter is registered
def pytest_configure(config):
    config.addinivalue_line("markers", "comfyui: needs a real ComfyUI (COMFYUI_PATH); ./dev test runs these in "
                                       "ComfyUI's own interpreter")
    reporter = config.pluginmanager.getplugin("terminalreporter")
    if COMFYUI_PATH and reporter is not None and hasattr(reporter, "build_summary_stats_line"):
        build = reporter.build_summary_stats_line

        def with_version():  # the final summary line says which ComfyUI the node tests ran against
            parts, color = build()
            if any(item.get_closest_marker("comfyui") for item in getattr(reporter, "_comfy_items", [])):
                parts = parts + [(f"ComfyUI {comfy_version()}", {"bold": True})]
            return parts, color

        reporter.build_summary_stats_line = with_version


def pytest_report_header(config):
    if COMFYUI_PATH:
        return [f"ComfyUI {comfy_version()} at {COMFYUI_PATH} (server interpreter: "
                f"{os.environ.get('COMFYUI_PYTHON', sys.executable)})"]
    return []


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if needs_comfy(item):
            item.add_marker(pytest.mark.comfyui)


def pytest_collection_finish(session):
    """With COMFYUI_PATH set and ComfyUI tests selected, check once that this interpreter can import ComfyUI:
    one clear message instead of an error per test."""
    selected = [item for item in session.items if item.get_closest_marker("comfyui")]
    reporter = session.config.pluginmanager.getplugin("terminalreporter")
    if reporter is not None:
        reporter._comfy_items = selected
    if not COMFYUI_PATH or not selected:
        return
    try:
        import_comfy()
        import comfy_api.latest  # noqa: F401  (the V3 node API the pack uses)
    except Exception as exc:  # any import failure means the same thing here: wrong interpreter or checkout
        pytest.exit(f"COMFYUI_PATH={COMFYUI_PATH}: this interpreter ({sys.executable}) cannot import ComfyUI "
                    f"({type(exc).__name__}: {exc}). Run the ComfyUI tests with ComfyUI's own interpreter, which "
                    f"needs this pack's requirements and pytest: COMFYUI_PATH=... COMFYUI_PYTHON=/path/to/its/python "
                    f"./dev e2e (or unset COMFYUI_PATH)", returncode=4)

#: Files and folders that make up the installable pack (what ComfyUI Manager would put in custom_nodes/).
PACK_CONTENT = ["__init__.py", "nodes", "longalign_core", "trainer", "workflows", "web", "pyproject.toml",
                "requirements.txt"]
PACK_NAME = "ComfyUI-LongAlign"

def host_segment_reference(clip, segment_texts, pad_positions=60):
    """The host's own per-segment encodes, one call per segment, merged by position: the expected result."""
    parts = []
    for text in segment_texts:
        tokens = clip.tokenize(text)
        cond = clip.encode_from_tokens(tokens)[0]
        key = "l" if "l" in tokens else next(iter(tokens))
        ids = [e[0] for e in tokens[key][0]]
        n = next(i for i, t in enumerate(ids) if isinstance(t, int) and t == 49407)
        parts.append(cond[:n])
    empty = clip.encode_from_tokens(clip.tokenize(""))[0]
    return torch.cat(parts), empty[-pad_positions:].mean(0)


def ldm_unet_vae_shapes(unet_cfg: dict) -> dict[str, torch.Size]:
    """Single-file (LDM) key → shape for a UNet of ``unet_cfg`` and the full-size SD VAE, from ComfyUI's own
    modules on the meta device (nothing is allocated)."""
    import_comfy()
    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    shapes = {}
    with torch.device("meta"):
        unet = UNetModel(**unet_cfg, dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init)
        shapes.update({"model.diffusion_model." + k: v.shape for k, v in unet.state_dict().items()})
        vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
        shapes.update({"first_stage_model." + k: v.shape for k, v in vae.state_dict().items()})
    return shapes


def build_tiny_sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random-weight single-file checkpoint ComfyUI detects as SD1.5: LDM key layout, UNet shrunk to one
    level (model_channels 320 and context 768 are what detection needs), full-size CLIP-L and VAE (ComfyUI
    fixes their configs). Shapes come from ComfyUI's own modules on the meta device."""
    from safetensors.torch import save_file

    unet_cfg = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
                    channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
                    transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False,
                    use_spatial_transformer=True, legacy=False, adm_in_channels=None,
                    use_temporal_attention=False, num_heads=8, num_head_channels=-1, use_checkpoint=False)
    shapes = ldm_unet_vae_shapes(unet_cfg)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if len(shape) <= 1:
            value = torch.zeros(shape) if key.endswith("bias") else torch.ones(shape)
        else:
            value = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        sd[key] = value.half()
    for key, value in random_clip_text_state_dict("l", seed).items():
        sd["cond_stage_model.transformer." + key] = value.half()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"note": "random weights, LongAlign tests only"})
    return path


def _random(shape, key: str, gen_: torch.Generator) -> torch.Tensor:
    """fp16 random weights: LayerNorm-like 1-D ones/zeros, embeddings N(0, 0.3), matrices N(0, 1/fan_in)."""
    if len(shape) <= 1:
        fill = torch.zeros if key.endswith("bias") else torch.ones
        return fill(shape, dtype=torch.float16)
    std = 0.3 if "embedding" in key else 1 / math.sqrt(math.prod(shape[1:]))
    return torch.empty(shape, dtype=torch.float16).normal_(0, std, generator=gen_)


def _text_encoder_shapes(kind: str, with_projection: bool) -> dict[str, torch.Size]:
    """Key -> shape of a full-size CLIP text encoder in Hugging Face layout (built on the meta device)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407, **CLIP_SHAPES[kind])
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(cfg)
    shapes = {}
    for key, tensor in model.state_dict().items():
        if "position_ids" in key or (key.startswith("text_projection") and not with_projection):
            continue
        if not key.startswith(("text_model.", "text_projection")):
            key = "text_model." + key
        shapes[key] = tensor.shape
    return shapes


def _open_clip_text_shapes(width: int, layers: int, mlp: int, output_dim: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an OpenCLIP text tower in open_clip's own layout (``open_clip.transformer.TextTransformer``:
    q, k, v stacked in ``attn.in_proj_*``, ``text_projection`` as width x output_dim), as SDXL files store bigG."""
    shapes = {"token_embedding.weight": (49408, width), "positional_embedding": (77, width),
              "ln_final.weight": (width,), "ln_final.bias": (width,), "text_projection": (width, output_dim)}
    for n in range(layers):
        block = f"transformer.resblocks.{n}."
        shapes.update({block + "attn.in_proj_weight": (3 * width, width), block + "attn.in_proj_bias": (3 * width,),
                       block + "attn.out_proj.weight": (width, width), block + "attn.out_proj.bias": (width,),
                       block + "mlp.c_fc.weight": (mlp, width), block + "mlp.c_fc.bias": (mlp,),
                       block + "mlp.c_proj.weight": (width, mlp), block + "mlp.c_proj.bias": (width,)})
        shapes.update({block + f"{ln}.{p}": (width,) for ln in ("ln_1", "ln_2") for p in ("weight", "bias")})
    return shapes


#: The SDXL stand-in's UNet (LDM names, as ComfyUI's detection reports them). Detection matches model_channels
#: 320, linear transformers, transformer_depth [0, 0, 2, 2, 10, 10], context 2048 and adm 2816; the UNet is shrunk
#: where it does not look: every level at 320 channels (channel_mult [1, 1, 1]) and one block in the output
#: transformers (up blocks deeper-first: none, 1, 1 — diffusers' reverse_transformer_layers_per_block, which the
#: trainer's single-file loader infers). The middle keeps the last level's 10 blocks: diffusers builds the middle
#: with that depth, and the trainer loads this very file through diffusers.
SDXL_STANDIN_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
                         channel_mult=[1, 1, 1], transformer_depth=[0, 0, 2, 2, 10, 10],
                         transformer_depth_output=[1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=10,
                         context_dim=2048, use_linear_in_transformer=True, use_spatial_transformer=True,
                         legacy=False, num_classes="sequential", adm_in_channels=2816, num_head_channels=64,
                         num_heads=-1, use_temporal_attention=False, use_checkpoint=False)


def build_tiny_sdxl_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random-weight single-file checkpoint in the layout of the published SDXL files, which ComfyUI detects as
    SDXL: UNet ``SDXL_STANDIN_UNET``, full-size CLIP-L + OpenCLIP-bigG text encoders and VAE (ComfyUI fixes their
    configs). ~2.2 GB fp16."""
    from safetensors.torch import save_file

    shapes = ldm_unet_vae_shapes(SDXL_STANDIN_UNET)
    # SDXL checkpoint layout: CLIP-L in Hugging Face layout under embedders.0.transformer, bigG in open_clip
    # layout under embedders.1.model (ComfyUI's SDXL.process_clip_state_dict converts it to "clip_g.")
    shapes.update({"conditioner.embedders.0.transformer." + k: s
                   for k, s in _text_encoder_shapes("l", with_projection=False).items()})
    g = CLIP_SHAPES["g"]
    shapes.update({"conditioner.embedders.1.model." + k: s
                   for k, s in _open_clip_text_shapes(g["hidden_size"], g["num_hidden_layers"],
                                                      g["intermediate_size"], g["projection_dim"]).items()})
    gen_ = torch.Generator().manual_seed(seed)
    sd = {key: _random(shape, key, gen_) for key, shape in shapes.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"note": "random weights, LongAlign tests only"})
    return path


class StandinCheckpoints:
    """The SD1.5- and SDXL-shaped single-file stand-ins (0.44 GB and 2.2 GB), each written once per test session
    into ``folder`` and hard-linked wherever a test puts one (a model folder, a test's own directory): a copy per
    user would fill a CI machine's disk. Tests only read them."""

    builders = {"sd15": build_tiny_sd15_checkpoint, "sdxl": build_tiny_sdxl_checkpoint}

    def __init__(self, folder: Path):
        self.folder = folder
        self._built: dict[str, Path] = {}

    def path(self, family: str) -> Path:
        if family not in self._built:
            self._built[family] = self.builders[family](self.folder / f"{family}_standin.safetensors")
        return self._built[family]

    def place(self, family: str, dst: Path) -> Path:
        """``dst`` as a hard link to the ``family`` stand-in (a copy where the file system has no links)."""
        src = self.path(family)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
        return dst


def install_pack(custom_nodes: Path) -> Path:
    """Copy the pack's installable content into ``custom_nodes/ComfyUI-LongAlign`` (as ComfyUI Manager would)."""
    target = custom_nodes / PACK_NAME
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in PACK_CONTENT:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, target / name)
    return target


# --------------------------------------------------------------------------------------------------------------
# A real ComfyUI server on 127.0.0.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body=None, timeout: float = 30):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw or b"null")
        except ValueError:
            return e.code, raw.decode(errors="replace")


class Server:
    def __init__(self, url: str, base: Path, log: Path):
        self.url, self.base, self.log = url, base, log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def run(self, prompt: dict, label: str, timeout: float = 300) -> dict:
        """Queue an API-format prompt and wait for it; any rejection or execution error fails the test with the
        server's message."""
        status, resp = http("POST", self.url + "/prompt", {"prompt": prompt, "client_id": "longalign-workflows"})
        if status != 200 or not isinstance(resp, dict) or "prompt_id" not in resp:
            pytest.fail(f"ComfyUI rejected {label} (HTTP {status}):\n{json.dumps(resp, indent=1)[:6000]}")
        pid = resp["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            _, hist = http("GET", f"{self.url}/history/{pid}")
            entry = (hist or {}).get(pid)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") != "success":
                    errors = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
                    shown = [{k: e.get(k) for k in ("node_id", "node_type", "exception_type", "exception_message",
                                                    "traceback")} for e in errors] or entry["status"]
                    pytest.fail(f"{label} failed in ComfyUI:\n{json.dumps(shown, indent=1)[:6000]}")
                return entry
            time.sleep(0.25)
        pytest.fail(f"{label} did not finish in {timeout} s; server log tail:\n{self.log_text()[-3000:]}")

    def image_path(self, info: dict) -> Path:
        return self.base / info.get("type", "output") / info.get("subfolder", "") / info["filename"]


def start_comfy(base: Path, timeout: float = 120) -> tuple[subprocess.Popen, Server]:
    """Start ComfyUI headless on a free 127.0.0.1 port with ``base`` as its base directory (models/,
    custom_nodes/, user/, output/ …); returns once /system_stats answers. Stop it with :func:`stop_comfy`."""
    port = free_port()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    log_path = base / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [python, os.path.join(COMFYUI_PATH, "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--disable-auto-launch", "--disable-api-nodes", "--database-url", "sqlite:///:memory:", "--log-stdout",
             "--base-directory", str(base)],
            cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", base, log_path)
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail("ComfyUI exited during start-up:\n" + srv.log_text()[-4000:])
        try:
            if http("GET", srv.url + "/system_stats", timeout=5)[0] == 200:
                return proc, srv
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if time.time() > deadline:
            stop_comfy(proc)
            pytest.fail(f"ComfyUI did not start in {timeout} s:\n" + srv.log_text()[-4000:])
        time.sleep(0.5)


def stop_comfy(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # the process group of our own child (start_new_session)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
