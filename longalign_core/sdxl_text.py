"""Segment-level encoding for SDXL's two text encoders with transformers (docs/method.md §1, SDXL form).

SDXL conditions its UNet on ``cat(CLIP-L hidden, OpenCLIP-bigG hidden)`` (768 + 1280 = 2048 channels), both taken
from the penultimate layer without the final layer norm (diffusers' ``StableDiffusionXLPipeline.encode_prompt``
and ComfyUI's SDXL CLIP do the same), plus one pooled, projected bigG vector. Segment-level encoding applies to
each encoder on its own — the same segments, the same kept positions, each encoder's own ``<pad*>`` — and the
two merges are concatenated on the channel axis. The pooled vector is bigG's for the **first segment** (ComfyUI
pools the first 77-token chunk of a long prompt; the LongAlign Text Encode node does the same), so a prompt that
fits one segment gets exactly SDXL's usual pooled vector.

Token ids: both encoders read the same ids, the CLIP BPE ids of the text from the first ``tokenizer``; only the
padding is each encoder's own (49407 for CLIP-L, 0 for bigG, from ``tokenizer_2``). That is ComfyUI's SDXL CLIP
(``comfy/sdxl_clip.py``: the bigG tokenizer is the CLIP-L vocabulary padded with 0), which the LongAlign nodes
must match, and how SDXL was trained (Stability's ``sgm`` tokenizes bigG with ``open_clip.tokenize``).
diffusers' ``tokenizer_2`` declares ``"!"`` (id 0) its pad token and so turns every ``!`` into id 0 (``!!``
becomes two tokens instead of one): for prompts with ``!`` the bigG half here differs from
``StableDiffusionXLPipeline.encode_prompt``'s; the CLIP-L half does not. Padding is dropped by position, never by
id, because id 0 is also the real token ``!`` (``fox!_``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .clip_text import check_clip_skip
from .errors import BadModelFileError
from .segment_encoding import (
    DEFAULT_TOKEN_BUDGET,
    PAD_EMBEDDING_POSITIONS,
    OverflowPolicy,
    PromptReport,
    merge_segment_states,
    padding_embedding,
    plan_batch,
)
from .segmentation import LongSegmentPolicy, SplitMode


@dataclass
class SDXLPromptEncoding:
    """``cond`` ``(B, L, 2048)``, ``pooled`` ``(B, 1280)`` (bigG, first segment) and a report per prompt."""

    cond: torch.Tensor
    pooled: torch.Tensor
    reports: list[PromptReport]


class _HiddenLayerCLIP:
    """One CLIP text encoder read at hidden layer ``-(clip_skip + 2)`` without the final norm (SDXL's rule)."""

    def __init__(self, tokenizer, text_encoder, clip_skip: int):
        layers = text_encoder.config.num_hidden_layers
        check_clip_skip(clip_skip, layers - 2, layers)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.layer = -(clip_skip + 2)
        self.max_length = min(int(tokenizer.model_max_length), text_encoder.config.max_position_embeddings)
        pad = tokenizer.pad_token_id
        self.pad_id = tokenizer.eos_token_id if pad is None else pad

    def forward(self, ids: torch.Tensor):
        return self.text_encoder(ids.to(self.text_encoder.device), output_hidden_states=True)

    def padding_embedding(self) -> torch.Tensor:
        """``<pad*>`` from this encoder's own empty prompt, padded with its own pad id (0 for bigG)."""
        tok = self.tokenizer([""], max_length=self.max_length, padding="max_length", return_tensors="pt")
        states = self.forward(tok.input_ids).hidden_states[self.layer]
        return padding_embedding(states[0], PAD_EMBEDDING_POSITIONS)


class SDXLSegmentEncoder:
    """Encode long prompts for SDXL: ``tokenizer``/``text_encoder`` = CLIP-L (``CLIPTextModel``),
    ``tokenizer_2``/``text_encoder_2`` = OpenCLIP-bigG (``CLIPTextModelWithProjection``), as in a diffusers
    SDXL folder. ``clip_skip`` follows diffusers: 0 = penultimate layer, k = k more layers back.
    """

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, clip_skip: int = 0):
        if not hasattr(text_encoder_2, "text_projection"):
            raise BadModelFileError(f"text_encoder_2 must be a CLIPTextModelWithProjection (SDXL's OpenCLIP-bigG), got "
                             f"{type(text_encoder_2).__name__}")
        self.encoders = (_HiddenLayerCLIP(tokenizer, text_encoder, clip_skip),
                         _HiddenLayerCLIP(tokenizer_2, text_encoder_2, clip_skip))
        self.window = min(e.max_length for e in self.encoders) - 2
        self._pads: tuple[torch.Tensor, torch.Tensor] | None = None

    def count_tokens(self, text: str) -> int:
        """Content tokens (no start/end); both SDXL tokenizers share CLIP's BPE, so one count serves both."""
        tok = self.encoders[0].tokenizer
        return len(tok(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])

    def padding_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pads is None:
            with torch.no_grad():
                self._pads = tuple(e.padding_embedding() for e in self.encoders)
        return self._pads

    @torch.no_grad()
    def encode(
        self,
        prompts: str | Sequence[str],
        budget: int = DEFAULT_TOKEN_BUDGET,
        overflow: OverflowPolicy = "extend",
        split_mode: SplitMode = "sentence",
        long_segments: LongSegmentPolicy = "split",
    ) -> SDXLPromptEncoding:
        """Segment-level SDXL conditioning for a batch of prompts (one forward per encoder for all segments).

        Rows are ``[start] + content + [end]`` padded to the longest row with each tokenizer's pad id; the end
        token is fed so bigG's pooled vector can be read at it; only start + content positions are kept.
        """
        batch = plan_batch(prompts, self.count_tokens, self.window, split_mode, long_segments)
        texts, owner, num_prompts = batch.texts, batch.owner, len(batch.plans)
        first_row = [owner.index(b) for b in range(num_prompts)]

        tokenizer = self.encoders[0].tokenizer
        content = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        rows = [[tokenizer.bos_token_id] + ids[: self.window] + [tokenizer.eos_token_id] for ids in content]
        width = max(len(r) for r in rows)
        # start + content, by position (bigG's pad id 0 is also the token "!"); the end token is dropped
        kept = torch.tensor([len(r) - 1 for r in rows])
        keep = torch.arange(width).unsqueeze(0) < kept.unsqueeze(1)

        merged, pooled = [], None
        for encoder, pad in zip(self.encoders, self.padding_embeddings()):
            ids = torch.tensor([r + [encoder.pad_id] * (width - len(r)) for r in rows])
            out = encoder.forward(ids)
            merged.append(merge_segment_states(out.hidden_states[encoder.layer], keep, owner, pad, budget,
                                               overflow, num_prompts=num_prompts))
            if encoder is self.encoders[1]:
                end = (kept[first_row]).to(out.last_hidden_state.device)
                final = out.last_hidden_state[first_row, :][torch.arange(len(first_row)), end]
                pooled = encoder.text_encoder.text_projection(final)
        result = merged[0]
        cond = torch.cat([merged[0].cond, merged[1].cond.to(merged[0].cond.device)], dim=-1)
        reports = batch.reports(result, budget, overflow, self.window)
        return SDXLPromptEncoding(cond, pooled, reports)


__all__ = ["SDXLSegmentEncoder", "SDXLPromptEncoding"]
