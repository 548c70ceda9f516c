#!/usr/bin/env python3
"""The example workflows, defined once and written in both ComfyUI formats.

    python scripts/make_workflows.py            # (re)write workflows/*.json and workflows/api/*.json
    python scripts/make_workflows.py --check    # exit 1 if the files on disk differ from this script

``workflows/<name>.json`` is the UI ("Save") format a user drags into ComfyUI (LiteGraph graph, version 0.4);
ComfyUI lists it under the pack's templates. ``workflows/api/<name>.json`` is the API format a script posts to
``/prompt``; ComfyUI does not list the ``api/`` sub-folder. Both are rendered from the same :class:`Workflow`
objects below, so they cannot drift apart.

Widget values are stored in the order the ComfyUI frontend builds a node's widgets (``WIDGETS``): a V1/V3
node's widget inputs in schema order (required, then optional), KSampler's seed followed by the frontend-only
``control_after_generate`` value. ``tests/test_browser.py`` checks this table against the real frontend and
checks that the frontend turns each UI file into exactly its API twin. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = REPO / "workflows"
API_SUBDIR = "api"

#: Placeholder in WIDGETS for the frontend-only value that follows a seed widget.
CONTROL = "control_after_generate"

# --------------------------------------------------------------------------------------------------------------
# Node types used by the workflows: socket inputs, outputs, widget names in frontend order.
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeType:
    inputs: tuple[tuple[str, str], ...] = ()  # (name, type) of the sockets, in frontend order
    outputs: tuple[tuple[str, str], ...] = ()  # (name, type)
    widgets: tuple[str, ...] = ()  # widget names in frontend order (CONTROL = control_after_generate)
    #: widgets the frontend adds on its own (not sent to the server): name -> value stored in the UI file
    frontend_widgets: tuple[tuple[str, object], ...] = ()
    virtual: bool = False  # frontend-only node (Note, MarkdownNote): not part of the API format
    #: the smallest size the frontend (1.35.9) draws the node at; a smaller saved size is enlarged on load
    min_size: tuple[float, float] = (210, 26)


NODE_TYPES: dict[str, NodeType] = {
    "CheckpointLoaderSimple": NodeType(outputs=(("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")),
                                       widgets=("ckpt_name",), min_size=(210, 98)),
    "CLIPTextEncode": NodeType(inputs=(("clip", "CLIP"),), outputs=(("CONDITIONING", "CONDITIONING"),),
                               widgets=("text",), min_size=(219, 88)),
    "EmptyLatentImage": NodeType(outputs=(("LATENT", "LATENT"),), widgets=("width", "height", "batch_size"),
                                 min_size=(210, 106)),
    "KSampler": NodeType(inputs=(("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                 ("latent_image", "LATENT")),
                         outputs=(("LATENT", "LATENT"),),
                         widgets=("seed", CONTROL, "steps", "cfg", "sampler_name", "scheduler", "denoise"),
                         min_size=(210, 262)),
    "VAEDecode": NodeType(inputs=(("samples", "LATENT"), ("vae", "VAE")), outputs=(("IMAGE", "IMAGE"),),
                          min_size=(140, 46)),
    "SaveImage": NodeType(inputs=(("images", "IMAGE"),), widgets=("filename_prefix",), min_size=(210, 58)),
    "PreviewImage": NodeType(inputs=(("images", "IMAGE"),), min_size=(140, 26)),
    # "Preview as Text": the frontend adds two display widgets that are never restored from a file (the
    # frontend skips them when it reads widgets_values) and a previewMode toggle, which is.
    "PreviewAny": NodeType(inputs=(("source", "*"),), frontend_widgets=(("previewMode", False),),
                           min_size=(210, 112)),
    "PrimitiveStringMultiline": NodeType(outputs=(("STRING", "STRING"),), widgets=("value",), min_size=(210, 88)),
    "MarkdownNote": NodeType(widgets=("text",), virtual=True, min_size=(210, 88)),
    # The frontend's Reroute node (no title bar): a link bend point; graphToPrompt links straight through it.
    "Reroute": NodeType(inputs=(("", "*"),), outputs=(("", "*"),), virtual=True, min_size=(75, 26)),
    # --- this pack ---
    "LongAlignTextEncode": NodeType(
        inputs=(("clip", "CLIP"), ("longalign_t5", "LONGALIGN_T5")),
        outputs=(("CONDITIONING", "CONDITIONING"), ("report", "STRING"), ("segments", "INT"), ("tokens", "INT")),
        widgets=("text", "token_budget", "overflow", "split_mode", "long_sentences"), min_size=(210, 244)),
    # ComfyUI's "LoraLoaderModelOnly": a kohya/diffusers LoRA on the MODEL only (what this pack's trainer writes)
    "LoraLoaderModelOnly": NodeType(inputs=(("model", "MODEL"),), outputs=(("MODEL", "MODEL"),),
                                    widgets=("lora_name", "strength_model"), min_size=(210, 82)),
    "LongAlignLoadLongSDLoRA": NodeType(inputs=(("model", "MODEL"),), outputs=(("MODEL", "MODEL"),),
                                        widgets=("lora_name", "strength"), min_size=(210, 82)),
    "LongAlignLoadT5Adapter": NodeType(outputs=(("LONGALIGN_T5", "LONGALIGN_T5"),),
                                       widgets=("t5_folder", "adapter_folder", "attention_mask", "precision"),
                                       min_size=(221, 130)),
    "LongAlignPreferenceModelLoader": NodeType(outputs=(("DENSCORE_MODEL", "DENSCORE_MODEL"),),
                                               widgets=("model_name", "kind", "precision"), min_size=(273, 106)),
    "LongAlignDenscoreScore": NodeType(
        inputs=(("denscore_model", "DENSCORE_MODEL"), ("images", "IMAGE")),
        outputs=(("scores", "FLOAT"), ("text_relevant", "FLOAT"), ("text_irrelevant", "FLOAT"), ("eta", "FLOAT"),
                 ("report", "STRING"), ("chart", "IMAGE")),
        widgets=("text", "omega", "reference_prompts", "split_mode"), min_size=(220, 290)),
    "LongAlignDenscoreBestOfN": NodeType(
        inputs=(("denscore_model", "DENSCORE_MODEL"), ("images", "IMAGE")),
        outputs=(("best_image", "IMAGE"), ("best_index", "INT"), ("scores", "FLOAT"), ("report", "STRING")),
        widgets=("text", "omega", "rank_by", "reference_prompts", "split_mode"),  # required first, then optional
        min_size=(212, 274)),
}

WIDGETS = {name: t.widgets for name, t in NODE_TYPES.items()}

#: The window the initial view is framed for, the frontend's bars around the canvas (left, top, right, bottom),
#: and the height of a node's title bar (drawn above its pos).
VIEW = (1920, 1080)
VIEW_MARGINS = (80, 110, 30, 30)
TITLE_HEIGHT = 30

#: Colours ComfyUI's own templates use for positive / negative prompt nodes.
GREEN = {"color": "#232", "bgcolor": "#353"}
RED = {"color": "#322", "bgcolor": "#533"}

# --------------------------------------------------------------------------------------------------------------
# Graph builder
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[float, float]
    size: tuple[float, float]
    values: dict[str, object]  # widget name -> value (CONTROL included for seeds)
    title: str | None = None
    colors: dict = field(default_factory=dict)
    links_in: dict[str, tuple[Node, int]] = field(default_factory=dict)  # input name -> (source node, slot)

    @property
    def spec(self) -> NodeType:
        return NODE_TYPES[self.type]

    def out(self, name: str) -> tuple[Node, int]:
        """An output of this node by name, for :meth:`Workflow.link`."""
        names = [n for n, _ in self.spec.outputs]
        return self, names.index(name)


@dataclass
class Workflow:
    name: str  # short id: the API file's name (workflows/api/<name>.json)
    #: the UI file's name (workflows/<title>.json): ComfyUI 0.8.0's Templates dialog shows a custom node
    #: pack's template by its file name, as title and description, and searches it by that name
    title: str = ""
    #: one line on what the workflow shows, drawn on its template card (scripts/make_template_cards.py)
    blurb: str = ""
    nodes: list[Node] = field(default_factory=list)

    def add(self, type_: str, pos, size, title: str | None = None, colors: dict | None = None, **values) -> Node:
        spec = NODE_TYPES[type_]
        expected = list(spec.widgets)
        if sorted(values) != sorted(expected):
            raise ValueError(f"{type_}: widget values {sorted(values)} != widgets {sorted(expected)}")
        if size[0] < spec.min_size[0] or size[1] < spec.min_size[1]:
            raise ValueError(f"{type_}: size {size} is below the frontend's minimum {spec.min_size}")
        node = Node(len(self.nodes) + 1, type_, tuple(pos), tuple(size), values, title, dict(colors or {}))
        self.nodes.append(node)
        return node

    def reroute(self, source: tuple[Node, int], pos) -> Node:
        """A Reroute node at ``pos`` fed by ``source``; link onwards from ``node.out("")``."""
        node = self.add("Reroute", pos, (75, 26))
        self.link(source, node, "")
        return node

    @staticmethod
    def origin(source: tuple[Node, int]) -> tuple[Node, int]:
        """The real output behind a chain of Reroute nodes."""
        node, slot = source
        while node.type == "Reroute":
            node, slot = node.links_in[""]
        return node, slot

    def out_type(self, node: Node, slot: int) -> str:
        src, k = self.origin((node, slot))
        return src.spec.outputs[k][1]

    def note(self, text: str, pos, size) -> Node:
        return self.add("MarkdownNote", pos, size, title="Read me", text=text)

    @staticmethod
    def link(source: tuple[Node, int], target: Node, input_name: str) -> None:
        """Connect an output (``node.out(name)``) to a socket input or to a widget input of ``target``."""
        node, slot = source
        sockets = [n for n, _ in target.spec.inputs]
        if input_name not in sockets and input_name not in target.spec.widgets:
            raise ValueError(f"{target.type} has no input {input_name!r}")
        if input_name in target.links_in:
            raise ValueError(f"{target.type}.{input_name} is already connected")
        target.links_in[input_name] = (node, slot)

    # -- ordering ----------------------------------------------------------------------------------------------
    def execution_order(self) -> list[Node]:
        """Nodes in a topological order (sources first, ties by id); what LiteGraph stores as ``order``."""
        done: list[Node] = []
        pending = sorted(self.nodes, key=lambda n: n.id)
        while pending:
            ready = [n for n in pending if all(src in done for src, _ in n.links_in.values())]
            if not ready:
                raise ValueError(f"{self.name}: the graph has a cycle")
            done.append(ready[0])
            pending.remove(ready[0])
        return done

    def _links(self) -> list[tuple[int, Node, int, Node, str]]:
        """(link id, source, source slot, target, input name), numbered by target id then input position."""
        out = []
        for target in sorted(self.nodes, key=lambda n: n.id):
            order = [n for n, _ in target.spec.inputs] + list(target.spec.widgets)
            for name in sorted(target.links_in, key=order.index):
                src, slot = target.links_in[name]
                out.append((len(out) + 1, src, slot, target, name))
        return out

    # -- UI format ---------------------------------------------------------------------------------------------
    def ui(self) -> dict:
        links = self._links()
        order = {n.id: i for i, n in enumerate(self.execution_order())}
        nodes = []
        for n in self.nodes:
            spec = n.spec
            inputs = [{"name": name, "type": t, "link": None} for name, t in spec.inputs]
            for name in spec.widgets:  # widget inputs appear as inputs only while connected
                if name in n.links_in:
                    src, slot = n.links_in[name]
                    inputs.append({"name": name, "type": self.out_type(src, slot), "widget": {"name": name},
                                   "link": None})
            slot_of = {i["name"]: k for k, i in enumerate(inputs)}
            for link_id, src, slot, target, name in links:
                if target is n:
                    inputs[slot_of[name]]["link"] = link_id
            outputs = []
            for k, (name, t) in enumerate(spec.outputs):
                ids = [lid for lid, src, slot, _, _ in links if src is n and slot == k]
                if n.type == "Reroute":  # the frontend types a reroute's output by what it carries
                    t = self.out_type(n, k)
                outputs.append({"name": name, "type": t, "links": ids, "slot_index": k})
            entry = {"id": n.id, "type": n.type}
            if n.title:
                entry["title"] = n.title
            entry.update({"pos": list(n.pos), "size": list(n.size), "flags": {}, "order": order[n.id], "mode": 0,
                          "inputs": inputs, "outputs": outputs,
                          "properties": {"showOutputText": False, "horizontal": False} if n.type == "Reroute"
                          else {"Node name for S&R": n.type},
                          "widgets_values": [n.values[w] for w in spec.widgets]
                          + [v for _, v in spec.frontend_widgets]})
            entry.update(n.colors)
            nodes.append(entry)
        return {
            "last_node_id": max(n.id for n in self.nodes),
            "last_link_id": len(links),
            "nodes": nodes,
            "links": [[lid, src.id, slot, target.id, self._slot(target, name), self.out_type(src, slot)]
                      for lid, src, slot, target, name in links],
            "groups": [],
            "config": {},
            "extra": {"ds": self.initial_view()},
            "version": 0.4,
        }

    def initial_view(self, width: int = VIEW[0], height: int = VIEW[1]) -> dict:
        """Canvas scale and offset that show the whole graph in a ``width`` x ``height`` window, clear of the
        frontend's side bar and top bar (LiteGraph maps a graph point p to the screen as (p + offset) * scale)."""
        left, top, right, bottom = VIEW_MARGINS
        x0 = min(n.pos[0] for n in self.nodes)
        y0 = min(n.pos[1] for n in self.nodes) - TITLE_HEIGHT
        x1 = max(n.pos[0] + n.size[0] for n in self.nodes)
        y1 = max(n.pos[1] + n.size[1] for n in self.nodes)
        scale = min(1.0, (width - left - right) / (x1 - x0), (height - top - bottom) / (y1 - y0))
        scale = int(scale * 100) / 100  # round down to 0.01
        return {"scale": scale, "offset": [round(left / scale - x0, 1), round(top / scale - y0, 1)]}

    @staticmethod
    def _slot(target: Node, name: str) -> int:
        names = [n for n, _ in target.spec.inputs] + [w for w in target.spec.widgets if w in target.links_in]
        return names.index(name)

    # -- API format --------------------------------------------------------------------------------------------
    def api(self) -> dict:
        prompt = {}
        for n in self.nodes:
            if n.spec.virtual:
                continue
            inputs: dict[str, object] = {}
            for name in n.spec.widgets:
                if name == CONTROL:
                    continue
                if name in n.links_in:
                    src, slot = self.origin(n.links_in[name])
                    inputs[name] = [str(src.id), slot]
                else:
                    inputs[name] = n.values[name]
            for name, _ in n.spec.inputs:
                if name in n.links_in:
                    src, slot = self.origin(n.links_in[name])
                    inputs[name] = [str(src.id), slot]
            prompt[str(n.id)] = {"inputs": inputs, "class_type": n.type,
                                 "_meta": {"title": n.title or DISPLAY_NAMES[n.type]}}
        return prompt


