"""A real ComfyUI server on 127.0.0.1 with this pack installed: the pack's installable content copied into a
``custom_nodes/`` folder as ComfyUI Manager would, ComfyUI (the checkout at ``COMFYUI_PATH``, run by
``COMFYUI_PYTHON`` or this interpreter) started headless on the CPU, prompts queued over its HTTP API. Used by the
server tests (through ``tests/comfy_support.py``, whose ``Server`` fails the test instead of raising
:class:`ComfyServerError`) and ``bench/train_node.py``."""

from __future__ import annotations

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
from pathlib import Path
from typing import NoReturn

from standins.comfy_host import COMFYUI_PATH, REPO

#: Files and folders that make up the installable pack (what ComfyUI Manager would put in custom_nodes/).
PACK_CONTENT = ["__init__.py", "nodes", "longalign_core", "trainer", "workflows", "web", "pyproject.toml",
                "requirements.txt"]
PACK_NAME = "ComfyUI-LongAlign"


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body=None, timeout: float = 30):
    """(status, decoded JSON body) of one request; an HTTP error status is returned, not raised."""
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


class ComfyServerError(RuntimeError):
    """The server rejected a prompt, failed to run it or to start: the message carries its own words."""


class Server:
    """A running ComfyUI server at ``url`` with ``base`` as its base directory and its output in ``log``."""

    def __init__(self, url: str, base: Path, log: Path):
        self.url, self.base, self.log = url, base, log

    def fail(self, message: str) -> NoReturn:
        """How a failure is reported: :class:`ComfyServerError` here; the tests' subclass fails the test instead."""
        raise ComfyServerError(message)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def run(self, prompt: dict, label: str, timeout: float = 300) -> dict:
        """Queue an API-format prompt and wait for it; any rejection or execution error goes to :meth:`fail` with
        the server's message."""
        status, resp = http("POST", self.url + "/prompt", {"prompt": prompt, "client_id": "longalign-workflows"})
        if status != 200 or not isinstance(resp, dict) or "prompt_id" not in resp:
            self.fail(f"ComfyUI rejected {label} (HTTP {status}):\n{json.dumps(resp, indent=1)[:6000]}")
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
                    self.fail(f"{label} failed in ComfyUI:\n{json.dumps(shown, indent=1)[:6000]}")
                return entry
            time.sleep(0.25)
        self.fail(f"{label} did not finish in {timeout} s; server log tail:\n{self.log_text()[-3000:]}")

    def image_path(self, info: dict) -> Path:
        return self.base / info.get("type", "output") / info.get("subfolder", "") / info["filename"]


def start_comfy(base: Path, timeout: float = 120, server_class: type[Server] = Server
                ) -> tuple[subprocess.Popen, Server]:
    """Start ComfyUI headless on a free 127.0.0.1 port with ``base`` as its base directory (models/,
    custom_nodes/, user/, output/ …); returns once /system_stats answers (a ``server_class`` object, whose
    :meth:`Server.fail` reports a start that fails). Stop it with :func:`stop_comfy`."""
    port = free_port()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    log_path = base / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [python, os.path.join(COMFYUI_PATH, "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--disable-auto-launch", "--disable-api-nodes", "--database-url", "sqlite:///:memory:", "--log-stdout",
             "--base-directory", str(base)],
            cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    srv = server_class(f"http://127.0.0.1:{port}", base, log_path)
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            srv.fail("ComfyUI exited during start-up:\n" + srv.log_text()[-4000:])
        try:
            if http("GET", srv.url + "/system_stats", timeout=5)[0] == 200:
                return proc, srv
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if time.time() > deadline:
            stop_comfy(proc)
            srv.fail(f"ComfyUI did not start in {timeout} s:\n" + srv.log_text()[-4000:])
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
