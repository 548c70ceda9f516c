"""The pack's help pages (web/docs/<node id>/en.md, what ComfyUI's "?" panel shows) and docs/method.md, checked
without ComfyUI: every node has a page with the same sections, examples are what the code prints, and every
"§n" reference in the code names a section that exists. tests/test_browser_help.py shows the pages in the real
frontend."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "web" / "docs"
SECTIONS = ["## Inputs", "## Outputs", "## Example", "## Pitfalls"]


def pack_nodes() -> dict[str, str]:
    """node id -> display name, read from the node sources (they import ComfyUI, so they are parsed here)."""
    nodes = {}
    for path in sorted((REPO / "nodes").glob("*.py")):
        for call in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "Schema":
                kw = {k.arg: k.value for k in call.keywords}
                nodes[kw["node_id"].value] = kw["display_name"].value
    return nodes


def test_the_pack_has_eight_nodes_and_serves_web_from_its_folder():
    assert len(pack_nodes()) == 8
    init = ast.parse((REPO / "__init__.py").read_text(encoding="utf-8"))
    web = next(n.value.value for n in init.body if isinstance(n, ast.Assign) and n.targets[0].id == "WEB_DIRECTORY")
    assert (REPO / web).resolve() == DOCS.parent


@pytest.mark.parametrize("node_id", sorted(pack_nodes()))
def test_every_node_has_a_help_page_with_the_same_sections(node_id):
    text = (DOCS / node_id / "en.md").read_text(encoding="utf-8")
    assert text.splitlines()[0] == f"# {pack_nodes()[node_id]}"
    positions = [text.find(s + "\n") for s in SECTIONS]
    assert -1 not in positions and positions == sorted(positions), (node_id, positions)
    # no page may point at a file that is not shipped
    for ref in re.findall(r"`(docs/[\w./-]+)`", text):
        assert (REPO / ref).is_file(), ref


def test_text_encode_example_is_what_the_report_prints(clip_tokenizer):
    """The help page's worked example is the real report of its prompt (core, CLIP tokenizer)."""
    from longalign_core.segment_encoding import build_report, plan_segments

    text = (DOCS / "LongAlignTextEncode" / "en.md").read_text(encoding="utf-8")
    prompt = re.search(r"Prompt: `([^`]+)`", text).group(1)
    shown = re.search(r"```\n(.*?)\n```", text, re.S).group(1)
    count = lambda t: len(clip_tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    plan = plan_segments(prompt, count)
    counts = [count(s.text) for s in plan]
    merged = sum(counts) + len(counts)
    assert shown == build_report(plan, counts, merged, 0, 240 - merged, 240, "extend").format()
    assert f"`segments` = {len(plan)}, `tokens` = {merged}" in text


def method_sections() -> set[str]:
    """"1", "1.1" … from docs/method.md: "## n." headings and the numbered items under them."""
    found, major = set(), None
    for line in (REPO / "docs" / "method.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"## (\d+)\. ", line)
        if m:
            major = m.group(1)
            found.add(major)
        m = re.match(r"(\d+)\. \*\*", line)
        if m and major:
            found.add(f"{major}.{m.group(1)}")
    return found


def test_method_has_the_six_sections_the_code_refers_to():
    sections = method_sections()
    assert {str(n) for n in range(1, 7)} <= sections and {f"1.{k}" for k in range(1, 7)} <= sections
    refs = set()
    for path in list(REPO.glob("*.py")) + [p for d in ("longalign_core", "nodes", "trainer", "scripts", "bench")
                                           for p in (REPO / d).rglob("*.py")] + [REPO / "README.md",
                                           *(REPO / "docs").glob("*.md"), *DOCS.rglob("*.md")]:
        for m in re.finditer(r"(?:SPEC|docs/method\.md)`?\s+§(\d+(?:\.\d+)?)(?:[–-](\d+(?:\.\d+)?))?",
                             path.read_text(encoding="utf-8")):
            refs.update(g for g in m.groups() if g)
    assert refs and refs <= sections, sorted(refs - sections)
