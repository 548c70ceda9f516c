"""The README and the reference pages in docs/: every relative link reaches a file and every ``#anchor`` a heading
of its target (GitHub's heading ids), the README stays a front door (at most 200 lines), and every docs page is
one click from it. External (http/https, mailto) links are not checked: the tests run offline."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
README_MAX_LINES = 200


def pages() -> list[Path]:
    return [README, *sorted((REPO / "docs").glob("*.md"))]


FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target); target is <anything but >> or a run without spaces (one level of parentheses)
# and may carry a "title". Link text may hold one level of brackets.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]"
                         r"\(\s*(<[^>\n]*>|(?:[^()\s]|\([^()\s]*\))*)(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>\n]*>|\S+)")
ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:\s+(.*?))?(?:\s+#+)?\s*$")
HTML_ID = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks, with inline code spans blanked out."""
    fenced = None
    for number, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if fence and (fenced is None or fence.group(1) == fenced):
            fenced = None if fenced else fence.group(1)
            continue
        if fenced is None:
            yield number, CODE_SPAN.sub(lambda m: "x" * len(m.group(0)), line)


def github_slug(heading: str) -> str:
    """GitHub's id for a heading (github-slugger): the rendered text lower-cased, everything but letters, digits,
    spaces, '-' and '_' removed, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading counts with its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def headings(text: str):
    """The text of every heading, in order: '#' headings and setext ones (a line of text over a line of = or -)."""
    lines = text.splitlines()
    prose = dict(prose_lines(text))
    for number, line in prose.items():
        if ATX_HEADING.match(line):
            yield ATX_HEADING.match(lines[number - 1]).group(2) or ""  # the raw line: code spans keep their text
        elif re.fullmatch(r" {0,3}(=+|-+)\s*", line) and prose.get(number - 1, "").strip() and \
                not prose[number - 1].lstrip().startswith(("|", "#", "*", "-", ">")):
            yield lines[number - 2].strip()


def anchors(page: Path) -> set[str]:
    """Every id GitHub gives the page's headings (a repeated heading gets -1, -2, …), plus explicit HTML ids."""
    text = page.read_text(encoding="utf-8")
    found, occurrences = set(), {}
    for title in headings(text):
        slug = base = github_slug(title)
        while slug in occurrences:  # github-slugger's rule
            occurrences[base] += 1
            slug = f"{base}-{occurrences[base]}"
        occurrences[slug] = 0
        found.add(slug)
    found.update(i for _, line in prose_lines(text) for i in HTML_ID.findall(line))
    return found


def links(page: Path):
    """(line number, target) of every inline link, image and reference definition of the page."""
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        for m in INLINE_LINK.finditer(line):
            yield number, m.group(1)
        m = REFERENCE_DEF.match(line)
        if m:
            yield number, m.group(1)


def resolve(page: Path, target: str) -> tuple[Path | None, str]:
    """The file a relative link points to (None for an external or page-internal link) and its anchor."""
    target = target.strip("<>")
    path, _, anchor = target.partition("#")
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", path) or path.startswith("//"):
        return None, ""
    return ((page.parent / unquote(path)).resolve() if path else page), unquote(anchor)


def broken_links(page: Path, root: Path = REPO) -> list[str]:
    """'page:line: target: what is wrong' for every relative link of ``page`` that GitHub could not follow."""
    problems = []
    for number, target in links(page):
        if not target.strip("<>"):
            problems.append(f"{page.relative_to(root)}:{number}: empty link target")
            continue
        dest, anchor = resolve(page, target)
        if dest is None:
            continue  # http(s), mailto: not checked offline
        where = f"{page.relative_to(root)}:{number}: {target}"
        if not dest.is_relative_to(root):
            problems.append(f"{where}: points outside the repository")
        elif not dest.exists():
            problems.append(f"{where}: no file {dest.relative_to(root)}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading with id #{anchor} in {dest.relative_to(root)}")
        elif anchor and dest.suffix != ".md" and not re.fullmatch(r"L\d+(-L\d+)?", anchor):
            problems.append(f"{where}: #{anchor} in a file that is not markdown")
    return problems


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_reaches_its_file_and_heading(page):
    problems = broken_links(page)
    assert not problems, "broken links (fix the target, or the heading it points to):\n" + "\n".join(problems)


def test_the_readme_is_a_front_door_of_at_most_200_lines():
    count = len(README.read_text(encoding="utf-8").splitlines())
    assert count <= README_MAX_LINES, (
        f"README.md has {count} lines; keep it at most {README_MAX_LINES} and move reference text to docs/")


def test_every_docs_page_is_one_click_from_the_readme():
    targets = {dest for _, t in links(README) for dest in [resolve(README, t)[0]] if dest is not None}
    docs = sorted((REPO / "docs").glob("*.md"))
    assert {"method", "nodes", "python", "trainer", "benchmarks", "testing"} <= {p.stem for p in docs}, docs
    missing = [str(p.relative_to(REPO)) for p in docs if p not in targets]
    assert not missing, f"docs pages that README.md does not link to: {missing}"


# -- the checker itself, on pages written here -------------------------------------------------------------------


@pytest.mark.parametrize("heading, slug", [
    # ids as GitHub renders them for these headings (the first one is docs/method.md's, linked from the README
    # before the split and followed on GitHub)
    ("1. Segment-level encoding (SD1.5, CLIP ViT-L/14 text encoder)",
     "1-segment-level-encoding-sd15-clip-vit-l14-text-encoder"),
    ("LongAlign Text Encode (`LongAlignTextEncode`, category `LongAlign/conditioning`)",
     "longalign-text-encode-longaligntextencode-category-longalignconditioning"),
    ("What `./dev test` runs", "what-dev-test-runs"),
    ("Python API (`longalign_core`)", "python-api-longalign_core"),
    ("CLIP Text Encode vs LongAlign Text Encode", "clip-text-encode-vs-longalign-text-encode"),
    ("Peak memory ≤ 24 GiB — SDXL", "peak-memory--24-gib--sdxl"),
    ("See [the trainer](trainer.md)", "see-the-trainer"),
])
def test_github_heading_ids(heading, slug):
    assert github_slug(heading) == slug


def test_the_checker_finds_broken_files_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a b.md").write_text("# Title\n\n## Notes\n\n## Notes\n\nSetext\n------\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text(
        "# Top\n\n"
        "[ok](<docs/a b.md#notes-1>) [ok](docs/a%20b.md#setext) [ok](#top) ![ok](docs/) [ext](https://x.org/#nope)\n"
        "[no file](docs/missing.md) [no anchor](<docs/a b.md#notes-2>) [no anchor here](#bottom)\n"
        "```\n[inside a code block](nowhere.md)\n```\n"
        "`[inside code](nowhere.md)` [outside](../outside.md)\n"
        "[ref]: docs/gone.md\n",
        encoding="utf-8")
    problems = broken_links(page, root=tmp_path)
    assert [p.split(": ")[0] + ": " + p.split(": ")[1] for p in problems] == [
        "README.md:4: docs/missing.md", "README.md:4: <docs/a b.md#notes-2>", "README.md:4: #bottom",
        "README.md:8: ../outside.md", "README.md:9: docs/gone.md"], problems