#: Display names (what the frontend uses as the default title, and so as the API ``_meta.title``).
DISPLAY_NAMES = {
    "CheckpointLoaderSimple": "Load Checkpoint",
    "CLIPTextEncode": "CLIP Text Encode (Prompt)",
    "EmptyLatentImage": "Empty Latent Image",
    "KSampler": "KSampler",
    "VAEDecode": "VAE Decode",
    "SaveImage": "Save Image",
    "PreviewImage": "Preview Image",
    "PreviewAny": "Preview as Text",
    "LoraLoaderModelOnly": "LoraLoaderModelOnly",  # no display name in ComfyUI 0.8.0: the frontend shows the id
    "PrimitiveStringMultiline": "String (Multiline)",
    "MarkdownNote": "Markdown Note",
    "Reroute": "Reroute",
    "LongAlignTextEncode": "LongAlign Text Encode",
    "LongAlignLoadLongSDLoRA": "Load LongSD LoRA",
    "LongAlignLoadT5Adapter": "Load LongAlign T5 Adapter",
    "LongAlignPreferenceModelLoader": "Load Preference Model (Denscore)",
    "LongAlignDenscoreScore": "Denscore Score",
    "LongAlignDenscoreBestOfN": "Denscore Best-of-N",
}

# --------------------------------------------------------------------------------------------------------------
# Shared content
# --------------------------------------------------------------------------------------------------------------

