"""Helpers for tests against a real ComfyUI checkout (``COMFYUI_PATH``); those tests skip without it.

Nothing here copies ComfyUI code: it imports the checkout the user points at, the way ComfyUI's own loader
would (:mod:`standins.comfy_host`); random-weight checkpoints of the shapes ComfyUI detects come from
:mod:`standins.comfy_checkpoints`, the installed pack and the ComfyUI server from :mod:`standins.comfy_server`.
What is pytest's stays here: the ``comfyui`` marker and skips, the pytest hooks, a ``Server`` that fails the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest
import torch

# The host-side stand-ins (ComfyUI imported, this pack loaded as a custom node, random CLIP objects, ComfyUI-shaped
# checkpoints, the pack installed and a ComfyUI server run) live in standins/, shared with bench/; the tests import
# them from here as well.
from standins import comfy_server
from standins.comfy_checkpoints import (  # noqa: F401
    SDXL_STANDIN_UNET, StandinCheckpoints, build_tiny_sd15_checkpoint, build_tiny_sdxl_checkpoint,
    ldm_unet_vae_shapes)
from standins.comfy_host import (  # noqa: F401
    CLIP_SHAPES, COMFYUI_PATH, REPO, comfy_version, host_clip, import_comfy, load_pack, random_clip_text_state_dict)
from standins.comfy_server import (  # noqa: F401
    PACK_CONTENT, PACK_NAME, ComfyServerError, free_port, http, install_pack, stop_comfy)

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


class Server(comfy_server.Server):
    """:class:`standins.comfy_server.Server` whose rejections, execution errors and timeouts fail the test
    (``pytest.fail``) with the server's message."""

    def fail(self, message: str) -> NoReturn:
        pytest.fail(message)


def start_comfy(base: Path, timeout: float = 120) -> tuple[subprocess.Popen, Server]:
    """:func:`standins.comfy_server.start_comfy` with a :class:`Server` that fails the test."""
    return comfy_server.start_comfy(base, timeout, server_class=Server)
