"""ComfyUI node "LongAlign Text Encode": segment-level long-prompt conditioning through the host's CLIP."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..longalign_core.segment_encoding import DEFAULT_TOKEN_BUDGET, OVERFLOW_POLICIES
from ..longalign_core.segmentation import LONG_SEGMENT_POLICIES, SPLIT_MODES
from ..longalign_core.t5_branch import combine_conditioning
from . import host
from .clip_segments import HostClipSegments, SegmentCache

log = logging.getLogger("LongAlign")

#: One cache for the whole ComfyUI process, per CLIP model (held weakly) and patch state.
SEGMENT_CACHE = SegmentCache()


class LongAlignTextEncode(io.ComfyNode):
    """Encode a long prompt sentence by sentence (LongAlign, ICLR 2025) into a CONDITIONING longer than 77
    tokens, with no silent loss of text. Outputs: conditioning, report (text), segments and tokens (counts)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LongAlignTextEncode",
            display_name="LongAlign Text Encode",
            category="LongAlign/conditioning",
            description="Splits the prompt into sentences, encodes each with the CLIP on its own (no 77-token "
                        "limit), keeps every sentence's start and content tokens and pads to the token budget "
                        "with the padding embedding. clip-skip, CLIP LoRAs, embeddings and (word:1.2) weights "
                        "work as in CLIP Text Encode.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP from a checkpoint loader (SD1.x, SD2.x or SDXL). "
                                              "CLIP Set Last Layer and CLIP LoRAs applied before this node are "
                                              "honoured."),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                tooltip="The prompt, as long as you like. Sentences end at . ! ? ; or a line "
                                        "break; the word BREAK starts a new segment (split_mode sentence). "
                                        "Weights like (red:1.2) and embedding:name work."),
                io.Int.Input("token_budget", default=DEFAULT_TOKEN_BUDGET, min=1, max=4096, step=1,
                             tooltip="Length of the conditioning in tokens. 240 is what LongSD was trained "
                                     "with. Use the same budget for positive and negative so they batch "
                                     "together."),
                io.Combo.Input("overflow", options=list(OVERFLOW_POLICIES), default="extend",
                               tooltip="When the sentences need more tokens than the budget: extend = grow "
                                       "to the next multiple of the budget (nothing lost); truncate = cut at "
                                       "the budget like the reference code (reported); error = stop."),
                io.Combo.Input("split_mode", options=list(SPLIT_MODES), default="sentence",
                               tooltip="sentence = real sentence boundaries (not inside 3.5, Mr., or "
                                       "parentheses) and BREAK; reference = the released LongAlign code's "
                                       "split at every . and ? (BREAK stays text)"),
                io.Combo.Input("long_sentences", options=list(LONG_SEGMENT_POLICIES), default="split",
                               tooltip="A sentence over 75 tokens: split = cut it at commas, then words "
                                       "(nothing lost); truncate = keep its first 75 tokens like the "
                                       "reference (reported).", extra_dict={"advanced": True}),
                io.Custom("LONGALIGN_T5").Input(
                    "longalign_t5", optional=True,
                    tooltip="Optional LongSD T5 branch (Load LongAlign T5 Adapter): its 240 tokens are appended "
                            "after the CLIP segments. Connect it to the negative prompt's node too."),
            ],
            outputs=[
                io.Conditioning.Output(tooltip="Segment-level conditioning, token_budget tokens long (or a "
                                               "multiple of it with overflow=extend)."),
                io.String.Output(display_name="report",
                                 tooltip="Segments, tokens per segment, totals, and anything extended or cut. "
                                         "Connect to Preview as Text to read it."),
                # Appended after the original outputs, so links saved in older workflows keep their slots.
                io.Int.Output(display_name="segments",
                              tooltip="How many segments the prompt became (sentences, BREAK pieces and parts "
                                      "of over-long sentences); each is one CLIP encode."),
                io.Int.Output(display_name="tokens",
                              tooltip="Tokens the prompt needs: its text tokens plus one start token per "
                                      "segment. Compare with token_budget: more means extend/truncate acts."),
            ],
        )

    @classmethod
    def execute(cls, clip, text, token_budget, overflow, split_mode, long_sentences,
                longalign_t5=None) -> io.NodeOutput:
        if clip is None:
            raise ValueError("LongAlign Text Encode: no CLIP connected. If it comes from a checkpoint loader, "
                             "the checkpoint may contain no text encoder; load one with a CLIP loader node.")
        encoder = HostClipSegments(clip, SEGMENT_CACHE, host.check_interrupt)
        conditioning, report = encoder.encode(text, budget=token_budget, overflow=overflow,
                                              split_mode=split_mode, long_segments=long_sentences)
        for warning in report.warnings():
            log.warning("LongAlign Text Encode: %s", warning)
        text_report = report.format()
        if longalign_t5 is not None:
            t5_cond = longalign_t5.encode(text)
            conditioning = [[combine_conditioning(c, t5_cond), d] for c, d in conditioning]
            n = longalign_t5.count_tokens(text)
            text_report += (f"\nT5 branch: +{t5_cond.shape[1]} tokens ({n} T5 tokens"
                            + (f"; {n - t5_cond.shape[1]} cut at {t5_cond.shape[1]}, as in LongSD" if n > t5_cond.shape[1]
                               else "") + ")")
        return io.NodeOutput(conditioning, text_report, len(report.segments), report.merged)