SD15_CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
LONGSD_STAGE1_LORA = "s28750_lora_vis.pt"
LONGSD_REWARD_LORA = "sd15-reward-3750.pt"
LONGSD_T5_FOLDER = "t5-large"
LONGSD_ADAPTER_FOLDER = "s28750_adapter"
DENSCORE_FOLDER = "Denscore"
#: The trainer's LoRA (``trainer/lora_layers.py`` names ``<output_dir>/longalign_lora.safetensors``), renamed by the
#: user so that it says which base model it belongs to.
TRAINER_LORA_FILE = "longalign_lora.safetensors"
SDXL_LORA = "longalign_sdxl_lora.safetensors"
SD15_LORA = "longalign_sd15_lora.safetensors"
#: The trainer command that makes SD15_LORA (the Read me note of lora_vs_base shows it).
SD15_TRAIN_COMMAND = (
    f"python -m trainer.finetune --model /path/to/{SD15_CHECKPOINT} --reward-model /path/to/{DENSCORE_FOLDER} "
    "--prompts long_prompts.txt --output-dir outputs/sd15"
)
#: The evaluation command the same note gives (many prompts and seeds, with intervals).
SD15_EVAL_COMMAND = (
    f"python -m trainer.evaluate --model /path/to/{SD15_CHECKPOINT} --reward-model /path/to/{DENSCORE_FOLDER} "
    f"--lora outputs/sd15/{TRAINER_LORA_FILE}"
)
#: The trainer command that makes SDXL_LORA (the Read me note of sdxl_longalign_lora and the README show it).
SDXL_TRAIN_COMMAND = (
    f"python -m trainer.finetune --model /path/to/{SDXL_CHECKPOINT} --reward-model /path/to/{DENSCORE_FOLDER} "
    "--resolution 1024 --output-dir outputs/sdxl"
)

