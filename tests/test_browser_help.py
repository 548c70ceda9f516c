"""What a user sees of the pack in ComfyUI's real frontend (1.35.9, headless Chromium): node help pages, template
cards, a fresh LongAlign Text Encode, the segment report in Preview as Text, and the link geometry that
tests/test_workflows.py checks without a browser.

Skips like tests/test_browser.py (whose server + browser fixture it reuses): without COMFYUI_PATH, Chromium or
the playwright package. Screenshots go to test_out/screenshots/ (help_<node id>.png, templates.png).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from comfy_support import COMFYUI_PATH, PACK_NAME

if not COMFYUI_PATH:
    pytest.skip("set COMFYUI_PATH to a ComfyUI checkout to run", allow_module_level=True)

from test_browser import CHROMIUM, TITLES, frontend  # noqa: E402,F401  (frontend: the shared page fixture)
import test_workflows as layout  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "test_out" / "screenshots"
DOCS = REPO / "web" / "docs"
NODE_IDS = ["LongAlignTextEncode", "LongAlignLoadLongSDLoRA", "LongAlignLoadT5Adapter",
            "LongAlignPreferenceModelLoader", "LongAlignDenscoreScore", "LongAlignDenscoreBestOfN",
            "LongAlignTrainLoRA", "LongAlignEvaluateLoRA"]
PACK_URLS = (f"/extensions/{PACK_NAME}/", f"/api/workflow_templates/{PACK_NAME}/", "/api/workflow_templates/"
             + PACK_NAME.replace("-", "%2D") + "/")


@pytest.fixture
def responses(frontend):  # noqa: F811
    """Every HTTP response the page gets while the test runs: (status, url)."""
    seen: list[tuple[int, str]] = []

    def record(r):
        seen.append((r.status, r.url))

    frontend.page.on("response", record)
    yield seen
    frontend.page.remove_listener("response", record)


def pack_errors(seen):
    return [(s, u) for s, u in seen if s >= 400 and any(p in u for p in PACK_URLS)]


def _fresh_node(page, node_type: str, x: float = 700, y: float = 200):
    page.evaluate("""async ({t, x, y}) => {
      const n = LiteGraph.createNode(t); n.pos = [x, y]; app.graph.add(n);
      app.canvas.deselectAll(); app.canvas.selectNode(n); app.canvas.setDirty(true, true);
    }""", {"t": node_type, "x": x, "y": y})
    page.wait_for_timeout(400)


def _new_tab(page):
    page.evaluate("async () => { await app.loadGraphData({nodes: [], links: [], version: 0.4, groups: [], "
                  "config: {}, extra: {}, last_node_id: 0, last_link_id: 0}, true, true, 'help check'); }")


# ----------------------------------------------------------------------------------------------------------------
# Help pages: the "?" (info) button of a selected node opens the help panel, which reads
# /extensions/<pack folder>/docs/<node id>/en.md (web/docs/ here, served through WEB_DIRECTORY).
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_help_panel_shows_the_nodes_page(frontend, responses, node_id):  # noqa: F811
    page = frontend.page
    text = (DOCS / node_id / "en.md").read_text(encoding="utf-8")
    heading = text.splitlines()[0].removeprefix("# ")
    schema = frontend.object_info[node_id]
    assert heading == schema["display_name"]
    # the page documents every input and output the server declares
    inputs = list(schema["input"].get("required", {})) + list(schema["input"].get("optional", {}))
    for name in inputs + list(schema["output_name"]):
        assert f"`{name}`" in text or f"`{name}`," in text, (node_id, name)
    _new_tab(page)
    _fresh_node(page, node_id)
    page.click('[data-testid="info-button"]')
    page.wait_for_function("""(h) => { const el = document.querySelector('.node-help-content');
        return !!el && el.innerText.includes(h) && el.innerText.includes('Pitfalls'); }""", arg=heading,
                           timeout=15_000)
    shown = page.evaluate("() => document.querySelector('.node-help-content').innerText")
    assert "Example" in shown and "Inputs" in shown and "Help not found" not in shown
    fetched = [(s, u) for s, u in responses if u.endswith(f"/extensions/{PACK_NAME}/docs/{node_id}/en.md")]
    assert fetched and all(s == 200 for s, _ in fetched), fetched
    assert pack_errors(responses) == []
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"help_{node_id}.png"))
    page.click('[data-testid="info-button"]')  # close the panel again


def test_help_check_fails_for_a_node_without_a_page(frontend, responses):  # noqa: F811
    """The same path for a pack node whose page is missing: the server answers 404 and the check sees it."""
    page = frontend.page
    status = page.evaluate(f"async () => (await fetch('/extensions/{PACK_NAME}/docs/NoSuchNode/en.md')).status")
    assert status == 404 and pack_errors(responses)


# ----------------------------------------------------------------------------------------------------------------
# Template cards
# ----------------------------------------------------------------------------------------------------------------


def test_template_cards_are_found_by_search_and_show_their_pictures(frontend, responses):  # noqa: F811
    page = frontend.page
    frontend.close_dialogs()
    page.get_by_text("Templates", exact=True).first.click()
    page.wait_for_selector('[data-testid="template-workflows-content"]', timeout=15_000)
    page.wait_for_timeout(500)
    page.locator('[role="dialog"] input').first.fill("LongAlign")
    js_cards = """() => Array.from(document.querySelectorAll('[data-testid^="template-workflow-"]'))
        .map(c => c.getAttribute('data-testid').replace('template-workflow-', ''))"""
    try:  # the search is debounced: wait until the list has settled on the pack's cards
        page.wait_for_function(f"({js_cards})().length <= {len(TITLES)}", timeout=10_000)
    except Exception:
        pass
    cards = page.evaluate(js_cards)
    assert sorted(cards) == sorted(TITLES.values())  # every card found, nothing else
    # the pack's own category shows the drawn pictures (the search view leaves them to lazy loading)
    page.locator('[role="dialog"] input').first.fill("")
    page.get_by_text(PACK_NAME, exact=True).first.click()
    page.wait_for_function("""(n) => { const imgs = Array.from(document.querySelectorAll(
        '[data-testid^="template-workflow-"] img'));
        return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0); }""",
                           arg=len(TITLES), timeout=20_000)
    pictures = page.evaluate("""() => Array.from(document.querySelectorAll('[data-testid^="template-workflow-"]'))
        .map(c => { const i = c.querySelector('img'); const r = i.getBoundingClientRect();
                    return [c.querySelector('h3').innerText, i.naturalWidth, Math.round(r.width)]; })""")
    for title, natural, shown in pictures:
        assert title in TITLES.values() and natural == 512 and shown >= 200, (title, natural, shown)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "templates.png"))
    # a card opens its workflow, named by the card's title
    page.click(f'[data-testid="template-workflow-{TITLES["long_prompt_sd15"]}"]')
    page.wait_for_function("(t) => window.app.extensionManager.workflow.activeWorkflow.filename === t",
                           arg=TITLES["long_prompt_sd15"], timeout=15_000)
    assert pack_errors(responses) == []


# ----------------------------------------------------------------------------------------------------------------
# LongAlign Text Encode as a user adds it, and its report in Preview as Text
# ----------------------------------------------------------------------------------------------------------------


def test_fresh_text_encode_has_a_prompt_box_as_tall_as_clip_text_encode(frontend):  # noqa: F811
    page = frontend.page
    _new_tab(page)
    heights = page.evaluate("""async () => {
      const out = {};
      for (const [t, x] of [["CLIPTextEncode", 50], ["LongAlignTextEncode", 600]]) {
        const n = LiteGraph.createNode(t); n.pos = [x, 100]; app.graph.add(n);
        await new Promise(r => setTimeout(r, 400));
        const w = n.widgets.find(w => w.name === "text");
        out[t] = (w.inputEl || w.element).getBoundingClientRect().height / app.canvas.ds.scale;
      }
      return out; }""")
    clip, longalign = heights["CLIPTextEncode"], heights["LongAlignTextEncode"]
    assert clip > 100 and abs(longalign - clip) <= 2, heights


def test_saved_workflow_sizes_are_kept(frontend):  # noqa: F811
    """The prompt-box enlargement applies to new nodes only: a loaded workflow keeps its saved sizes."""
    res = frontend.load("long_prompt_sd15")
    sizes = frontend.page.evaluate("() => app.graph.nodes.map(n => [n.id, [...n.size]])")
    saved = {n["id"]: n["size"] for n in res["file"]["nodes"]}
    assert {i: s for i, s in sizes} == saved


def _expected_report() -> str:
    """The report of the workflow's prompt, from the core with the CLIP tokenizer (the node's counts come from
    ComfyUI's tokenizer over the same vocabulary)."""
    from longalign_core.clip_vocab import load_clip_tokenizer
    from longalign_core.segment_encoding import build_report, plan_segments

    tok = load_clip_tokenizer()
    count = lambda t: len(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    plan = plan_segments(layout.gen.LONG_PROMPT, count)
    counts = [count(s.text) for s in plan]
    merged = sum(counts) + len(counts)
    return build_report(plan, counts, merged, 0, 240 - merged, 240, "extend").format()


def test_segment_report_reads_in_the_workflows_preview_without_wrapping(frontend):  # noqa: F811
    report = _expected_report()
    assert len(report.splitlines()) == 3 + 13
    res = frontend.load("long_prompt_sd15")
    preview = next(n for n in res["file"]["nodes"] if n["type"] == "PreviewAny")
    assert preview["size"][0] == 420
    fit = frontend.page.evaluate("""async ({id, text}) => {
      const n = app.graph.getNodeById(id);
      n.onExecuted({text: [text]});
      await new Promise(r => setTimeout(r, 300));
      const el = n.widgets.map(w => w.inputEl || w.element).find(e => e && e.tagName === "TEXTAREA");
      const wrap = el.style.whiteSpace; el.style.whiteSpace = "pre";
      const out = {client: el.clientWidth, scroll: el.scrollWidth, value: el.value,
                   rows: Math.round(el.scrollHeight / parseFloat(getComputedStyle(el).lineHeight || 12))};
      el.style.whiteSpace = wrap; return out; }""", {"id": preview["id"], "text": report})
    assert fit["value"] == report
    assert fit["scroll"] <= fit["client"], fit  # no line is wider than the box: nothing wraps


# ----------------------------------------------------------------------------------------------------------------
# The geometry tests/test_workflows.py uses, against the frontend's own socket positions
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TITLES))
def test_link_geometry_matches_the_frontend(frontend, name):  # noqa: F811
    res = frontend.load(name)
    file_wf = res["file"]
    drawn = frontend.page.evaluate("""() => app.graph.nodes.map(n => ({id: n.id, size: [...n.size],
        ins: (n.inputs || []).map((s, i) => n.getInputPos(i)),
        outs: (n.outputs || []).map((s, i) => n.getOutputPos(i))}))""")
    by_id = {n["id"]: n for n in file_wf["nodes"]}
    for d in drawn:
        node = by_id[d["id"]]
        assert d["size"] == node["size"], (name, node["type"])  # not enlarged by the frontend
    for _, src, src_slot, dst, dst_slot, _ in file_wf["links"]:
        real_out = next(d for d in drawn if d["id"] == src)["outs"][src_slot]
        real_in = next(d for d in drawn if d["id"] == dst)["ins"][dst_slot]
        ours_out = layout.socket_pos(by_id[src], "output", src_slot)
        ours_in = layout.socket_pos(by_id[dst], "input", dst_slot)
        assert max(abs(a - b) for a, b in zip(real_out, ours_out)) <= 1, (name, by_id[src]["type"], real_out,
                                                                           ours_out)
        assert max(abs(a - b) for a, b in zip(real_in, ours_in)) <= 1, (name, by_id[dst]["type"], real_in, ours_in)
