"""Segment-level encoding with transformers' ``CLIPTokenizer`` + ``CLIPTextModel`` (trainer, tools, CLI).

Faithful to the released code (``tools.caption2embed``): segments padded only to the longest segment of the
batch, no attention mask (CLIP's causal mask makes kept positions independent of what follows), final hidden
state after the final layer norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .segment_encoding import (
    CLIP_WINDOW,
    DEFAULT_TOKEN_BUDGET,
    PAD_EMBEDDING_POSITIONS,
    OverflowPolicy,
    PromptReport,
    merge_segment_states,
    padding_embedding,
    plan_batch,
)
from .errors import BadConfigError
from .segmentation import LongSegmentPolicy, SplitMode


@dataclass
class LongPromptEncoding:
    """``cond``: ``(B, L, C)`` merged conditioning; ``reports``: one :class:`PromptReport` per prompt."""

    cond: torch.Tensor
    reports: list[PromptReport]


def check_clip_skip(clip_skip: int, deepest: int, layers: int) -> int:
    """``clip_skip`` if it is in ``0..deepest`` (the deepest skip that still reads the output of a layer of this
    ``layers``-layer text encoder, under the caller's convention), else :class:`BadConfigError` naming the value,
    the range and the encoder's depth. One check for the SD1.x (:class:`CLIPSegmentEncoder`) and SDXL
    (:mod:`longalign_core.sdxl_text`) readouts."""
    if not 0 <= clip_skip <= deepest:
        raise BadConfigError(f"clip_skip must be in 0..{deepest} for this {layers}-layer text encoder, got "
                             f"{clip_skip}")
    return clip_skip


class CLIPSegmentEncoder:
    """Encode long prompts segment by segment with a transformers CLIP text encoder.

    ``clip_skip``: 0 uses the final hidden state (SD1.5 and the reference); k > 0 uses the output of the k-th
    layer from the end, passed through the final layer norm (diffusers' ``clip_skip`` convention).
    ``batch_size``: rows per forward; ``None`` encodes all segments of all prompts in one forward.
    """

    def __init__(self, tokenizer, text_encoder, clip_skip: int = 0, batch_size: int | None = None):
        layers = text_encoder.config.num_hidden_layers
        check_clip_skip(clip_skip, layers - 1, layers)
        if batch_size is not None and batch_size < 1:
            raise BadConfigError(f"batch_size must be >= 1 (or None for one forward), got {batch_size}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.clip_skip = clip_skip
        self.batch_size = batch_size
        self.max_length = min(int(tokenizer.model_max_length), text_encoder.config.max_position_embeddings)
        self.window = self.max_length - 2
        self._pad: torch.Tensor | None = None

    # -- the three things segment-level encoding needs from an encoder ------------------------------------------
    def count_tokens(self, text: str) -> int:
        """Content tokens (no start/end) the tokenizer makes of ``text``."""
        return len(self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])

    @torch.no_grad()
    def encode_segments(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, T, C)`` states and ``(N, T)`` keep mask for N segment texts in one forward.

        Rows are ``[start] + content`` (at most ``window`` content tokens), padded to the longest row only. The
        end token is not fed: CLIP is causal, so the kept states are the same as with ``[start] + content +
        [end] + pad`` up to 77 (tested), and the forward is one position shorter per row.
        """
        tok = self.tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)
        rows = [[self.tokenizer.bos_token_id] + ids[: self.window] for ids in tok["input_ids"]]
        width = max(len(r) for r in rows)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=self.text_encoder.device)
        lengths = torch.tensor([len(r) for r in rows], device=ids.device)
        keep = torch.arange(width, device=ids.device).unsqueeze(0) < lengths.unsqueeze(1)
        step = self.batch_size or len(texts)
        states = torch.cat([self._forward(ids[i:i + step]) for i in range(0, len(texts), step)])
        return states, keep

    def padding_embedding(self) -> torch.Tensor:
        """``<pad*>`` (docs/method.md §1.4), computed once per encoder."""
        if self._pad is None:
            tok = self.tokenizer([""], max_length=self.max_length, padding="max_length", return_tensors="pt")
            with torch.no_grad():
                states = self._forward(tok.input_ids.to(self.text_encoder.device))
            self._pad = padding_embedding(states[0], PAD_EMBEDDING_POSITIONS)
        return self._pad

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.clip_skip == 0:
            return self.text_encoder(ids).last_hidden_state
        out = self.text_encoder(ids, output_hidden_states=True)
        hidden = out.hidden_states[-(self.clip_skip + 1)]
        # transformers 4.x nests the modules under .text_model; 5.x has them on the model itself.
        text_model = getattr(self.text_encoder, "text_model", self.text_encoder)
        return text_model.final_layer_norm(hidden)

    # -- the whole job ------------------------------------------------------------------------------------------
    def encode(
        self,
        prompts: str | Sequence[str],
        budget: int = DEFAULT_TOKEN_BUDGET,
        overflow: OverflowPolicy = "extend",
        split_mode: SplitMode = "sentence",
        long_segments: LongSegmentPolicy = "split",
    ) -> LongPromptEncoding:
        """Segment-level conditioning for a batch of prompts: ``(B, L, C)`` plus a report per prompt.

        Defaults never lose a token: long sentences are sub-split and an over-long prompt extends the budget
        (to a multiple of it). ``split_mode="reference", long_segments="truncate", overflow="truncate"`` is the
        released code's behaviour.
        """
        batch = plan_batch(prompts, self.count_tokens, self.window, split_mode, long_segments)
        states, keep = self.encode_segments(batch.texts)
        result = merge_segment_states(states, keep, batch.owner, self.padding_embedding(), budget, overflow,
                                      num_prompts=len(batch.plans))
        reports = batch.reports(result, budget, overflow, self.window)
        return LongPromptEncoding(result.cond, reports)


__all__ = ["CLIPSegmentEncoder", "LongPromptEncoding", "CLIP_WINDOW"]