#: A 13-sentence, 224-token prompt (three CLIP windows); with its 13 start tokens it fills 237 of the 240-token budget.
LONG_PROMPT = (
    "A cosy bookshop on a rainy evening, seen from the street through a tall arched window. "
    "Warm yellow light falls on wooden shelves that reach up to a dark green ceiling. "
    "A tall woman in a red wool coat reads a small blue book near the window. "
    "Beside her, a boy in a yellow raincoat kneels on the floor and stacks picture books into a tower. "
    "A grey tabby cat sleeps on a pile of old atlases on the counter. "
    "Behind the counter, an old bookseller with round glasses pours tea from a white porcelain pot. "
    "A brass bell hangs above the door, and a black umbrella drips in a tall ceramic stand. "
    "On the window sill stand three potted cacti and a glass jar full of pencils. "
    "Rain runs down the glass in thin streams, and the street lamps outside make orange circles on the wet "
    "cobblestones. "
    "A bicycle with a wicker basket full of tulips leans against the lamp post. "
    "A chalkboard sign by the door reads OPEN in white letters. "
    "The ceiling is strung with small paper lanterns in pink, teal and gold. "
    "Photograph, 35mm, shallow depth of field."
)
NEGATIVE_PROMPT = "blurry, low quality, deformed hands, watermark, text artefacts, oversaturated."

SDXL_PROMPT = (
    "An old harbour town on a steep hillside at golden hour, seen from a boat in the bay. "
    "Narrow houses painted ochre, coral and sky blue stand in uneven rows above the quay. "
    "A white lighthouse with a red lantern room rises at the end of a long stone pier. "
    "Fishing boats with blue hulls and orange buoys are moored along the harbour wall. "
    "A fisherman in yellow oilskins coils a thick rope on the deck of the nearest boat. "
    "Seagulls circle above a market stall piled with silver fish and lemons. "
    "Laundry hangs between two balconies, white sheets glowing in the low sun. "
    "A church bell tower with a green copper dome stands at the top of the hill. "
    "Long shadows stretch across the water, which reflects the coloured houses. "
    "Highly detailed, natural colours, cinematic lighting, 50mm lens."
)

LONGALIGN_WIDGETS = dict(token_budget=240, overflow="extend", split_mode="sentence", long_sentences="split")


# --------------------------------------------------------------------------------------------------------------
# The workflows. Columns A x=20 (loaders, prompt, note), B x=440 (text encoders, latent), C x=960 (report,
# sampler), D x=1460 (decode, Denscore loader), E and F (outputs). A node's pos is the top-left of its body; its
# 30 px title bar sits above it. Links are splines that leave an output to the right and enter an input from
# the left, so a link that crosses a column must stay in a free band of it: the checkpoint's MODEL and VAE
# links run through a corridor between the positive and the negative encoder, the VAE link passes above the
# sampler, and no link runs behind a node (tests/test_workflows.py computes it).
# --------------------------------------------------------------------------------------------------------------

A, B, C, D = 20, 440, 960, 1460
TOP = 60
CKPT_Y = 400  # the checkpoint loader; its MODEL / CLIP / VAE outputs are at y + 14 / 34 / 54
ENCODER_W = 420


def _encode_pair(wf: Workflow, clip, positive: str, negative: str, pos_y: float, neg_y: float, t5=None,
                 pos_h: float = 300):
    """A positive and a negative LongAlign Text Encode (column B) sharing one CLIP (and T5 branch)."""
    pos = wf.add("LongAlignTextEncode", (B, pos_y), (ENCODER_W, pos_h), title="LongAlign Text Encode (positive)",
                 colors=GREEN, text=positive, **LONGALIGN_WIDGETS)
    neg = wf.add("LongAlignTextEncode", (B, neg_y), (ENCODER_W, 244), title="LongAlign Text Encode (negative)",
                 colors=RED, text=negative, **LONGALIGN_WIDGETS)
    for node in (pos, neg):
        wf.link(clip, node, "clip")
        if t5 is not None:
            wf.link(t5, node, "longalign_t5")
    return pos, neg


def _sample(wf: Workflow, model, pos, neg, latent, x: float, y: float, seed: int, steps: int, cfg: float,
            sampler: str, scheduler: str, title: str | None = None):
    ks = wf.add("KSampler", (x, y), (320, 262), title=title, seed=seed, control_after_generate="fixed", steps=steps,
                cfg=cfg, sampler_name=sampler, scheduler=scheduler, denoise=1.0)
    wf.link(model, ks, "model")
    wf.link(pos, ks, "positive")
    wf.link(neg, ks, "negative")
    wf.link(latent, ks, "latent_image")
    return ks


def _decode(wf: Workflow, ks, vae, x: float, y: float) -> Node:
    dec = wf.add("VAEDecode", (x, y), (210, 46))
    wf.link(ks.out("LATENT"), dec, "samples")
    wf.link(vae, dec, "vae")
    return dec


def _text_to_image(wf: Workflow, checkpoint: str, prompt: str, size: int, seed: int, steps: int, cfg: float,
                   sampler: str, scheduler: str, prefix: str, saved: str, model=None, t5=None, ckpt=None,
                   neg_y: float = 570, sampler_y: float = 520):
    """checkpoint -> LongAlign positive/negative -> KSampler -> VAE Decode -> Save Image, with the positive
    prompt's segment report in Preview as Text right next to it."""
    ckpt = ckpt or wf.add("CheckpointLoaderSimple", (A, CKPT_Y), (360, 98), ckpt_name=checkpoint)
    pos, neg = _encode_pair(wf, ckpt.out("CLIP"), prompt, NEGATIVE_PROMPT, TOP, neg_y, t5=t5)
    latent = wf.add("EmptyLatentImage", (B, neg_y + 244 + 60), (ENCODER_W, 106), width=size, height=size,
                    batch_size=1)
    report = wf.add("PreviewAny", (C, TOP), (ENCODER_W, 340), title="Preview as Text (segment report)")
    wf.link(pos.out("report"), report, "source")
    ks = _sample(wf, model or ckpt.out("MODEL"), pos.out("CONDITIONING"), neg.out("CONDITIONING"),
                 latent.out("LATENT"), C, sampler_y, seed=seed, steps=steps, cfg=cfg, sampler=sampler,
                 scheduler=scheduler)
    dec = _decode(wf, ks, ckpt.out("VAE"), D, CKPT_Y + 20)  # its vae input level with the checkpoint's VAE
    save = wf.add("SaveImage", (D + 210 + 100, TOP), (512, 560), title=f"Save Image ({saved})",
                  filename_prefix=prefix)
    wf.link(dec.out("IMAGE"), save, "images")
    return ckpt, pos


