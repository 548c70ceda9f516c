"""LongAlign core: segment-level long-prompt encoding and the maths of the method. No ComfyUI imports.

Public API (see the README's "Python API" section):

* :func:`split_segments`, :class:`Segment` — sentence segments with character spans (docs/method.md §1.1).
* :func:`plan_segments` — segments that fit the encoder window (long sentences sub-split).
* :func:`merge_segment_states`, :func:`padding_embedding` — the host-independent merge (docs/method.md §1.3–1.5).
* :class:`CLIPSegmentEncoder` — the whole job with transformers' CLIP (``encode(prompts) -> cond, reports``).
* :class:`SDXLSegmentEncoder` — the same for SDXL's two text encoders (+ pooled bigG of the first segment).
* :class:`PromptReport` — what happened to a prompt, for people.
* :mod:`longalign_core.diffusers_entry` — ``long_prompt_kwargs(pipe, prompt, negative)`` and LoRA loading for
  diffusers pipelines.
"""

from .clip_text import CLIPSegmentEncoder, LongPromptEncoding
from .sdxl_text import SDXLPromptEncoding, SDXLSegmentEncoder
from .segment_encoding import (
    CLIP_WINDOW,
    DEFAULT_TOKEN_BUDGET,
    OVERFLOW_POLICIES,
    PAD_EMBEDDING_POSITIONS,
    MergeResult,
    PromptReport,
    SegmentInfo,
    keep_mask_before_end,
    merge_segment_states,
    output_length,
    padding_embedding,
    plan_segments,
)
from .segmentation import LONG_SEGMENT_POLICIES, SPLIT_MODES, Segment, fit_segments, split_segments

__version__ = "0.1.0"

__all__ = [
    "CLIPSegmentEncoder", "LongPromptEncoding", "SDXLSegmentEncoder", "SDXLPromptEncoding", "CLIP_WINDOW", "DEFAULT_TOKEN_BUDGET", "OVERFLOW_POLICIES",
    "PAD_EMBEDDING_POSITIONS", "MergeResult", "PromptReport", "SegmentInfo", "keep_mask_before_end",
    "merge_segment_states", "output_length", "padding_embedding", "plan_segments", "LONG_SEGMENT_POLICIES",
    "SPLIT_MODES", "Segment", "fit_segments", "split_segments",
]
