"""Comfy Registry packaging with comfy-cli: ``comfy node validate`` and ``comfy node pack``.

Skips unless comfy-cli is available: COMFY_CLI (path to the ``comfy`` executable), a ``comfy`` on PATH, or the
``comfy_cli`` module in this interpreter (``pip install comfy-cli``). Needs git (``comfy node pack`` zips the
files git tracks, minus .comfyignore patterns) and no network: telemetry is off (DO_NOT_TRACK=1,
``--skip-prompt``) and comfy-cli's config lives in a scratch HOME.

The pack is built from a scratch copy of what this repository tracks or would track on the next commit
(``git ls-files --cached --others --exclude-standard``), so the test never touches the repository's own git
state. If COMFYUI_PATH is set, the unpacked zip is also imported the way ComfyUI imports a custom node folder,
in a fresh interpreter that cannot see this repository.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "ComfyUI-LongAlign"
NODE_IDS = ["LongAlignDenscoreBestOfN", "LongAlignDenscoreScore", "LongAlignEvaluateLoRA", "LongAlignLoadLongSDLoRA",
            "LongAlignLoadT5Adapter", "LongAlignPreferenceModelLoader", "LongAlignTextEncode", "LongAlignTrainLoRA"]
#: What an install needs: these files, and every file under these folders.
REQUIRED_FILES = ["__init__.py", "requirements.txt", "pyproject.toml", "README.md", "LICENSE"]
REQUIRED_DIRS = ["nodes", "longalign_core", "trainer", "workflows", "web"]  # web/: help pages + frontend extension;
# trainer/: LongAlign Train LoRA and Evaluate LoRA run it in ComfyUI's Python
#: What must not ship: test code and artefacts, benchmarks, environments, caches.
FORBIDDEN_PREFIXES = ["tests/", "bench/", "standins/", "test_out/", ".venv/", ".pytest_cache/", ".git/"]
COMFYIGNORE_HINT = "the repository's .comfyignore (tests/, bench/, standins/, scripts/, docs/workflows/, .ci/, /dev)"


def comfy_cli() -> list[str] | None:
    if os.environ.get("COMFY_CLI"):
        return [os.environ["COMFY_CLI"]]
    if shutil.which("comfy"):
        return [shutil.which("comfy")]
    if importlib.util.find_spec("comfy_cli") is not None:
        return [sys.executable, "-m", "comfy_cli"]
    return None


CLI = comfy_cli()
pytestmark = [
    pytest.mark.skipif(CLI is None, reason="comfy-cli not found (set COMFY_CLI or pip install comfy-cli)"),
    pytest.mark.skipif(shutil.which("git") is None, reason="comfy node pack needs git"),
]


def git(*args, cwd=REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A git work tree holding exactly the files this repository tracks or would track (nothing ignored)."""
    if subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=REPO, capture_output=True).returncode:
        pytest.skip("the repository is not a git work tree")
    files = [f for f in git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0") if f]
    dst = tmp_path_factory.mktemp("pack_checkout")
    for rel in files:
        src = REPO / rel
        if src.is_file():  # tracked files deleted in the work tree are skipped
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    git("init", "-q", cwd=dst)
    git("add", "-A", cwd=dst)
    return dst


def run_cli(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess:
    """comfy-cli without prompts (--skip-prompt), telemetry (DO_NOT_TRACK) or the user's config (scratch HOME),
    with plain-text output where the version has --no-json (newer versions may print JSON when not on a TTY)."""
    env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), DO_NOT_TRACK="1",
               COMFY_NO_TELEMETRY="1")
    flags = ["--skip-prompt"]
    usage = subprocess.run([*CLI, "--help"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL, check=False)
    if "--no-json" in usage.stdout:
        flags.append("--no-json")
    return subprocess.run([*CLI, *flags, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, check=False)


@pytest.fixture(scope="module")
def packed(checkout, tmp_path_factory):
    home = tmp_path_factory.mktemp("comfy_cli_home")
    validate = run_cli(["node", "validate"], checkout, home)
    pack = run_cli(["node", "pack"], checkout, home)
    return validate, pack, checkout / "node.zip"


def test_validate_passes_without_warnings(packed):
    validate, _, _ = packed
    out = validate.stdout + validate.stderr
    assert validate.returncode == 0, out
    assert "Running security checks" in out  # it got past the pyproject checks
    assert "warning" not in out.lower() and "error" not in out.lower(), out


def test_pack_zip_holds_what_an_install_needs_and_nothing_else(packed, checkout):
    _, pack, zip_path = packed
    assert pack.returncode == 0 and zip_path.is_file(), pack.stdout + pack.stderr
    names = set(zipfile.ZipFile(zip_path).namelist())
    missing = [f for f in REQUIRED_FILES if f not in names]
    for folder in REQUIRED_DIRS:
        expected = {str(p.relative_to(checkout)) for p in (checkout / folder).rglob("*") if p.is_file()}
        assert expected, f"{folder}/ is empty in the checkout"
        missing += sorted(expected - names)
    assert not missing, missing
    assert {"longalign_core/data/reference_prompts.txt", "longalign_core/data/sd15_unet_config.json",
            "docs/method.md"} <= names  # the help pages point to docs/method.md
    docs_pages = {f"docs/{p.name}" for p in (checkout / "docs").glob("*.md")}
    assert docs_pages and not docs_pages - names, sorted(docs_pages - names)  # README.md links every docs page
    shipped = {f"workflows/{p.relative_to(checkout / 'workflows').as_posix()}"
               for p in (checkout / "workflows").rglob("*.json")}
    assert len(shipped) == 16 and {n for n in names if n.startswith("workflows/") and n.endswith(".json")} == \
        shipped  # 8 UI + 8 API
    unwanted = sorted(n for n in names if n.startswith(tuple(FORBIDDEN_PREFIXES)) or "__pycache__" in n
                      or n.endswith((".pyc", ".zip")))
    assert not unwanted, (
        f"{len(unwanted)} development files would be published, e.g. {unwanted[:5]}. comfy node pack zips every "
        f"git-tracked file except .comfyignore patterns; a .comfyignore at the repository root with\n"
        f"{COMFYIGNORE_HINT} keeps them out.")


def test_unpacked_zip_imports_as_a_custom_node(packed, tmp_path):
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        pytest.skip("set COMFYUI_PATH to also import the unpacked zip the way ComfyUI does")
    _, pack, zip_path = packed
    assert pack.returncode == 0, pack.stdout + pack.stderr
    target = tmp_path / "custom_nodes" / PACK_NAME
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(target)
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import asyncio, importlib.util, json, os, sys\n"
        "comfy_path, pack = sys.argv[1], sys.argv[2]\n"
        "sys.path.insert(0, comfy_path)\n"
        "from comfy.cli_args import args\n"
        "args.cpu = True\n"
        "spec = importlib.util.spec_from_file_location('custom_nodes.LongAlign', os.path.join(pack, '__init__.py'),\n"
        "                                              submodule_search_locations=[pack])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules[spec.name] = module\n"
        "spec.loader.exec_module(module)\n"
        "ext = asyncio.run(module.comfy_entrypoint())\n"
        "nodes = asyncio.run(ext.get_node_list())\n"
        "files = sorted({m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None)})\n"
        "print(json.dumps({'nodes': sorted(n.GET_SCHEMA().node_id for n in nodes), 'files': files}))\n")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    # -I: no PYTHONPATH, no script folder on sys.path, so nothing can come from this repository
    res = subprocess.run([python, "-I", str(probe), comfy_path, str(target)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["nodes"] == NODE_IDS
    pack_files = [f for f in out["files"] if f.startswith(str(target))]
    assert any(f.endswith(os.path.join("longalign_core", "segment_encoding.py")) for f in pack_files)
    # nothing from the repository (its .venv/ may hold the interpreter and the ComfyUI under test)
    assert not [f for f in out["files"] if f.startswith(str(REPO) + os.sep)
                and not f.startswith(str(REPO / ".venv") + os.sep)]
