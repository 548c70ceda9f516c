"""The shipped UI workflows in ComfyUI's real frontend, in headless Chromium (Playwright), against a real server.

Skips without COMFYUI_PATH, without Chromium (/usr/bin/chromium, or LONGALIGN_CHROMIUM) or without the
``playwright`` Python package (the browser is Debian's ``chromium``; ``playwright install`` is never used).
Only 127.0.0.1 is contacted: every other request the page makes is aborted.

For each workflow in workflows/ (fetched from the server's /api/workflow_templates/<pack>/ route, as the
template browser does) the frontend must:
* resolve every node type (its own missing-node list, from an afterConfigureGraph hook, is empty; no
  placeholder nodes; no "missing nodes" dialog), pass its workflow schema validation (no toast), and raise no
  page error;
* build the widgets scripts/make_workflows.py assumes, in that order, holding the values the file means;
* turn the graph into exactly the API twin in workflows/api/ (``app.graphToPrompt``; inputs the server does not
  declare, i.e. frontend-only widgets, are left out of the comparison);
* keep every link;
* open readable: at the file's saved zoom the canvas is not in its low-detail mode (``app.canvas.low_quality``,
  the frontend's own test against its setting LiteGraph.Canvas.MinFontSizeForLOD), where nodes are grey boxes
  without titles or widgets.
A screenshot of each is written to test_out/screenshots/<name>.png; LONGALIGN_UPDATE_DOCS=1 also writes the
README copies in docs/workflows/<name>.png.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import urllib.parse
from pathlib import Path

import pytest

from comfy_support import COMFYUI_PATH, PACK_NAME, install_pack, requires_comfy

pytestmark = requires_comfy
CHROMIUM = os.environ.get("LONGALIGN_CHROMIUM", "/usr/bin/chromium")
if COMFYUI_PATH:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="pip install playwright (no browser download needed)")

from comfy_support import http, start_comfy, stop_comfy  # noqa: E402
from test_workflows_e2e import gen  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "test_out" / "screenshots"
DOCS_SHOTS = REPO / "docs" / "workflows"
NAMES = sorted(gen.build_all())
TITLES = {name: wf.title for name, wf in gen.build_all().items()}  # UI files are workflows/<title>.json
VIEWPORT = {"width": gen.VIEW[0], "height": gen.VIEW[1]}  # the window the workflows' initial view is framed for
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
SETTINGS = {
    "Comfy.TutorialCompleted": True,  # otherwise a first-run template dialog replaces the graph
    "Comfy.Validation.Workflows": True,  # schema-check every loaded workflow (errors appear as toasts)
    "Comfy.Minimap.Visible": False,  # cleaner screenshots
    "Comfy.Graph.CanvasInfo": False,
}

JS_READY = """() => !!(window.app && window.app.graph && window.LiteGraph && window.app.canvas
    && window.app.extensionManager && window.app.extensionManager.workflow
    && window.app.extensionManager.workflow.activeWorkflow)"""

JS_HOOK = """() => {
  window.__la = {calls: 0, missing: null, errors: []};
  window.addEventListener('error', e => window.__la.errors.push(String(e.message)));
  window.addEventListener('unhandledrejection', e => window.__la.errors.push(String(e.reason)));
  window.app.registerExtension({
    name: 'longalign.tests.capture',
    afterConfigureGraph(missing) {
      window.__la.calls += 1;
      window.__la.missing = (missing || []).map(m => (typeof m === 'string' ? m : m.type));
    },
  });
}"""

JS_TOASTS = """() => Array.from(document.querySelectorAll('.p-toast-message')).map(t => t.innerText.trim())"""

JS_DIALOGS = """() => Array.from(document.querySelectorAll('[role="dialog"]'))
    .filter(d => { const r = d.getBoundingClientRect(); const s = getComputedStyle(d);
                   return r.width > 0 && r.height > 0 && s.visibility !== 'hidden' && s.display !== 'none'; })
    .map(d => d.innerText)"""

# Load a workflow object (or fetch it from the pack's template route) and report what the frontend made of it.
JS_LOAD = """async ({wf, name}) => {
  if (wf === null) {
    const r = await fetch('/api/workflow_templates/' + encodeURIComponent(__PACK__) + '/' + name + '.json');
    if (!r.ok) return {fetch_status: r.status};
    wf = await r.json();
  }
  const calls = window.__la.calls, errors = window.__la.errors.length;
  window.__la.missing = null;
  await window.app.loadGraphData(wf, true, true, name);
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const reg = window.LiteGraph.registered_node_types;
  const nodes = window.app.graph.nodes.map(n => ({
    id: n.id, type: n.type, registered: n.type in reg, placeholder: !!n.last_serialization,
    has_errors: !!n.has_errors,
    widgets: (n.widgets || []).filter(w => w.serialize !== false)
                              .map(w => [w.name, w.value === undefined ? null : w.value]),
  }));
  const prompt = await window.app.graphToPrompt();
  const canvas = window.app.canvas;
  return {
    view: {scale: canvas.ds.scale, low_quality: canvas.low_quality, threshold: canvas._lowQualityZoomThreshold,
           min_font_size_for_lod: canvas.min_font_size_for_lod},
    file: wf, hook_calls: window.__la.calls - calls, missing: window.__la.missing, nodes,
    links: window.app.graph.serialize().links, prompt: prompt.output,
    errors: window.__la.errors.slice(errors),
    tab: window.app.extensionManager.workflow.activeWorkflow.filename,
  };
}""".replace("__PACK__", json.dumps(PACK_NAME))


class Frontend:
    def __init__(self, page, object_info: dict, page_errors: list):
        self.page, self.object_info, self.page_errors = page, object_info, page_errors

    def load(self, name: str, wf: dict | None = None) -> dict:
        """Load ``wf`` (None: the shipped file, through the server's template route); returns what the frontend
        built plus the toasts and dialogs the load raised (dialogs are closed afterwards)."""
        toasts_before = self.page.evaluate(JS_TOASTS)
        errors_before = len(self.page_errors)
        result = self.page.evaluate(JS_LOAD, {"wf": wf, "name": TITLES.get(name, name)})
        assert "fetch_status" not in result, f"{name}: template route answered {result.get('fetch_status')}"
        self.page.wait_for_timeout(300)  # toasts and dialogs are Vue updates after the load resolves
        toasts = self.page.evaluate(JS_TOASTS)
        for t in toasts_before:
            if t in toasts:
                toasts.remove(t)
        result["toasts"] = toasts
        result["dialogs"] = self.page.evaluate(JS_DIALOGS)
        result["errors"] += self.page_errors[errors_before:]
        return result

    def close_dialogs(self) -> None:
        for _ in range(3):
            if not self.page.evaluate(JS_DIALOGS):
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(150)


@pytest.fixture(scope="module")
def frontend(tmp_path_factory):
    base = tmp_path_factory.mktemp("browser_base")
    install_pack(base / "custom_nodes")
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps(SETTINGS))
    proc, srv = start_comfy(base)
    profile = tempfile.mkdtemp(prefix="longalign-chromium-")
    try:
        _, object_info = http("GET", srv.url + "/object_info")
        with sync_api.sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                        args=CHROMIUM_ARGS, viewport=VIEWPORT)
            page_errors = []

            def guard(route):  # only 127.0.0.1; the frontend also tries to reach outside hosts
                if urllib.parse.urlsplit(route.request.url).hostname == "127.0.0.1":
                    return route.continue_()
                return route.abort()

            try:
                ctx.route("**/*", guard)
                page = ctx.pages[0] if ctx.pages else ctx.new_page()
                page.on("pageerror", lambda e: page_errors.append(f"pageerror: {e}"[:500]))
                page.goto(srv.url + "/", wait_until="load")
                page.wait_for_function(JS_READY, timeout=120_000, polling=100)
                page.evaluate(JS_HOOK)
                yield Frontend(page, object_info, page_errors)
            finally:
                ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
        stop_comfy(proc)


def _expected_widgets(node: dict) -> list[list]:
    """[name, value] of a UI file node's saved widgets, in the order scripts/make_workflows.py assumes."""
    spec = gen.NODE_TYPES[node["type"]]
    names = list(spec.widgets) + [n for n, _ in spec.frontend_widgets]
    return [list(p) for p in zip(names, node["widgets_values"])]


def _server_view(prompt: dict, object_info: dict) -> tuple[dict, dict]:
    """The frontend's prompt restricted to inputs the server declares; plus what was left out, per node."""
    kept, dropped = {}, {}
    for nid, entry in prompt.items():
        schema = object_info[entry["class_type"]]["input"]
        declared = set(schema.get("required", {})) | set(schema.get("optional", {}))
        kept[nid] = dict(entry, inputs={k: v for k, v in entry["inputs"].items() if k in declared})
        extra = {k: v for k, v in entry["inputs"].items() if k not in declared}
        if extra:
            dropped[nid] = extra
    return kept, dropped


@pytest.mark.parametrize("name", NAMES)
def test_frontend_loads_workflow_as_shipped(frontend, name):
    res = frontend.load(name)
    file_wf = json.loads((REPO / "workflows" / f"{TITLES[name]}.json").read_text(encoding="utf-8"))
    assert res["file"] == file_wf, "the server's template route serves another file"
    # every node type resolved; no load or validation error
    assert res["hook_calls"] == 1 and res["missing"] == [], res["missing"]
    bad = [n for n in res["nodes"] if n["placeholder"] or not n["registered"] or n["has_errors"]]
    assert not bad, bad
    assert not res["dialogs"], res["dialogs"]
    assert not res["toasts"], res["toasts"]
    assert not res["errors"], res["errors"]
    assert res["tab"] == TITLES[name]
    # opens readable: at the saved zoom the canvas draws titles and widgets, not its low-detail boxes
    view = res["view"]
    assert view["scale"] == pytest.approx(file_wf["extra"]["ds"]["scale"]), view  # the file's own view
    assert view["low_quality"] is False, f"{name} opens in the frontend's low-detail mode: {view}"
    # widgets: the names and order the generator assumes, holding the file's values
    by_id = {n["id"]: n for n in file_wf["nodes"]}
    assert sorted(n["id"] for n in res["nodes"]) == sorted(by_id)
    for n in res["nodes"]:
        assert n["widgets"] == _expected_widgets(by_id[n["id"]]), (name, n["type"])
    # links survive
    assert sorted(map(tuple, res["links"])) == sorted(map(tuple, file_wf["links"]))
    # the frontend's own UI -> API conversion gives the API twin
    twin = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text(encoding="utf-8"))
    kept, dropped = _server_view(res["prompt"], frontend.object_info)
    assert kept == twin
    for nid, extra in dropped.items():  # only frontend-side widget values, never a link
        assert not any(isinstance(v, list) for v in extra.values()), (nid, extra)
    # screenshot (the view the file opens with)
    frontend.close_dialogs()
    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = SHOTS / f"{name}.png"
    frontend.page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("LONGALIGN_UPDATE_DOCS") == "1":
        _write_docs_screenshot(shot, DOCS_SHOTS / f"{name}.png")


