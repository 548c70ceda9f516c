"""ComfyUI nodes for Denscore: load a preference model, score an image batch against a long prompt (numbers,
report, chart), and pick the best of N."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from comfy_api.latest import io, ui

from ..longalign_core.denscore import DEFAULT_REWEIGHT, ScoreResult, segment_score
from ..longalign_core.dtypes import PRECISIONS
from ..longalign_core.model_files import missing_model_message
from ..longalign_core.preference import MODEL_KINDS, PreferenceModel, load_preference_model
from ..longalign_core.reference_direction import cached_direction, default_reference_prompts, prompts_digest
from ..longalign_core.score_chart import format_report, render_segment_chart
from ..longalign_core.segmentation import SPLIT_MODES
from . import host

log = logging.getLogger("LongAlign")

DenscoreModel = io.Custom("DENSCORE_MODEL")
RANK_BY = ("score", "text_relevant", "reweighted")

#: Loaded preference models, keyed by (path, kind, precision): one explicit cache, as ComfyUI's own loaders do.
_LOADED: dict[tuple, "LoadedPreferenceModel"] = {}


@dataclass
class LoadedPreferenceModel:
    """What flows on a DENSCORE_MODEL link: the model, where it came from, and its cached V per prompt set."""

    model: PreferenceModel
    path: str
    directions: dict[str, torch.Tensor] = field(default_factory=dict)
    patcher: object = None


def _direction(bundle: LoadedPreferenceModel, reference_prompts: str, split_mode: str) -> torch.Tensor:
    prompt_list = ([line.strip() for line in reference_prompts.splitlines() if line.strip()]
                   or default_reference_prompts())
    # the scores below segment with long_segments="truncate" (segment_score's default): V is built the same way
    memo = (prompts_digest(prompt_list), split_mode, "truncate")
    if memo not in bundle.directions:
        pbar = host.progress_bar(1)

        def progress(done, total):
            host.check_interrupt()
            pbar.update_absolute(done, total)

        # cached next to the model when that folder is writable, else in ComfyUI's user folder
        bundle.directions[memo] = cached_direction(bundle.model, prompt_list, split_mode, "truncate",
                                                   model_path=bundle.path, fallback_dir=host.user_cache_dir(),
                                                   progress=progress)
    return bundle.directions[memo]


def _score(bundle, images, text, omega, reference_prompts, split_mode) -> ScoreResult:
    if images is None or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError("Denscore: no images to score (an empty IMAGE batch)")
    host.check_interrupt()
    host.load_model(bundle)
    direction = _direction(bundle, reference_prompts, split_mode)
    host.check_interrupt()
    # IMAGE is (B, H, W, C) in 0..1; upscalers overshoot it a little, and Save Image clips too
    pixels = images[..., :3].clamp(0, 1).permute(0, 3, 1, 2).to(bundle.model.device)
    with torch.no_grad():
        return segment_score(bundle.model, pixels, text, direction=direction, omega=omega, crop="center",
                             split_mode=split_mode, long_segments="truncate")


def _common_inputs():
    return [
        DenscoreModel.Input("denscore_model", tooltip="From Load Preference Model (Denscore, PickScore, CLIP-H or "
                                                      "HPSv2)."),
        io.Image.Input("images", tooltip="The images to score (a batch is scored in one pass)."),
        io.String.Input("text", multiline=True, tooltip="The long prompt the images should follow. It is "
                                                         "scored sentence by sentence."),
        io.Float.Input("omega", default=DEFAULT_REWEIGHT, min=0.0, max=1.0, step=0.05,
                       tooltip="Reweight factor ω of the text-irrelevant part in the reweighted score "
                               "(paper: 0.3). 1 = the plain score.", extra_dict={"advanced": True}),
        io.String.Input("reference_prompts", multiline=True, default="", optional=True,
                        tooltip="Prompts (one per line) that define the common text direction V of the "
                                "decomposition. Empty = the shipped set of 300 varied long prompts. V is "
                                "computed once per model and prompt set and cached next to the model.",
                        extra_dict={"advanced": True}),
        io.Combo.Input("split_mode", options=list(SPLIT_MODES), default="sentence", optional=True,
                       tooltip="How the prompt is cut into segments (see LongAlign Text Encode).",
                       extra_dict={"advanced": True}),
    ]


class LongAlignPreferenceModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        host.register_model_folders()
        return io.Schema(
            node_id="LongAlignPreferenceModelLoader",
            display_name="Load Preference Model (Denscore)",
            category="LongAlign/score",
            description="Loads a CLIP-based preference model from models/denscore: Denscore, PickScore or CLIP-H "
                        "as a Hugging Face CLIPModel folder, or HPSv2 as an open_clip checkpoint.",
            inputs=[
                io.Combo.Input("model_name", options=host.list_preference_models(),
                               tooltip="A folder with config.json + model.safetensors (Denscore, PickScore, "
                                       "CLIP-H) or an open_clip .pt/.safetensors file (HPSv2) in models/denscore."),
                io.Combo.Input("kind", options=list(MODEL_KINDS), default="auto",
                               tooltip="auto: a folder is a Hugging Face CLIPModel, a file an open_clip "
                                       "ViT-H-14 checkpoint (HPSv2)."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto",
                               tooltip="auto: fp16 on a GPU that supports it, fp32 on the CPU."),
            ],
            outputs=[DenscoreModel.Output(tooltip="The preference model, for Denscore Score / Best-of-N.")],
        )

    @classmethod
    def validate_inputs(cls, model_name):  # at queue time, instead of ComfyUI's "value not in list"
        return missing_model_message("Load Preference Model (Denscore)", "model_name", model_name, "denscore",
                                     host.list_preference_models())

    @classmethod
    def execute(cls, model_name, kind, precision) -> io.NodeOutput:
        path = host.resolve_preference_model(model_name)
        key = (path, kind, precision)
        if key not in _LOADED:
            _LOADED.clear()  # one preference model at a time; ComfyUI keeps the node output while it is used
            dtype = host.preferred_dtype(precision)
            _LOADED[key] = LoadedPreferenceModel(load_preference_model(path, kind, dtype=dtype), path)
        return io.NodeOutput(_LOADED[key])


class LongAlignDenscoreScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LongAlignDenscoreScore",
            display_name="Denscore Score",
            category="LongAlign/score",
            description="Segment-level preference score of each image against a long prompt, split into the "
                        "text-relevant part (alignment) and the text-irrelevant part (aesthetics-like), with a "
                        "chart showing which sentences each image misses.",
            inputs=_common_inputs(),
            outputs=[
                io.Float.Output("scores", display_name="scores", is_output_list=True,
                                tooltip="Score of each image (cosine, the paper reports ×100)."),
                io.Float.Output("text_relevant", display_name="text_relevant", is_output_list=True,
                                tooltip="Text-relevant part of each score: how well the image follows the text."),
                io.Float.Output("text_irrelevant", display_name="text_irrelevant", is_output_list=True,
                                tooltip="Text-irrelevant part: nearly the same for any prompt."),
                io.Float.Output("eta", display_name="eta", is_output_list=True,
                                tooltip="η, the prompt's projection on the common text direction V."),
                io.String.Output("report", display_name="report", tooltip="The numbers as text, with each "
                                                                          "image's weakest sentences."),
                io.Image.Output("chart", display_name="chart", tooltip="Per-sentence bars for each image: "
                                                                      "grey = text-irrelevant, blue = relevant."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, denscore_model, images, text, omega, reference_prompts="", split_mode="sentence"):
        result = _score(denscore_model, images, text, omega, reference_prompts, split_mode)
        labels = [f"image {b}" for b in range(images.shape[0])]
        report = format_report(result, labels)
        chart = torch.from_numpy(render_segment_chart(result, labels)).float().div(255)[None]
        p = result.parts
        as_list = lambda t: [float(v) for v in t]  # noqa: E731
        ui_out = {**ui.PreviewImage(chart, cls=cls).as_dict(), "text": [report]}
        return io.NodeOutput(as_list(p.score), as_list(p.relevant), as_list(p.irrelevant), as_list(p.eta),
                             report, chart, ui=ui_out)


class LongAlignDenscoreBestOfN(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LongAlignDenscoreBestOfN",
            display_name="Denscore Best-of-N",
            category="LongAlign/score",
            description="Scores a batch of images against a long prompt and returns the best one.",
            inputs=_common_inputs() + [
                io.Combo.Input("rank_by", options=list(RANK_BY), default="score",
                               tooltip="score = the whole Denscore; text_relevant = alignment with the text "
                                       "only; reweighted = relevant + ω × irrelevant (what LongAlign trains on)."),
            ],
            outputs=[
                io.Image.Output("best_image", display_name="best_image", tooltip="The highest-ranked image."),
                io.Int.Output("best_index", display_name="best_index", tooltip="Its index in the batch (0-based)."),
                io.Float.Output("scores", display_name="scores", is_output_list=True,
                                tooltip="The ranking value of every image."),
                io.String.Output("report", display_name="report", tooltip="All scores as text."),
            ],
        )

    @classmethod
    def execute(cls, denscore_model, images, text, omega, reference_prompts="", split_mode="sentence",
                rank_by="score"):
        result = _score(denscore_model, images, text, omega, reference_prompts, split_mode)
        values = {"score": result.parts.score, "text_relevant": result.parts.relevant,
                  "reweighted": result.parts.reweighted}[rank_by]
        best = int(values.argmax())
        labels = [f"image {b}" for b in range(images.shape[0])]
        report = f"best: image {best} by {rank_by}\n" + format_report(result, labels)
        return io.NodeOutput(images[best:best + 1], best, [float(v) for v in values], report)


NODES = [LongAlignPreferenceModelLoader, LongAlignDenscoreScore, LongAlignDenscoreBestOfN]