def long_prompt_sd15() -> Workflow:
    wf = Workflow("long_prompt_sd15", "LongAlign long prompt on SD1.5",
                  "A 13-sentence prompt, every sentence encoded, nothing cut")
    _text_to_image(wf, SD15_CHECKPOINT, LONG_PROMPT, 512, seed=42, steps=25, cfg=7.5, sampler="dpmpp_2m",
                   scheduler="karras", prefix="longalign_sd15", saved="SD1.5 image from the long prompt")
    wf.note(
        "## Long prompt on SD1.5\n"
        "**LongAlign Text Encode** replaces *CLIP Text Encode*: the prompt is split into sentences, each "
        "sentence is encoded by CLIP on its own, and the results are joined into one 240-token conditioning "
        "(no 77-token limit, nothing cut).\n\n"
        f"* **Load Checkpoint**: any SD1.5 checkpoint in `models/checkpoints` (e.g. `{SD15_CHECKPOINT}`).\n"
        "* Give positive and negative the same `token_budget` so they batch together.\n"
        "* **Preview as Text** shows the report: every sentence with its token count, and a `WARNING` line if "
        "anything was extended or cut.",
        (A, TOP), (360, 280))
    return wf


def longsd() -> Workflow:
    wf = Workflow("longsd", "LongAlign LongSD (LoRA, T5)",
                  "The paper's fine-tuned SD1.5: two LoRAs and the T5 branch")
    ckpt = wf.add("CheckpointLoaderSimple", (A, CKPT_Y), (360, 98), ckpt_name=SD15_CHECKPOINT)
    # The LoRA chain sits in the corridor between the two encoders, below the checkpoint's VAE link.
    lora1 = wf.add("LongAlignLoadLongSDLoRA", (B, CKPT_Y + 140), (210, 82), title="LongSD LoRA (stage 1)",
                   lora_name=LONGSD_STAGE1_LORA, strength=1.0)
    lora2 = wf.add("LongAlignLoadLongSDLoRA", (B + 250, CKPT_Y + 140), (210, 82), title="LongSD LoRA (reward)",
                   lora_name=LONGSD_REWARD_LORA, strength=1.0)
    wf.link(ckpt.out("MODEL"), lora1, "model")
    wf.link(lora1.out("MODEL"), lora2, "model")
    t5 = wf.add("LongAlignLoadT5Adapter", (A, CKPT_Y + 98 + 60), (360, 130), t5_folder=LONGSD_T5_FOLDER,
                adapter_folder=LONGSD_ADAPTER_FOLDER, attention_mask="none", precision="auto")
    _text_to_image(wf, SD15_CHECKPOINT, LONG_PROMPT, 512, seed=42, steps=25, cfg=7.5, sampler="uni_pc",
                   scheduler="normal", prefix="longsd", saved="LongSD image", model=lora2.out("MODEL"),
                   t5=t5.out("LONGALIGN_T5"), ckpt=ckpt, neg_y=CKPT_Y + 140 + 82 + 70, sampler_y=CKPT_Y + 140)
    wf.note(
        "## LongSD (LongAlign's fine-tuned SD1.5)\n"
        "Files from the LongAlign release (`luping-liu/LongAlign`) and `google-t5/t5-large`:\n\n"
        f"* `models/checkpoints/`: SD1.5 (`{SD15_CHECKPOINT}`)\n"
        f"* `models/loras/`: `{LONGSD_STAGE1_LORA}` (stage 1, long-text fine-tuning) and "
        f"`{LONGSD_REWARD_LORA}` (reward fine-tuning), chained in this order\n"
        f"* `models/text_encoders/{LONGSD_T5_FOLDER}/`: the T5 folder (config.json, model.safetensors, "
        "tokenizer files)\n"
        f"* `models/longalign/{LONGSD_ADAPTER_FOLDER}/`: the adapter folder (config.json + "
        "diffusion_pytorch_model.safetensors)\n\n"
        "The T5 branch goes into **both** text encodes. Sampler settings are LongSD's: UniPC, 25 steps, "
        "CFG 7.5, 512x512.",
        (A, TOP), (360, 280))
    return wf