def _write_docs_screenshot(src: Path, dst: Path, width: int = 1280) -> None:
    """A small README copy: scaled to ``width`` and reduced to a 256-colour palette."""
    from PIL import Image

    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as img:
        img = img.convert("RGB")
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
        img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)


def test_low_detail_check_catches_a_zoomed_out_view(frontend):
    """The readability check itself: the same workflow saved at a zoom below the frontend's threshold opens in
    low-detail mode, and at its shipped zoom it does not."""
    wf = json.loads((REPO / "workflows" / f"{TITLES['comparison']}.json").read_text(encoding="utf-8"))
    zoomed_out = copy.deepcopy(wf)
    zoomed_out["extra"]["ds"]["scale"] = 0.49  # what this workflow shipped with before issue 28
    res = frontend.load("zoomed_out", zoomed_out)
    assert res["view"]["scale"] == pytest.approx(0.49) and res["view"]["low_quality"] is True, res["view"]
    assert 0.5 < res["view"]["threshold"] < 0.6, res["view"]  # 8 px / 14 px at device pixel ratio 1
    res = frontend.load("comparison")
    assert res["view"]["low_quality"] is False, res["view"]


def test_check_catches_an_unknown_node_and_an_invalid_file(frontend):
    """The same check on broken copies must fail: an unknown node type, and a malformed link."""
    wf = json.loads((REPO / "workflows" / f"{TITLES['longsd']}.json").read_text(encoding="utf-8"))
    unknown = copy.deepcopy(wf)
    lora = next(n for n in unknown["nodes"] if n["type"] == "LongAlignLoadLongSDLoRA")
    lora["type"] = "NoSuchLongAlignNode"
    res = frontend.load("broken_unknown_node", unknown)
    assert res["missing"] == ["NoSuchLongAlignNode"]
    assert [n["type"] for n in res["nodes"] if n["placeholder"] or not n["registered"]] == ["NoSuchLongAlignNode"]
    assert any("NoSuchLongAlignNode" in d for d in res["dialogs"]), res["dialogs"]
    frontend.close_dialogs()

    malformed = copy.deepcopy(wf)
    malformed["links"][0] = malformed["links"][0][:4]
    res = frontend.load("broken_link", malformed)
    assert any("Invalid workflow" in t for t in res["toasts"]), res["toasts"]
    frontend.close_dialogs()

