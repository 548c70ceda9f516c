#!/usr/bin/env python3
"""The example workflows, defined once and written in both ComfyUI formats.

    python scripts/make_workflows.py            # (re)write workflows/*.json and workflows/api/*.json
    python scripts/make_workflows.py --check    # exit 1 if the files on disk differ from the generator
    python scripts/make_workflows.py --refresh-schemas http://127.0.0.1:8188   # node schemas from a ComfyUI

``workflows/<title>.json`` is the UI ("Save") format a user drags into ComfyUI (LiteGraph graph, version 0.4);
ComfyUI lists it under the pack's templates. ``workflows/api/<name>.json`` is the API format a script posts to
``/prompt``; ComfyUI does not list the ``api/`` sub-folder. Both are rendered from the same
:class:`~workflow_gen.graph.Workflow` objects (scripts/workflow_gen/), so they cannot drift apart. Each node's
sockets and widgets come from the node's own schema (scripts/workflow_gen/node_schemas.json, a snapshot of
ComfyUI's /object_info that --refresh-schemas rewrites). ``tests/test_browser.py`` checks the widgets against
the real frontend and that the frontend turns each UI file into exactly its API twin. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: the workflow_gen package

from workflow_gen import comparison, content, scoring, text_to_image, training  # noqa: E402,F401
from workflow_gen.api_format import api_prompt  # noqa: E402
from workflow_gen.content import (DENSCORE_FOLDER, LONG_PROMPT, LONGSD_ADAPTER_FOLDER,  # noqa: E402,F401
                                  LONGSD_REWARD_LORA, LONGSD_STAGE1_LORA, LONGSD_T5_FOLDER, SD15_CHECKPOINT, SD15_LORA,
                                  SDXL_CHECKPOINT, SDXL_LORA, TRAINER_LORA_FILE)  # (the names tests/ use)
from workflow_gen.graph import NODE_TYPES, VIEW, Node, Workflow  # noqa: E402,F401
from workflow_gen.node_types import CONTROL, SCHEMAS_FILE, dumps_schemas, server_schemas  # noqa: E402,F401
from workflow_gen.ui_format import ui_graph  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = REPO / "workflows"
API_SUBDIR = "api"

WORKFLOWS = [text_to_image.long_prompt_sd15, text_to_image.longsd, scoring.denscore_best_of_n,
             text_to_image.sdxl_long_prompt, text_to_image.sdxl_longalign_lora, comparison.comparison,
             scoring.lora_vs_base, training.train_and_evaluate]


def build_all() -> dict[str, Workflow]:
    return {wf.name: wf for wf in (make() for make in WORKFLOWS)}


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def rendered() -> dict[str, str]:
    """Relative path under workflows/ -> file text, for every file this script writes."""
    files = {}
    for name, wf in build_all().items():
        files[f"{wf.title}.json"] = dumps(ui_graph(wf))
        files[f"{API_SUBDIR}/{name}.json"] = dumps(api_prompt(wf))
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 if a file differs or is missing")
    ap.add_argument("--out", type=Path, default=WORKFLOW_DIR, help="folder to write (default: workflows/)")
    ap.add_argument("--refresh-schemas", metavar="URL",
                    help="rewrite scripts/workflow_gen/node_schemas.json from the /object_info of the ComfyUI at "
                         "URL (this pack installed), then stop: run again without it to regenerate")
    args = ap.parse_args(argv)
    if args.refresh_schemas:
        SCHEMAS_FILE.write_text(dumps_schemas(server_schemas(args.refresh_schemas)), encoding="utf-8")
        print(f"wrote {SCHEMAS_FILE.relative_to(REPO)}")
        return 0
    stale = []
    for rel, text in rendered().items():
        path = args.out / rel
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current == text:
            continue
        stale.append(rel)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if args.check:
        for rel in stale:
            print(f"out of date: workflows/{rel} (run python scripts/make_workflows.py)", file=sys.stderr)
        return 1 if stale else 0
    print(f"wrote {len(stale)} file(s) under {args.out}" if stale else "workflows are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
