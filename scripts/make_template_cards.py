#!/usr/bin/env python3
"""Draw the Templates-dialog card picture of every example workflow: workflows/<title>.jpg.

    python scripts/make_template_cards.py

ComfyUI 0.8.0's Templates dialog shows a custom node pack's template with the picture ``<file stem>.jpg`` next
to the workflow file, at about 250 px wide. A screenshot of a graph is unreadable at that size, so each card is
drawn: the workflow's title in large type, its one-line blurb, and the path through its main nodes. Needs
Pillow (a dependency of the pack); title, blurb and path come from each workflow's definition
(scripts/workflow_gen/, through scripts/make_workflows.py).
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
SIZE = 512  # drawn at 2x of the card's display size, so it stays sharp on high-density screens

BACKGROUND, PANEL, ACCENT, TEXT, MUTED = (24, 26, 33), (44, 48, 60), (86, 156, 214), (240, 240, 240), (170, 176, 190)


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_workflows", REPO / "scripts" / "make_workflows.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's own scalable font: the same on every machine


def draw_card(title: str, blurb: str, flow: tuple[str, ...], size: int = SIZE) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUND)
    d = ImageDraw.Draw(img)
    pad = size // 16
    d.rectangle([0, 0, size, size // 64], fill=ACCENT)
    d.text((pad, pad), "LongAlign", font=_font(size // 18), fill=ACCENT)
    name = title.removeprefix("LongAlign ")
    name = title if name.startswith("vs ") else name[0].upper() + name[1:]
    y = pad + size // 10
    lines, scale = textwrap.wrap(name, 16), 10
    if len(lines) > 3:  # a long title in smaller type, so that the blurb and the path still fit
        lines, scale = textwrap.wrap(name, 21), 13
    for line in lines:
        d.text((pad, y), line, font=_font(size // scale), fill=TEXT)
        y += size * 10 // (9 * scale)
    y += size // 40
    for line in textwrap.wrap(blurb, 30):
        d.text((pad, y), line, font=_font(size // 19), fill=MUTED)
        y += size // 15
    # the node path, bottom of the card
    box_h, gap = size // 14, size // 48
    top = size - pad - len(flow) * (box_h + gap) + gap
    for k, label in enumerate(flow):
        y0 = top + k * (box_h + gap)
        x0 = pad + k * size // 24
        d.rounded_rectangle([x0, y0, size - pad, y0 + box_h], radius=box_h // 4, fill=PANEL)
        d.text((x0 + size // 40, y0 + box_h // 2), label, font=_font(size // 24), fill=TEXT, anchor="lm")
        if k:
            d.text((x0 - size // 30, y0 + box_h // 2), "›", font=_font(size // 16), fill=ACCENT, anchor="mm")
    return img


def main() -> int:
    gen = _load_generator()
    for wf in gen.build_all().values():
        path = REPO / "workflows" / f"{wf.title}.jpg"
        draw_card(wf.title, wf.blurb, wf.card_path).save(path, quality=90, optimize=True)
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
