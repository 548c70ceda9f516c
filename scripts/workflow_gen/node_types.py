"""Node types the workflows use: sockets and widgets from each node's own schema, plus the frontend's own facts.

The schema part is ``node_schemas.json``: ComfyUI's ``/object_info`` entry of every node type in
:data:`FRONTEND_MIN_SIZES`, reduced by :func:`schema_entry` (display name; inputs in schema order, required then
optional, with their type and the flags the frontend acts on; outputs). It is a snapshot so that the generator
runs without ComfyUI; refresh it from a running ComfyUI with this pack installed:

    python scripts/make_workflows.py --refresh-schemas http://127.0.0.1:8188

tests/test_workflows_e2e.py fails when the snapshot differs from the real server's schemas, so a node that gains
an input is one refresh and one regeneration away from correct workflows, never a hand edit here.

What no schema says stays in this module: the size the frontend (1.35.9) draws a node at least, the
frontend-only nodes (Note, Reroute), and the widgets the frontend adds on its own.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path

SCHEMAS_FILE = Path(__file__).with_name("node_schemas.json")

#: Placeholder in a widget list for the frontend-only value that follows a seed widget.
CONTROL = "control_after_generate"
#: Schema input types the frontend turns into widgets (every other type is a socket).
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
#: Input flags kept in the snapshot: the frontend adds a CONTROL widget after a ``control_after_generate`` input,
#: and draws a ``forceInput`` widget type as a socket.
#: The frontend also adds a CONTROL widget after an INT input of these names, flag or not.
SEED_NAMES = ("seed", "noise_seed")
KEPT_FLAGS = ("control_after_generate", "forceInput")

#: The smallest size the frontend (1.35.9) draws each node type at; a smaller saved size is enlarged on load.
#: Every node type a workflow uses has a row here (the schema snapshot covers the same types).
FRONTEND_MIN_SIZES: dict[str, tuple[float, float]] = {
    "CheckpointLoaderSimple": (210, 98),
    "CLIPTextEncode": (219, 88),
    "EmptyLatentImage": (210, 106),
    "KSampler": (210, 262),
    "VAEDecode": (140, 46),
    "SaveImage": (210, 58),
    "PreviewImage": (140, 26),
    "PreviewAny": (210, 112),
    "PrimitiveStringMultiline": (210, 88),
    "MarkdownNote": (210, 88),
    "Reroute": (75, 26),
    "LongAlignTextEncode": (210, 244),
    "LoraLoaderModelOnly": (210, 82),
    "LongAlignLoadLongSDLoRA": (210, 82),
    "LongAlignLoadT5Adapter": (221, 130),
    "LongAlignPreferenceModelLoader": (273, 106),
    "LongAlignDenscoreScore": (220, 290),
    "LongAlignDenscoreBestOfN": (212, 274),
    "LongAlignTrainLoRA": (233, 700),
    "LongAlignEvaluateLoRA": (210, 488),
}

#: Frontend-only nodes (not in /object_info, not part of the API format): their schema as the frontend has it.
FRONTEND_ONLY_SCHEMAS = {
    "MarkdownNote": {"display_name": "Markdown Note", "inputs": [["text", "STRING"]], "outputs": []},
    # the frontend's Reroute node (no title bar): a link bend point; graphToPrompt links straight through it
    "Reroute": {"display_name": "Reroute", "inputs": [["", "*"]], "outputs": [["", "*"]]},
}

#: Widgets the frontend adds on its own and saves in the UI file (not sent to the server): type -> (name, value).
#: "Preview as Text" also gets two display widgets that are never restored from a file (the frontend skips them
#: when it reads widgets_values) and a previewMode toggle, which is.
FRONTEND_WIDGETS: dict[str, tuple[tuple[str, object], ...]] = {"PreviewAny": (("previewMode", False),)}


@dataclass(frozen=True)
class NodeType:
    display_name: str  # the frontend's default title, and so the API format's ``_meta.title``
    inputs: tuple[tuple[str, str], ...] = ()  # (name, type) of the sockets, in frontend order
    outputs: tuple[tuple[str, str], ...] = ()  # (name, type)
    widgets: tuple[str, ...] = ()  # widget names in frontend order (CONTROL = control_after_generate)
    #: widgets the frontend adds on its own (not sent to the server): name -> value stored in the UI file
    frontend_widgets: tuple[tuple[str, object], ...] = ()
    virtual: bool = False  # frontend-only node (Note, MarkdownNote, Reroute): not part of the API format
    min_size: tuple[float, float] = (210, 26)


def schema_entry(info: dict) -> dict:
    """One ``/object_info`` entry reduced to what the workflows depend on (what the snapshot stores)."""
    declared = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
    inputs = []
    for name in order:
        spec = declared[name]
        kind = "COMBO" if isinstance(spec[0], list) else spec[0]  # a V1 combo is its list of options
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        inputs.append([name, kind, *[flag for flag in KEPT_FLAGS if options.get(flag)]])
    return {"display_name": info["display_name"], "inputs": inputs,
            "outputs": [[name, kind] for name, kind in zip(info["output_name"], info["output"])]}


def node_type(name: str, schema: dict) -> NodeType:
    """The frontend's view of a schema: sockets in schema order, widgets in schema order (a CONTROL widget after
    each ``control_after_generate`` input and each INT named seed / noise_seed), outputs."""
    sockets, widgets = [], []
    for entry in schema["inputs"]:
        input_name, kind, flags = entry[0], entry[1], entry[2:]
        if kind in WIDGET_TYPES and "forceInput" not in flags:
            widgets.append(input_name)
            if "control_after_generate" in flags or (kind == "INT" and input_name in SEED_NAMES):
                widgets.append(CONTROL)
        else:
            sockets.append((input_name, kind))
    return NodeType(display_name=schema["display_name"], inputs=tuple(sockets),
                    outputs=tuple((n, t) for n, t in schema["outputs"]), widgets=tuple(widgets),
                    frontend_widgets=FRONTEND_WIDGETS.get(name, ()), virtual=name in FRONTEND_ONLY_SCHEMAS,
                    min_size=FRONTEND_MIN_SIZES[name])


def widget_kinds(name: str, path: Path = SCHEMAS_FILE) -> list[tuple[str, str]]:
    """(input name, schema type) of a node type's inputs, as the frontend types their slots."""
    schema = {**load_schemas(path), **FRONTEND_ONLY_SCHEMAS}[name]
    return [(entry[0], entry[1]) for entry in schema["inputs"]]