def denscore_best_of_n() -> Workflow:
    """The prompt's links to the two Denscore nodes run above the generation graph (to Denscore Score, level)
    and diagonally down through free space (to Best-of-N)."""
    wf = Workflow("denscore_best_of_n", "LongAlign best of 4 by Denscore",
                  "Score 4 images sentence by sentence and keep the best")
    y0 = 240  # the generation graph starts below the prompt's links
    ck = y0 + 340  # checkpoint
    prompt = wf.add("PrimitiveStringMultiline", (A, TOP), (360, 280), title="Prompt", value=LONG_PROMPT)
    ckpt = wf.add("CheckpointLoaderSimple", (A, ck), (360, 98), ckpt_name=SD15_CHECKPOINT)
    pos, neg = _encode_pair(wf, ckpt.out("CLIP"), "", NEGATIVE_PROMPT, y0, ck + 200)
    wf.link(prompt.out("STRING"), pos, "text")
    latent = wf.add("EmptyLatentImage", (B, ck + 200 + 244 + 60), (ENCODER_W, 106), width=512, height=512,
                    batch_size=4)
    ks = _sample(wf, ckpt.out("MODEL"), pos.out("CONDITIONING"), neg.out("CONDITIONING"), latent.out("LATENT"),
                 C, ck + 120, seed=7, steps=25, cfg=7.5, sampler="dpmpp_2m", scheduler="karras")
    dec = _decode(wf, ks, ckpt.out("VAE"), D, ck + 20)
    loader = wf.add("LongAlignPreferenceModelLoader", (D, ck + 320), (320, 106), model_name=DENSCORE_FOLDER,
                    kind="auto", precision="auto")
    E = D + 320 + 100
    score = wf.add("LongAlignDenscoreScore", (E, TOP + 14 - 136), (420, 420), text="", omega=0.3,
                   reference_prompts="", split_mode="sentence")
    best = wf.add("LongAlignDenscoreBestOfN", (E, TOP + 14 - 136 + 420 + 70), (420, 290), text="", omega=0.3,
                  rank_by="score", reference_prompts="", split_mode="sentence")
    for node in (score, best):
        wf.link(loader.out("DENSCORE_MODEL"), node, "denscore_model")
        wf.link(dec.out("IMAGE"), node, "images")
        wf.link(prompt.out("STRING"), node, "text")
    batch = wf.add("PreviewImage", (E, best.pos[1] + 290 + 70), (420, 300), title="Preview Image (all 4)")
    wf.link(dec.out("IMAGE"), batch, "images")
    F = E + 420 + 100
    numbers = wf.add("PreviewAny", (F, score.pos[1]), (600, 190), title="Preview as Text (Denscore numbers)")
    wf.link(score.out("report"), numbers, "source")
    chart = wf.add("SaveImage", (F, numbers.pos[1] + 190 + 70), (600, 330), title="Save Image (Denscore chart)",
                   filename_prefix="denscore_chart")
    wf.link(score.out("chart"), chart, "images")
    save = wf.add("SaveImage", (F, chart.pos[1] + 330 + 70), (600, 400), title="Save Image (best of 4)",
                  filename_prefix="denscore_best")
    wf.link(best.out("best_image"), save, "images")
    ranking = wf.add("PreviewAny", (F, save.pos[1] + 400 + 70), (600, 190), title="Preview as Text (ranking)")
    wf.link(best.out("report"), ranking, "source")
    wf.note(
        "## Best of 4 by Denscore\n"
        "One **Prompt** node feeds the text encode and both Denscore nodes, so the images are scored against "
        "the prompt they were made from. The sampler makes a batch of 4; **Denscore Score** charts each "
        "sentence's score per image (blue = text-relevant, grey = text-irrelevant) and shows the numbers; "
        "**Denscore Best-of-N** keeps the best image.\n\n"
        f"* `models/denscore/{DENSCORE_FOLDER}/`: the `luping-liu/Denscore` folder (config.json + "
        "model.safetensors). PickScore / CLIP-H folders or an HPSv2 `.pt` work too.\n"
        "* `models/checkpoints/`: any SD1.5 checkpoint.\n"
        "* `rank_by`: score, text_relevant (alignment only) or reweighted.",
        (A, ck + 98 + 60), (360, 360))
    return wf


def sdxl_long_prompt() -> Workflow:
    wf = Workflow("sdxl_long_prompt", "LongAlign long prompt on SDXL",
                  "Long prompts on SDXL's two text encoders, 1024 px")
    _text_to_image(wf, SDXL_CHECKPOINT, SDXL_PROMPT, 1024, seed=42, steps=30, cfg=7.0, sampler="dpmpp_2m",
                   scheduler="karras", prefix="longalign_sdxl", saved="SDXL image from the long prompt")
    wf.note(
        "## Long prompt on SDXL\n"
        "The same node on SDXL's two text encoders (CLIP-L + OpenCLIP-bigG): every sentence is encoded by "
        "both, giving a 240 x 2048 conditioning.\n\n"
        f"* `models/checkpoints/`: SDXL base (`{SDXL_CHECKPOINT}`) or any SDXL checkpoint.\n"
        "* SDXL's pooled vector comes from the **first** sentence (as ComfyUI does for long prompts): put the "
        "sentence that best sums up the image first.\n"
        "* 1024x1024 is SDXL's native size.",
        (A, TOP), (360, 280))
    return wf


def sdxl_longalign_lora() -> Workflow:
    """sdxl_long_prompt with a LongAlign-trained LoRA on the MODEL; the LoRA loader sits in the corridor
    between the two encoders (as longsd's LoRAs do), the Read me note below the checkpoint."""
    wf = Workflow("sdxl_longalign_lora", "LongAlign LoRA on SDXL",
                  "SDXL with a LoRA from this pack's trainer, long prompts")
    ckpt = wf.add("CheckpointLoaderSimple", (A, CKPT_Y), (360, 98), ckpt_name=SDXL_CHECKPOINT)
    lora = wf.add("LoraLoaderModelOnly", (B, CKPT_Y + 140), (360, 82), title="Load LoRA (LongAlign SDXL LoRA)",
                  lora_name=SDXL_LORA, strength_model=1.0)
    wf.link(ckpt.out("MODEL"), lora, "model")
    _text_to_image(wf, SDXL_CHECKPOINT, SDXL_PROMPT, 1024, seed=42, steps=30, cfg=7.0, sampler="dpmpp_2m",
                   scheduler="karras", prefix="longalign_sdxl_lora", saved="SDXL image with the LongAlign LoRA",
                   model=lora.out("MODEL"), ckpt=ckpt, neg_y=CKPT_Y + 140 + 82 + 70, sampler_y=CKPT_Y + 140)
    wf.note(
        "## LongAlign LoRA on SDXL\n"
        "SDXL with a LoRA fine-tuned by this pack's trainer (LongAlign's reward stage: segment-level preference "
        "optimisation with Denscore) and **LongAlign Text Encode** for the long prompt.\n\n"
        f"* `models/checkpoints/`: the SDXL checkpoint the LoRA was trained on (`{SDXL_CHECKPOINT}`).\n"
        f"* `models/loras/`: `{SDXL_LORA}`. Make it with the trainer (GPU):\n\n"
        f"  `{SDXL_TRAIN_COMMAND}`\n\n"
        f"  then copy `outputs/sdxl/{TRAINER_LORA_FILE}` to `models/loras/{SDXL_LORA}`.\n"
        "* `strength_model` 0 gives the base model: same seed, compare.",
        (A, CKPT_Y + 98 + 60), (360, 330))
    return wf


