"""The example workflows in workflows/ (UI format) and workflows/api/ (API format). No ComfyUI needed.

The files must be exactly what scripts/make_workflows.py writes, and each UI file and its API twin must describe
the same graph. The twins are compared by reading the files on disk independently of the generator's objects.
The real frontend (tests/test_browser.py) and server (tests/test_workflows_e2e.py) check the rest.
"""

import importlib.util
import math
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
NAMES = ["comparison", "denscore_best_of_n", "long_prompt_sd15", "longsd", "lora_vs_base", "sdxl_long_prompt",
         "sdxl_longalign_lora", "train_and_evaluate"]


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_workflows", REPO / "scripts" / "make_workflows.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


gen = _load_generator()
#: short id -> the UI file's stem, which ComfyUI's Templates dialog shows as the card's title and description
TITLES = {name: wf.title for name, wf in gen.build_all().items()}


def ui(name):
    return json.loads((WORKFLOWS / f"{TITLES[name]}.json").read_text(encoding="utf-8"))


def api(name):
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text(encoding="utf-8"))


def widget_values(node):
    """Widget name -> value of a UI node, by the frontend's widget order (CONTROL entries included)."""
    spec = gen.NODE_TYPES[node["type"]]
    names = list(spec.widgets) + [n for n, _ in spec.frontend_widgets]
    assert len(node["widgets_values"]) == len(names), (node["type"], node["widgets_values"], names)
    return dict(zip(names, node["widgets_values"]))


def by_type(wf, type_):
    return [n for n in wf["nodes"] if n["type"] == type_]


def source(wf, node, input_name):
    """(source node, output slot) feeding ``input_name`` of a UI node, or None; Reroute nodes are followed back
    to the real output, as the frontend's graphToPrompt does."""
    entry = next((i for i in node["inputs"] if i["name"] == input_name), None)
    if entry is None or entry["link"] is None:
        return None
    link = next(lk for lk in wf["links"] if lk[0] == entry["link"])
    src = next(n for n in wf["nodes"] if n["id"] == link[1])
    if src["type"] == "Reroute":
        return source(wf, src, "")
    return src, link[2]


# ----------------------------------------------------------------------------------------------------------------
# generator <-> files
# ----------------------------------------------------------------------------------------------------------------


def test_files_on_disk_are_what_the_generator_writes():
    expected = gen.rendered()
    assert sorted(expected) == sorted([f"{TITLES[n]}.json" for n in NAMES] + [f"api/{n}.json" for n in NAMES])
    on_disk = sorted(str(p.relative_to(WORKFLOWS)) for p in WORKFLOWS.rglob("*.json"))
    assert on_disk == sorted(expected), "stale or missing files: run python scripts/make_workflows.py"
    for rel, text in expected.items():
        assert (WORKFLOWS / rel).read_text(encoding="utf-8") == text, \
            f"workflows/{rel} differs from the generator: run python scripts/make_workflows.py"


def test_check_mode_reports_a_stale_file(tmp_path, capsys):
    assert gen.main(["--out", str(tmp_path)]) == 0
    assert gen.main(["--out", str(tmp_path), "--check"]) == 0
    victim = tmp_path / "api" / "longsd.json"
    victim.write_text(victim.read_text().replace('"uni_pc"', '"euler"'))
    assert gen.main(["--out", str(tmp_path), "--check"]) == 1
    assert "api/longsd.json" in capsys.readouterr().err


def test_builder_refuses_wrong_widgets_and_unknown_inputs():
    wf = gen.Workflow("t")
    with pytest.raises(ValueError, match="widget values"):
        wf.add("KSampler", (0, 0), (1, 1), seed=1)  # the rest missing
    with pytest.raises(ValueError, match="below the frontend's minimum"):
        wf.add("EmptyLatentImage", (0, 0), (200, 106), width=8, height=8, batch_size=1)
    a = wf.add("EmptyLatentImage", (0, 0), (210, 106), width=8, height=8, batch_size=1)
    b = wf.add("VAEDecode", (0, 0), (140, 46))
    with pytest.raises(ValueError, match="no input"):
        wf.link(a.out("LATENT"), b, "latent")
    wf.link(a.out("LATENT"), b, "samples")
    with pytest.raises(ValueError, match="already connected"):
        wf.link(a.out("LATENT"), b, "samples")


# ----------------------------------------------------------------------------------------------------------------
# node types: read from the nodes' schemas (the snapshot of /object_info), not restated
# ----------------------------------------------------------------------------------------------------------------