def load_schemas(path: Path = SCHEMAS_FILE) -> dict[str, dict]:
    return json.loads(path.read_text(encoding="utf-8"))


def load_node_types(path: Path = SCHEMAS_FILE) -> dict[str, NodeType]:
    schemas = {**load_schemas(path), **FRONTEND_ONLY_SCHEMAS}
    missing = sorted(set(FRONTEND_MIN_SIZES) - set(schemas))
    if missing:
        raise SystemExit(f"{path} has no schema for {', '.join(missing)}: run python scripts/make_workflows.py "
                         "--refresh-schemas http://127.0.0.1:8188 against a ComfyUI with this pack installed")
    return {name: node_type(name, schemas[name]) for name in FRONTEND_MIN_SIZES}


def server_schemas(url: str) -> dict[str, dict]:
    """The snapshot's content from a running ComfyUI's ``/object_info`` (every type in FRONTEND_MIN_SIZES that
    the server knows; frontend-only nodes are not there)."""
    with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=60) as response:
        info = json.load(response)
    wanted = [n for n in FRONTEND_MIN_SIZES if n not in FRONTEND_ONLY_SCHEMAS]
    absent = [n for n in wanted if n not in info]
    if absent:
        raise SystemExit(f"{url} does not know {', '.join(absent)}: is this pack installed in that ComfyUI "
                         "(and did it load without IMPORT FAILED)?")
    return {name: schema_entry(info[name]) for name in wanted}


def dumps_schemas(schemas: dict[str, dict]) -> str:
    """The snapshot file's text: one node type per block, one input per line (diffs stay readable)."""
    blocks = []
    for name, s in schemas.items():
        rows = ",\n".join(f"      {json.dumps(i)}" for i in s["inputs"])
        outs = ", ".join(json.dumps(o) for o in s["outputs"])
        blocks.append(f'  {json.dumps(name)}: {{\n    "display_name": {json.dumps(s["display_name"])},\n'
                      f'    "inputs": [\n{rows}\n    ],\n    "outputs": [{outs}]\n  }}')
    return "{\n" + ",\n".join(blocks) + "\n}\n"