def comparison() -> Workflow:
    """Two pipelines, one above the other, from one prompt, one checkpoint and one latent. Each row has its own
    MODEL/VAE corridor; Reroute nodes at the corridors' left ends carry the checkpoint's outputs to them."""
    wf = Workflow("comparison", "LongAlign vs CLIP Text Encode",
                    "One prompt, one seed, two text encoders, side by side")
    B2 = B + 100  # a wider first gap: the prompts' and the checkpoint's links fan out vertically in it
    C2 = B2 + ENCODER_W + 140
    D2 = C2 + 320 + 120
    E = D2 + 210 + 100
    prompt = wf.add("PrimitiveStringMultiline", (A, TOP), (360, 280), title="Prompt", value=LONG_PROMPT)
    negative = wf.add("PrimitiveStringMultiline", (A, TOP + 340), (360, 110), title="Negative prompt",
                      value=NEGATIVE_PROMPT)
    ck = TOP + 340 + 110 + 60
    ckpt = wf.add("CheckpointLoaderSimple", (A, ck), (360, 98), ckpt_name=SD15_CHECKPOINT)
    # upper row: ComfyUI's own encoder
    n_pos = wf.add("CLIPTextEncode", (B2, TOP), (ENCODER_W, 150), title="CLIP Text Encode (positive)",
                   colors=GREEN, text="")
    n_neg = wf.add("CLIPTextEncode", (B2, TOP + 210), (ENCODER_W, 150), title="CLIP Text Encode (negative)",
                   colors=RED, text="")
    upper = TOP + 210 + 150 + 40  # the upper corridor
    latent = wf.add("EmptyLatentImage", (B2, upper + 220), (ENCODER_W, 106), width=512, height=512, batch_size=1)
    # lower row: LongAlign
    low = upper + 220 + 106 + 90
    pos = wf.add("LongAlignTextEncode", (B2, low), (ENCODER_W, 300), title="LongAlign Text Encode (positive)",
                 colors=GREEN, text="", **LONGALIGN_WIDGETS)
    neg = wf.add("LongAlignTextEncode", (B2, low + 360), (ENCODER_W, 244), title="LongAlign Text Encode (negative)",
                 colors=RED, text="", **LONGALIGN_WIDGETS)
    lower = low + 360 + 244 + 40  # the lower corridor
    for node in (n_pos, n_neg, pos, neg):
        wf.link(ckpt.out("CLIP"), node, "clip")
    wf.link(prompt.out("STRING"), n_pos, "text")
    wf.link(negative.out("STRING"), n_neg, "text")
    wf.link(prompt.out("STRING"), pos, "text")
    wf.link(negative.out("STRING"), neg, "text")
    settings = dict(seed=1234, steps=25, cfg=7.5, sampler="dpmpp_2m", scheduler="karras")
    rows = []
    for corridor, p, n, title in ((upper, n_pos, n_neg, "CLIP Text Encode"), (lower, pos, neg, "LongAlign")):
        model = wf.reroute(ckpt.out("MODEL"), (B2 + 20, corridor))
        vae = wf.reroute(ckpt.out("VAE"), (B2 + 20, corridor + 40))
        ks = _sample(wf, model.out(""), p.out("CONDITIONING"), n.out("CONDITIONING"), latent.out("LATENT"), C2,
                     corridor + 140, title=f"KSampler ({title})", **settings)
        rows.append(_decode(wf, ks, vae.out(""), D2, corridor + 20))
    save_n = wf.add("SaveImage", (E, TOP), (512, 560), title="Save Image (CLIP Text Encode result)",
                    filename_prefix="compare_clip_text_encode")
    save_l = wf.add("SaveImage", (E + 512 + 240, TOP), (512, 560), title="Save Image (LongAlign result)",
                    filename_prefix="compare_longalign")
    wf.link(rows[0].out("IMAGE"), save_n, "images")
    lift = wf.reroute(rows[1].out("IMAGE"), (E + 512 + 60, TOP + 560 + 80))
    wf.link(lift.out(""), save_l, "images")
    report = wf.add("PreviewAny", (C2, low + 60), (ENCODER_W, 340), title="Preview as Text (segment report)")
    wf.link(pos.out("report"), report, "source")
    wf.note(
        "## CLIP Text Encode vs LongAlign Text Encode\n"
        "One prompt, one negative, one latent, the same seed and sampler: the only difference between the two "
        "images is the text-encode node. CLIP Text Encode cuts the prompt into 77-token chunks wherever the "
        "token count falls; LongAlign encodes whole sentences.\n\n"
        f"* `models/checkpoints/`: any SD1.5 checkpoint (`{SD15_CHECKPOINT}`).\n"
        "* Both KSamplers use seed 1234, *fixed*: change both to compare another seed.",
        (A, ck + 98 + 60), (360, 300))
    return wf