node_types = sys.modules["workflow_gen.node_types"]


def test_schema_entry_reduces_an_object_info_entry():
    """Both kinds of combo (a V1 option list, a V3 "COMBO"), required before optional whatever the dict order,
    the flags the frontend acts on, outputs paired with their names."""
    info = {"display_name": "Thing", "output": ["IMAGE", "STRING"], "output_name": ["picture", "text"],
            "input": {"optional": {"extra": ["STRING", {"forceInput": True}]},
                      "required": {"seed": ["INT", {"control_after_generate": True, "min": 0}],
                                   "model": ["MODEL"], "mode": [["a", "b"], {"tooltip": "x"}],
                                   "kind": ["COMBO", {"options": ["x"]}]}},
            "input_order": {"required": ["model", "seed", "mode", "kind"], "optional": ["extra"]}}
    assert node_types.schema_entry(info) == {
        "display_name": "Thing",
        "inputs": [["model", "MODEL"], ["seed", "INT", "control_after_generate"], ["mode", "COMBO"],
                   ["kind", "COMBO"], ["extra", "STRING", "forceInput"]],
        "outputs": [["picture", "IMAGE"], ["text", "STRING"]]}


def test_widgets_and_sockets_follow_the_frontends_rules():
    """KSampler as frontend 1.35.9 builds it (tests/test_browser.py checks every type in the real frontend)."""
    ks = gen.NODE_TYPES["KSampler"]
    assert ks.widgets == ("seed", gen.CONTROL, "steps", "cfg", "sampler_name", "scheduler", "denoise")
    assert ks.inputs == (("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                         ("latent_image", "LATENT"))
    forced = node_types.node_type("VAEDecode", {"display_name": "x", "outputs": [],
                                                "inputs": [["text", "STRING", "forceInput"], ["n", "INT"]]})
    assert forced.inputs == (("text", "STRING"),) and forced.widgets == ("n",)
    # frontend 1.35.9 adds control_after_generate after an INT named seed even when the schema does not ask
    seeded = node_types.node_type("VAEDecode", {"display_name": "x", "outputs": [],
                                                "inputs": [["seed", "INT"], ["seeds", "INT"], ["seed", "FLOAT"]]})
    assert seeded.widgets == ("seed", gen.CONTROL, "seeds", "seed")
    assert gen.NODE_TYPES["MarkdownNote"].virtual and not gen.NODE_TYPES["PreviewAny"].virtual


def test_a_new_input_in_the_schema_reaches_the_builder(tmp_path):
    """One input added to a node's schema (the snapshot) is a new widget the builder asks for: no table to edit."""
    schemas = node_types.load_schemas()
    schemas["EmptyLatentImage"]["inputs"].insert(1, ["depth", "INT"])
    path = tmp_path / "node_schemas.json"
    path.write_text(node_types.dumps_schemas(schemas))
    assert json.loads(path.read_text()) == schemas  # the writer round-trips
    types = node_types.load_node_types(path)
    assert types["EmptyLatentImage"].widgets == ("width", "depth", "height", "batch_size")
    del schemas["KSampler"]
    path.write_text(node_types.dumps_schemas(schemas))
    with pytest.raises(SystemExit, match="no schema for KSampler.*--refresh-schemas"):
        node_types.load_node_types(path)


def test_snapshot_file_is_written_by_the_refresh_writer():
    text = node_types.SCHEMAS_FILE.read_text(encoding="utf-8")
    assert node_types.dumps_schemas(json.loads(text)) == text


# ----------------------------------------------------------------------------------------------------------------
# UI files: well-formed LiteGraph graphs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_ui_file_is_a_consistent_litegraph_graph(name):
    wf = ui(name)
    assert wf["version"] == 0.4 and wf["groups"] == [] and isinstance(wf["config"], dict)
    ids = [n["id"] for n in wf["nodes"]]
    assert len(set(ids)) == len(ids) and wf["last_node_id"] == max(ids)
    link_ids = [lk[0] for lk in wf["links"]]
    assert len(set(link_ids)) == len(link_ids) and wf["last_link_id"] == max(link_ids)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, type_ in wf["links"]:
        out, inp = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id, (name, link_id)
        assert out["type"] == type_ and inp["type"] in (type_, "*"), (name, link_id, out, inp)
    for n in wf["nodes"]:
        assert set(n) >= {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                          "widgets_values"}
        assert n["mode"] == 0
        if n["type"] == "Reroute":  # what the frontend itself saves for one
            assert n["properties"] == {"showOutputText": False, "horizontal": False} and "title" not in n
        else:
            assert n["properties"]["Node name for S&R"] == n["type"]
        spec = gen.NODE_TYPES[n["type"]]
        sockets = [(i["name"], i["type"]) for i in n["inputs"] if "widget" not in i]
        assert sockets == list(spec.inputs), (name, n["type"])
        # widget inputs (the frontend gives every widget a slot after the sockets): listed in widget order up to
        # the last one a link drives
        listed = [i for i in n["inputs"] if "widget" in i]
        assert all(i["widget"]["name"] == i["name"] for i in listed)
        assert [i["name"] for i in listed] == [w for w in spec.widgets if w != gen.CONTROL][:len(listed)]
        assert not listed or listed[-1]["link"] is not None
        if n["type"] == "Reroute":  # typed by what it carries
            assert [o["type"] for o in n["outputs"]] == [next(lk[5] for lk in wf["links"] if lk[3] == n["id"])]
        else:
            assert [(o["name"], o["type"]) for o in n["outputs"]] == list(spec.outputs)
        assert [o["slot_index"] for o in n["outputs"]] == list(range(len(spec.outputs)))
        widget_values(n)  # asserts the count
    # "order" is a topological order: every link goes from an earlier to a later node
    order = {n["id"]: n["order"] for n in wf["nodes"]}
    assert sorted(order.values()) == list(range(len(order)))
    assert all(order[src] < order[dst] for _, src, _, dst, _, _ in wf["links"])
    ds = wf["extra"]["ds"]
    assert len(ds["offset"]) == 2
    # opens readable: above the zoom where frontend 1.35.9 draws nodes without titles and widgets (its setting
    # LiteGraph.Canvas.MinFontSizeForLOD, 8 px, over the 14 px node font; tests/test_browser.py asks the canvas)
    assert 8 / 14 < ds["scale"] <= 1.0, ds


@pytest.mark.parametrize("name", NAMES)
def test_each_workflow_has_a_note_that_says_where_models_go(name):
    notes = by_type(ui(name), "MarkdownNote")
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    assert text.startswith("## ") and "models/checkpoints" in text
    for loader in by_type(ui(name), "CheckpointLoaderSimple"):
        assert widget_values(loader)["ckpt_name"] in text or "any SD" in text


@pytest.mark.parametrize("name", NAMES)
def test_each_workflow_has_a_template_card_and_a_screenshot(name):
    """ComfyUI's Templates dialog shows workflows/<title>.jpg on the workflow's card, drawn by
    scripts/make_template_cards.py; the README shows docs/workflows/<name>.png (tests/test_browser.py writes
    them with LONGALIGN_UPDATE_DOCS=1)."""
    from PIL import Image

    title = TITLES[name]
    assert title.startswith("LongAlign ") and not set(title) & set('<>:"/\\|?*-_'), title  # Windows-safe; the
    # frontend shows '-' and '_' as spaces in the card's description and finds the card by "LongAlign"
    for path, fmt in ((WORKFLOWS / f"{title}.jpg", "JPEG"), (REPO / "docs" / "workflows" / f"{name}.png", "PNG")):
        with Image.open(path) as img:
            assert img.format == fmt and img.width >= 400, path
            if fmt == "JPEG":
                assert img.width == img.height
        assert path.stat().st_size < 200_000, path


# ----------------------------------------------------------------------------------------------------------------
# UI <-> API twins
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_twins_describe_the_same_graph(name):
    wf, prompt = ui(name), api(name)
    real = [n for n in wf["nodes"] if not gen.NODE_TYPES[n["type"]].virtual]
    assert sorted(prompt, key=int) == [str(n["id"]) for n in sorted(real, key=lambda n: n["id"])]
    api_links = 0
    for n in real:
        entry = prompt[str(n["id"])]
        assert entry["class_type"] == n["type"]
        assert entry["_meta"]["title"] == n.get("title", gen.NODE_TYPES[n["type"]].display_name)
        linked = {i["name"]: i["link"] for i in n["inputs"] if i["link"] is not None}
        for input_name, link_id in linked.items():
            src, slot = source(wf, n, input_name)
            assert entry["inputs"][input_name] == [str(src["id"]), slot], (name, n["type"], input_name)
        api_links += sum(isinstance(v, list) for v in entry["inputs"].values())
        values = widget_values(n)
        frontend_only = {w for w, _ in gen.NODE_TYPES[n["type"]].frontend_widgets} | {gen.CONTROL}
        for widget, value in values.items():
            if widget in linked:
                continue  # checked above: the API input is the link
            if widget in frontend_only:
                assert widget not in entry["inputs"], (name, n["type"], widget)
            else:
                assert entry["inputs"][widget] == value, (name, n["type"], widget)
        assert set(entry["inputs"]) == (set(values) - frontend_only) | set(linked), (name, n["type"])
    # every UI link either ends at a node the API runs, or at a Reroute that the API links through
    reroutes = {n["id"] for n in wf["nodes"] if n["type"] == "Reroute"}
    assert api_links == sum(lk[3] not in reroutes for lk in wf["links"])
    assert all(str(lk[3]) in prompt or lk[3] in reroutes for lk in wf["links"])
    assert all(str(lk[1]) in prompt or lk[1] in reroutes for lk in wf["links"])


# ----------------------------------------------------------------------------------------------------------------
# What each workflow is for (issue 6)
# ----------------------------------------------------------------------------------------------------------------


def _sampler(wf, index=0):
    return widget_values(by_type(wf, "KSampler")[index])


def test_long_prompt_sd15_uses_longalign_for_positive_and_negative():
    wf = ui("long_prompt_sd15")
    ks = by_type(wf, "KSampler")[0]
    for slot in ("positive", "negative"):
        node, out_slot = source(wf, ks, slot)
        assert node["type"] == "LongAlignTextEncode" and out_slot == 0
    pos = source(wf, ks, "positive")[0]
    assert len(widget_values(pos)["text"].split(". ")) >= 10  # a long prompt
    preview = by_type(wf, "PreviewAny")[0]
    assert source(wf, preview, "source") == (pos, 1)  # the report output
    assert not by_type(wf, "CLIPTextEncode")


def test_longsd_chains_both_loras_and_the_t5_branch():
    wf = ui("longsd")
    ks = by_type(wf, "KSampler")[0]
    reward, _ = source(wf, ks, "model")
    assert reward["type"] == "LongAlignLoadLongSDLoRA" and widget_values(reward)["lora_name"] == "sd15-reward-3750.pt"
    stage1, _ = source(wf, reward, "model")
    assert widget_values(stage1) == {"lora_name": "s28750_lora_vis.pt", "strength": 1.0}
    assert source(wf, stage1, "model")[0]["type"] == "CheckpointLoaderSimple"
    t5 = by_type(wf, "LongAlignLoadT5Adapter")[0]
    assert widget_values(t5) == {"t5_folder": "t5-large", "adapter_folder": "s28750_adapter", "attention_mask": "none",
                                 "precision": "auto"}
    for slot in ("positive", "negative"):
        encode, _ = source(wf, ks, slot)
        assert encode["type"] == "LongAlignTextEncode" and source(wf, encode, "longalign_t5") == (t5, 0)
    settings = _sampler(wf)
    assert (settings["sampler_name"], settings["steps"], settings["cfg"]) == ("uni_pc", 25, 7.5)
    latent = widget_values(by_type(wf, "EmptyLatentImage")[0])
    assert (latent["width"], latent["height"]) == (512, 512)
    note = by_type(wf, "MarkdownNote")[0]["widgets_values"][0]
    assert "models/text_encoders/t5-large" in note and "models/longalign/s28750_adapter" in note


def test_denscore_best_of_n_scores_a_batch_of_four_and_saves_the_best():
    wf = ui("denscore_best_of_n")
    assert widget_values(by_type(wf, "EmptyLatentImage")[0])["batch_size"] == 4
    score = by_type(wf, "LongAlignDenscoreScore")[0]
    best = by_type(wf, "LongAlignDenscoreBestOfN")[0]
    decode = by_type(wf, "VAEDecode")[0]
    prompt = by_type(wf, "PrimitiveStringMultiline")[0]
    for node in (score, best):
        assert source(wf, node, "images") == (decode, 0)
        assert source(wf, node, "text") == (prompt, 0)
        assert source(wf, node, "denscore_model")[0]["type"] == "LongAlignPreferenceModelLoader"
    positive = source(wf, by_type(wf, "KSampler")[0], "positive")[0]
    assert source(wf, positive, "text") == (prompt, 0)  # images are scored against the prompt they came from
    saved = [(src["id"], slot) for src, slot in (source(wf, n, "images") for n in by_type(wf, "SaveImage"))]
    assert sorted(saved) == sorted([(score["id"], 5), (best["id"], 0)])  # the chart and the best image
    assert widget_values(by_type(wf, "LongAlignPreferenceModelLoader")[0])["model_name"] == "Denscore"


def test_sdxl_long_prompt_is_1024():
    wf = ui("sdxl_long_prompt")
    latent = widget_values(by_type(wf, "EmptyLatentImage")[0])
    assert (latent["width"], latent["height"]) == (1024, 1024)
    assert "xl" in widget_values(by_type(wf, "CheckpointLoaderSimple")[0])["ckpt_name"]
    assert len(by_type(wf, "LongAlignTextEncode")) == 2


def test_sdxl_longalign_lora_puts_the_trainers_lora_on_the_model():
    """Checkpoint -> ComfyUI's LoRA loader (the trainer's kohya file) -> KSampler, LongAlign Text Encode for both
    prompts, 1024 px, and a note that gives the trainer command and where its output goes."""
    wf = ui("sdxl_longalign_lora")
    ks = by_type(wf, "KSampler")[0]
    lora, _ = source(wf, ks, "model")
    assert lora["type"] == "LoraLoaderModelOnly"
    assert widget_values(lora) == {"lora_name": "longalign_sdxl_lora.safetensors", "strength_model": 1.0}
    ckpt = by_type(wf, "CheckpointLoaderSimple")[0]
    assert source(wf, lora, "model") == (ckpt, 0)
    assert widget_values(ckpt)["ckpt_name"] == "sd_xl_base_1.0.safetensors"
    for slot in ("positive", "negative"):
        encode, _ = source(wf, ks, slot)
        assert encode["type"] == "LongAlignTextEncode" and source(wf, encode, "clip") == (ckpt, 1)
    latent = widget_values(by_type(wf, "EmptyLatentImage")[0])
    assert (latent["width"], latent["height"]) == (1024, 1024)
    decode = by_type(wf, "VAEDecode")[0]
    assert source(wf, decode, "vae") == (ckpt, 2)
    assert source(wf, by_type(wf, "SaveImage")[0], "images") == (decode, 0)
    assert source(wf, by_type(wf, "PreviewAny")[0], "source") == (source(wf, ks, "positive")[0], 1)
    note = by_type(wf, "MarkdownNote")[0]["widgets_values"][0]
    # the file the trainer writes (trainer/lora_layers.py LORA_FILE, read from the source, not imported: the trainer
    # needs diffusers), and the SDXL command that makes it
    finetune = (REPO / "trainer" / "lora_layers.py").read_text(encoding="utf-8")
    assert 'LORA_FILE = "longalign_lora.safetensors"' in finetune
    assert "`python -m trainer.finetune --model /path/to/sd_xl_base_1.0.safetensors " in note
    assert "--resolution 1024 --output-dir outputs/sdxl`" in note
    assert ("copy `outputs/sdxl/longalign_lora.safetensors` to `models/loras/longalign_sdxl_lora.safetensors`"
            in note)


def test_comparison_differs_only_in_the_text_encoder():
    wf = ui("comparison")
    samplers = by_type(wf, "KSampler")
    assert len(samplers) == 2
    a, b = (widget_values(k) for k in samplers)
    assert a == b and a["control_after_generate"] == "fixed"  # same seed, same settings
    for slot in ("model", "latent_image"):
        assert source(wf, samplers[0], slot) == source(wf, samplers[1], slot)
    kinds = sorted(source(wf, k, "positive")[0]["type"] for k in samplers)
    assert kinds == ["CLIPTextEncode", "LongAlignTextEncode"]
    for slot in ("positive", "negative"):
        encoders = [source(wf, k, slot)[0] for k in samplers]
        assert source(wf, encoders[0], "text") == source(wf, encoders[1], "text") is not None  # one prompt node
    assert len(by_type(wf, "SaveImage")) == 2
    # one row per encoder, read left to right (encoders, sampler, image); CLIP Text Encode's row above LongAlign's
    rows = {}
    for k in samplers:
        encoder = source(wf, k, "positive")[0]
        save = next(s for s in by_type(wf, "SaveImage") if source(wf, s, "images")[0]["id"] ==
                    next(d for d in by_type(wf, "VAEDecode") if source(wf, d, "samples")[0] is k)["id"])
        assert encoder["pos"][0] < k["pos"][0] < save["pos"][0]
        assert k["pos"][1] <= save["pos"][1] < k["pos"][1] + k["size"][1]  # the image in its sampler's row
        rows[encoder["type"]] = (k["pos"][1], save["pos"])
    (clip_y, clip_save), (longalign_y, longalign_save) = rows["CLIPTextEncode"], rows["LongAlignTextEncode"]
    assert clip_y < longalign_y and clip_save[0] == longalign_save[0]  # the two images one above the other


def test_lora_vs_base_differs_only_in_the_lora_and_scores_both_images():
    """Two KSamplers with one seed, one latent and one conditioning; one model is the checkpoint's, the other the
    same through ComfyUI's LoRA loader. Each image has its own Denscore Score (one preference model, the prompt
    the images came from); each arm's chart, numbers and image are saved side by side with the other's."""
    wf = ui("lora_vs_base")
    samplers = {n["title"]: n for n in by_type(wf, "KSampler")}
    assert sorted(samplers) == ["KSampler (LoRA)", "KSampler (base)"]
    lora_ks, base_ks = samplers["KSampler (LoRA)"], samplers["KSampler (base)"]
    assert widget_values(lora_ks) == widget_values(base_ks) and widget_values(base_ks)["control_after_generate"] \
        == "fixed"
    for slot in ("positive", "negative", "latent_image"):
        assert source(wf, lora_ks, slot) == source(wf, base_ks, slot) is not None
    ckpt = by_type(wf, "CheckpointLoaderSimple")[0]
    assert source(wf, base_ks, "model") == (ckpt, 0)
    lora, _ = source(wf, lora_ks, "model")
    assert lora["type"] == "LoraLoaderModelOnly" and source(wf, lora, "model") == (ckpt, 0)
    assert widget_values(lora) == {"lora_name": "longalign_sd15_lora.safetensors", "strength_model": 1.0}
    prompt = by_type(wf, "PrimitiveStringMultiline")[0]
    positive = source(wf, base_ks, "positive")[0]
    assert positive["type"] == "LongAlignTextEncode" and source(wf, positive, "text") == (prompt, 0)
    scores = {n["title"]: n for n in by_type(wf, "LongAlignDenscoreScore")}
    loader = by_type(wf, "LongAlignPreferenceModelLoader")[0]
    assert widget_values(loader)["model_name"] == "Denscore"
    saved = {n["title"]: n for n in by_type(wf, "SaveImage")}
    previews = {n["title"]: n for n in by_type(wf, "PreviewAny")}
    columns = {}
    for arm, sampler in (("LoRA", lora_ks), ("base", base_ks)):
        score = scores[f"Denscore Score ({arm})"]
        decode, _ = source(wf, score, "images")
        assert decode["type"] == "VAEDecode" and source(wf, decode, "samples") == (sampler, 0)
        assert source(wf, decode, "vae") == (ckpt, 2)
        assert source(wf, score, "text") == (prompt, 0) and source(wf, score, "denscore_model") == (loader, 0)
        chart = saved[f"Save Image (Denscore chart, {arm})"]
        numbers = previews[f"Preview as Text (Denscore numbers, {arm})"]
        image = saved[f"Save Image ({arm})"]
        assert source(wf, chart, "images") == (score, 5) and source(wf, numbers, "source") == (score, 4)
        assert source(wf, image, "images") == (decode, 0)
        columns[arm] = [score["pos"], chart["pos"], numbers["pos"], image["pos"]]
        assert sampler["pos"][0] < score["pos"][0] < chart["pos"][0]  # each row reads left to right
    # one row per model: the same columns, the base's row above the LoRA's
    assert [p[0] for p in columns["LoRA"]] == [p[0] for p in columns["base"]]
    assert all(a[1] > b[1] for a, b in zip(columns["LoRA"], columns["base"]))
    assert base_ks["pos"][1] < lora_ks["pos"][1]
    note = by_type(wf, "MarkdownNote")[0]["widgets_values"][0]
    assert "`python -m trainer.evaluate --model /path/to/v1-5-pruned-emaonly-fp16.safetensors " in note
    assert "models/loras/`: `longalign_sd15_lora.safetensors`" in note


def test_train_and_evaluate_runs_the_whole_loop_on_one_checkpoint():
    """Will it fit (the Train node's shipped mode: a first Run trains nothing) -> train -> evaluate the LoRA the
    Train node names (linked, so the evaluation waits for it) -> the same checkpoint sampled with the new LoRA
    (the Train node's MODEL output) and without, one seed, one latent, one conditioning; every node on the same
    checkpoint and preference model; a note that says where each file goes and the steps."""
    wf = ui("train_and_evaluate")
    (train,), (evaluate,) = by_type(wf, "LongAlignTrainLoRA"), by_type(wf, "LongAlignEvaluateLoRA")
    ckpt = by_type(wf, "CheckpointLoaderSimple")[0]
    t, e = widget_values(train), widget_values(evaluate)
    assert t["mode"] == "will it fit" and e["mode"] == "evaluate"
    assert t["ckpt_name"] == e["ckpt_name"] == widget_values(ckpt)["ckpt_name"] == gen.SD15_CHECKPOINT
    assert t["preference_model"] == e["preference_model"] == gen.DENSCORE_FOLDER
    assert len(gen.content.LONG_PROMPT) > 500 and gen.content.LONG_PROMPT in t["prompts"].splitlines()
    assert t["overwrite"] is False and e["prompts"] == "" and e["lora_name_2"] == ""  # the 64 held-out prompts
    assert source(wf, evaluate, "lora_name") == (train, 0)
    assert source(wf, train, "model") == (ckpt, 0)
    summaries = [source(wf, p, "source") for p in by_type(wf, "PreviewAny")]
    assert sorted((n["id"], k) for n, k in summaries) == sorted([(train["id"], 2), (evaluate["id"], 2)])
    assert [source(wf, p, "images") for p in by_type(wf, "PreviewImage")] == [(evaluate, 1)]  # the grid
    samplers = {n["title"]: n for n in by_type(wf, "KSampler")}
    lora_ks, base_ks = samplers["KSampler (LoRA)"], samplers["KSampler (base)"]
    assert source(wf, lora_ks, "model") == (train, 3) and source(wf, base_ks, "model") == (ckpt, 0)
    assert widget_values(lora_ks) == widget_values(base_ks)
    for slot in ("positive", "negative", "latent_image"):
        assert source(wf, lora_ks, slot) == source(wf, base_ks, slot) is not None
    saves = {n["title"]: n for n in by_type(wf, "SaveImage")}
    for arm, sampler in (("LoRA", lora_ks), ("base", base_ks)):
        decode, _ = source(wf, saves[f"Save Image ({arm})"], "images")
        assert source(wf, decode, "samples") == (sampler, 0) and source(wf, decode, "vae") == (ckpt, 2)
        assert saves[f"Save Image ({arm})"]["pos"][1] == sampler["pos"][1]  # in its sampler's row
    # the flow reads left to right, top to bottom: train, then evaluate; the samplers below
    assert train["pos"][0] < evaluate["pos"][0] and train["pos"][1] + train["size"][1] < lora_ks["pos"][1]
    note = by_type(wf, "MarkdownNote")[0]["widgets_values"][0]
    for text in ("models/checkpoints/", f"models/denscore/{gen.DENSCORE_FOLDER}/", "input/", "Will it fit",
                 "Queue Selected Output Nodes", "`mode` to *train*", "models/loras/longalign_lora.safetensors",
                 "64 held-out prompts"):
        assert text in note, text


# ----------------------------------------------------------------------------------------------------------------
# Layout: no link is drawn behind a node (issue 12). Geometry of ComfyUI's frontend 1.35.9 (LiteGraph), checked
# against the real frontend by tests/test_browser_help.py: a node's title bar (30 px) sits above ``pos``; socket
# k of the inputs is at (x + 10, y + 14 + 20k), of the outputs at (x + w - 9, y + 14 + 20k); a linked widget
# input sits at its widget: the first widget is drawn below the socket rows at y + 20·rows + 16, each
# single-line widget 24 px below the one before. A link is a cubic Bézier from output to input with control
# points d = max(30, |b-a|/4) to the right of the output and to the left of the input.
# ----------------------------------------------------------------------------------------------------------------

TITLE, SLOT, FIRST_SLOT = 30, 20, 14
WIDGET_ROW = 24  # a single-line widget's height plus the gap below it
SINGLE_LINE = {"COMBO", "INT", "FLOAT", "BOOLEAN", "CONTROL"}  # (a STRING widget may be a multiline box)


def socket_pos(node, kind, index):
    """Where the frontend draws input/output ``index`` of a UI-file node."""
    x, y = node["pos"]
    w, _ = node["size"]
    if kind == "output":
        return x + w - 9, y + FIRST_SLOT + SLOT * index
    entry = node["inputs"][index]
    if "widget" in entry:
        spec = gen.NODE_TYPES[node["type"]]
        k = spec.widgets.index(entry["name"])
        kinds = {i[0]: i[1] for i in node_types.load_schemas().get(node["type"], {}).get("inputs", [])}
        assert all(kinds.get(w, "CONTROL") in SINGLE_LINE for w in spec.widgets[:k]), \
            "only widgets below single-line widgets are placed by this geometry"
        rows = max(len(spec.inputs), len(spec.outputs))
        return x + 10, y + SLOT * rows + 16 + WIDGET_ROW * k
    return x + 10, y + FIRST_SLOT + SLOT * index


def link_points(a, b, samples=80):
    """Points along the frontend's spline from output ``a`` to input ``b``."""
    d = max(30.0, math.dist(a, b) * 0.25)
    c1, c2 = (a[0] + d, a[1]), (b[0] - d, b[1])
    pts = []
    for i in range(samples + 1):
        t = i / samples
        u = 1 - t
        pts.append((u ** 3 * a[0] + 3 * u * u * t * c1[0] + 3 * u * t * t * c2[0] + t ** 3 * b[0],
                    u ** 3 * a[1] + 3 * u * u * t * c1[1] + 3 * u * t * t * c2[1] + t ** 3 * b[1]))
    return pts


def node_box(node, margin=4):
    """The node's drawn area (title bar included), grown by ``margin`` px."""
    x, y = node["pos"]
    w, h = node["size"]
    title = 0 if node["type"] == "Reroute" else TITLE  # a Reroute has no title bar
    return x - margin, y - title - margin, x + w + margin, y + h + margin


def links_behind_nodes(wf):
    """(link id, node id) for every link that passes behind a node. A link may touch its own two nodes only
    at their sockets: within 16 px of the output's right edge / the input's left edge."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    hits = []
    for link_id, src, src_slot, dst, dst_slot, _ in wf["links"]:
        a = socket_pos(nodes[src], "output", src_slot)
        b = socket_pos(nodes[dst], "input", dst_slot)
        for node in wf["nodes"]:
            x0, y0, x1, y1 = node_box(node)
            if node["id"] == src:
                x1 = node["pos"][0] + node["size"][0] - 16
            if node["id"] == dst:
                x0 = node["pos"][0] + 16
            if any(x0 < px < x1 and y0 < py < y1 for px, py in link_points(a, b)):
                hits.append((link_id, node["id"]))
    return hits


def nodes_overlapping(wf):
    boxes = [(n["id"], node_box(n, margin=0)) for n in wf["nodes"]]
    return [(i, j) for k, (i, a) in enumerate(boxes) for j, b in boxes[k + 1:]
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]]


@pytest.mark.parametrize("name", NAMES)
def test_no_link_runs_behind_a_node_and_no_nodes_overlap(name):
    wf = ui(name)
    assert links_behind_nodes(wf) == []
    assert nodes_overlapping(wf) == []


@pytest.mark.parametrize("name", NAMES)
def test_nodes_are_at_least_their_frontend_minimum_size(name):
    """Smaller sizes are enlarged by the frontend on load, and the geometry above would be wrong."""
    for n in ui(name)["nodes"]:
        min_w, min_h = gen.NODE_TYPES[n["type"]].min_size
        assert n["size"][0] >= min_w and n["size"][1] >= min_h, (name, n["type"], n["size"])


def test_overlap_check_catches_a_link_behind_a_node():
    """The check itself: a node moved into a link's way, and a link that runs backwards, are caught."""
    wf = ui("long_prompt_sd15")
    assert links_behind_nodes(wf) == []
    ks = by_type(wf, "KSampler")[0]
    dec = by_type(wf, "VAEDecode")[0]
    # a node dropped onto the middle of the sampler -> decode link
    link = next(lk for lk in wf["links"] if lk[1] == ks["id"] and lk[3] == dec["id"])
    a, b = socket_pos(ks, "output", link[2]), socket_pos(dec, "input", link[4])
    mid = link_points(a, b)[40]
    blocker = {"id": 999, "type": "PreviewImage", "pos": [mid[0] - 20, mid[1] - 10], "size": [40, 40],
               "inputs": [], "outputs": []}
    assert (link[0], 999) in links_behind_nodes(dict(wf, nodes=wf["nodes"] + [blocker]))
    # the decoder moved left of the sampler: its input link now runs back behind the sampler
    moved = [dict(n, pos=[ks["pos"][0] - 300, dec["pos"][1]]) if n["id"] == dec["id"] else n for n in wf["nodes"]]
    assert any(node == ks["id"] for _, node in links_behind_nodes(dict(wf, nodes=moved)))