def lora_vs_base() -> Workflow:
    """One prompt, one seed, one latent: the checkpoint with the LoRA (upper row) and without (lower row), each
    image scored by its own Denscore Score; the LoRA's chart, numbers and image (column F) beside the base's
    (column G). The encoders' column is moved right to widen the gap the lower row's MODEL and VAE links drop
    through (as in comparison). The prompt's text reaches the upper Denscore node level above the graph and the
    lower one through a Reroute above the samplers; the lower row's outputs reach column G through Reroutes
    below column F."""
    wf = Workflow("lora_vs_base", "LongAlign LoRA vs base by Denscore",
                  "Same seed with and without the LoRA, scored by sentence")
    y0 = 240  # the generation graph starts below the prompt's links
    ck = y0 + 340  # checkpoint: MODEL / CLIP / VAE outputs at ck + 14 / 34 / 54
    B2 = B + 100
    C2 = B2 + ENCODER_W + 160
    D2 = C2 + 320 + 180
    E = D2 + 320 + 200  # the Denscore nodes: a wide gap before them for the links that rise and fall to them
    prompt = wf.add("PrimitiveStringMultiline", (A, TOP), (360, 280), title="Prompt", value=LONG_PROMPT)
    ckpt = wf.add("CheckpointLoaderSimple", (A, ck), (360, 98), ckpt_name=SD15_CHECKPOINT)
    pos = wf.add("LongAlignTextEncode", (B2, y0), (ENCODER_W, 300), title="LongAlign Text Encode (positive)",
                 colors=GREEN, text="", **LONGALIGN_WIDGETS)
    lora = wf.add("LoraLoaderModelOnly", (B2, ck + 140), (360, 82), title="Load LoRA (LongAlign SD1.5 LoRA)",
                  lora_name=SD15_LORA, strength_model=1.0)
    neg_y = ck + 140 + 82 + 70
    neg = wf.add("LongAlignTextEncode", (B2, neg_y), (ENCODER_W, 244), title="LongAlign Text Encode (negative)",
                 colors=RED, text=NEGATIVE_PROMPT, **LONGALIGN_WIDGETS)
    for node in (pos, neg):
        wf.link(ckpt.out("CLIP"), node, "clip")
    wf.link(prompt.out("STRING"), pos, "text")
    latent = wf.add("EmptyLatentImage", (B2, neg_y + 244 + 60), (ENCODER_W, 106), width=512, height=512,
                    batch_size=1)
    settings = dict(seed=1234, steps=25, cfg=7.5, sampler="dpmpp_2m", scheduler="karras")
    # upper row: the LoRA on the checkpoint's MODEL; the VAE link passes above its sampler
    wf.link(ckpt.out("MODEL"), lora, "model")
    ks_lora = _sample(wf, lora.out("MODEL"), pos.out("CONDITIONING"), neg.out("CONDITIONING"),
                      latent.out("LATENT"), C2, ck + 140, title="KSampler (LoRA)", **settings)
    dec_lora = _decode(wf, ks_lora, ckpt.out("VAE"), D2, ck + 20)
    # lower row: the checkpoint alone, its MODEL and VAE through Reroutes in the corridor below the latent
    low = latent.pos[1] + 106 + 40
    model = wf.reroute(ckpt.out("MODEL"), (B2 + 20, low))
    vae = wf.reroute(ckpt.out("VAE"), (B2 + 20, low + 40))
    ks_base = _sample(wf, model.out(""), pos.out("CONDITIONING"), neg.out("CONDITIONING"), latent.out("LATENT"),
                      C2, low + 140, title="KSampler (base)", **settings)
    dec_base = _decode(wf, ks_base, vae.out(""), D2, low + 20)
    # the judge: one preference model, one Denscore Score per image
    loader = wf.add("LongAlignPreferenceModelLoader", (D2, 800), (320, 106),
                    model_name=DENSCORE_FOLDER, kind="auto", precision="auto")
    score_lora = wf.add("LongAlignDenscoreScore", (E, TOP + 14 - 136), (420, 420), title="Denscore Score (LoRA)",
                        text="", omega=0.3, reference_prompts="", split_mode="sentence")
    score_base = wf.add("LongAlignDenscoreScore", (E, 1180), (420, 420), title="Denscore Score (base)",
                        text="", omega=0.3, reference_prompts="", split_mode="sentence")
    text_hop = wf.reroute(prompt.out("STRING"), (E - 90, 450))
    for node, image, text in ((score_lora, dec_lora, prompt.out("STRING")), (score_base, dec_base, text_hop.out(""))):
        wf.link(loader.out("DENSCORE_MODEL"), node, "denscore_model")
        wf.link(image.out("IMAGE"), node, "images")
        wf.link(text, node, "text")
    # outputs: column F the LoRA's, column G the base's, in the same order
    F = E + 420 + 100
    G = F + 420 + 260  # room between the columns for the links rising to G
    nodes = {}
    for x, name in ((F, "LoRA"), (G, "base")):
        chart = wf.add("SaveImage", (x, TOP - 8), (420, 300), title=f"Save Image (Denscore chart, {name})",
                       filename_prefix=f"lora_vs_base_chart_{name.lower()}")
        numbers = wf.add("PreviewAny", (x, TOP - 8 + 300 + 70), (420, 190),
                         title=f"Preview as Text (Denscore numbers, {name})")
        image = wf.add("SaveImage", (x, TOP - 8 + 300 + 70 + 190 + 70), (420, 460), title=f"Save Image ({name})",
                       filename_prefix=f"lora_vs_base_{name.lower()}")
        nodes[name] = (chart, numbers, image)
    chart, numbers, image = nodes["LoRA"]
    wf.link(score_lora.out("chart"), chart, "images")
    wf.link(score_lora.out("report"), numbers, "source")
    wf.link(dec_lora.out("IMAGE"), image, "images")
    # the base's links run below its Denscore node, then up between the columns
    lift_x, lift_y = F + 420 + 20, score_base.pos[1] + 420 + 60
    under = wf.reroute(dec_base.out("IMAGE"), (E + 20, lift_y + 80))
    for k, (src, target, input_name) in enumerate(zip(
            (score_base.out("chart"), score_base.out("report"), under.out("")), nodes["base"],
            ("images", "source", "images"))):
        hop = wf.reroute(src, (lift_x, lift_y + 40 * k))
        wf.link(hop.out(""), target, input_name)
    wf.note(
        "## LoRA vs base by Denscore\n"
        "Did the LoRA help on *this* prompt? One **Prompt**, one negative, one latent and the same seed: the "
        "upper sampler uses the checkpoint with the LoRA, the lower one the checkpoint alone, so the LoRA is the "
        "only difference. Each image gets its own **Denscore Score**: the chart (per sentence: grey = "
        "text-irrelevant, blue = text-relevant) and the numbers, LoRA on the left, base on the right.\n\n"
        f"* `models/checkpoints/`: the SD1.5 checkpoint the LoRA was trained on (`{SD15_CHECKPOINT}`).\n"
        f"* `models/loras/`: `{SD15_LORA}`, the trainer's `{TRAINER_LORA_FILE}` renamed.\n"
        f"* `models/denscore/{DENSCORE_FOLDER}/`: the Denscore folder.\n"
        "* One prompt and one seed is an anecdote: for a verdict over many prompts, with confidence intervals, "
        f"run `{SD15_EVAL_COMMAND}`.",
        (A, ck + 98 + 60), (360, 420))
    return wf


WORKFLOWS = [long_prompt_sd15, longsd, denscore_best_of_n, sdxl_long_prompt, sdxl_longalign_lora, comparison,
             lora_vs_base]


def build_all() -> dict[str, Workflow]:
    return {wf.name: wf for wf in (make() for make in WORKFLOWS)}


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def rendered() -> dict[str, str]:
    """Relative path under workflows/ -> file text, for every file this script writes."""
    files = {}
    for name, wf in build_all().items():
        files[f"{wf.title}.json"] = dumps(wf.ui())
        files[f"{API_SUBDIR}/{name}.json"] = dumps(wf.api())
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 if a file differs or is missing")
    ap.add_argument("--out", type=Path, default=WORKFLOW_DIR, help="folder to write (default: workflows/)")
    args = ap.parse_args(argv)
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
