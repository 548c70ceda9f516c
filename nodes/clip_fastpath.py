"""Trimmed forward: run the host CLIP's own modules over only the positions a segment needs.

ComfyUI's CLIP object always encodes 77 positions per chunk, so one chunk per 15-token sentence spends most of
its work on padding. CLIP is causal: the states at a segment's start and content positions do not depend on
anything after them, so running the same modules over the first T positions of every chunk (T = longest
segment + its end token) gives the same states at a fraction of the cost.

This module does exactly what ComfyUI's ``SDClipModel.forward`` does, minus the trailing padding, with the
host's own objects: the host tokenizer's chunks, ``SDClipModel.process_tokens`` (token and textual-inversion
embeddings), the text model's position embedding, encoder layers (LoRA patches applied by ``clip.load_model``)
and final layer norm, the clip-skip layer chosen by ``set_clip_options``, and ComfyUI's prompt-weight rule
``(z - z_empty) * w + z_empty``. :class:`TrimmedClipForward` refuses (returns a reason) whenever the host's
model is not one it understands. The caller (``clip_segments``) checks it against the host's own full encode:
the empty prompt on every call, and, once per model and patch state, a row with prompt weights and a row with
embeddings when a prompt uses them; on a mismatch it falls back to the host path for that model state.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch

from ..longalign_core.clip_vocab import END_ID

#: What the host's internals raise when they are not what the trimmed forward expects (missing attribute, other
#: signature, shape mismatch). Anything else (ComfyUI's interrupt, KeyboardInterrupt) propagates.
STRUCTURAL_ERRORS = (AttributeError, TypeError, KeyError, IndexError, ValueError, NotImplementedError, RuntimeError)

#: The trimmed forward computes what the host computes, on fewer positions: only float rounding may differ.
CHECK_ATOL = 1e-4  # times the largest magnitude of the host's states (at least 1)
CHECK_RTOL = 1e-4

STREAM_ORDER = ("l", "h", "g")  # channel order of the host's concatenation (SDXL: cat(l, g))


def is_out_of_memory(exc: BaseException) -> bool:
    """A transient out-of-memory error (CUDA, MPS, XPU or CPU allocator), not a sign the model is unsupported."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def states_match(trimmed: torch.Tensor, host: torch.Tensor) -> bool:
    """The trimmed forward's states equal the host's up to float rounding."""
    host = host.to(trimmed.device, trimmed.dtype)
    scale = float(host.abs().amax().clamp_min(1.0))
    return torch.allclose(trimmed, host, atol=CHECK_ATOL * scale, rtol=CHECK_RTOL)


def _stream_model(cond_stage_model, key: str):
    return getattr(cond_stage_model, f"clip_{key}", None)


class TrimmedClipForward:
    """Encode chunks through the host's CLIP modules over their first T positions."""

    def __init__(self, clip, keys: Sequence[str]):
        self.clip = clip
        self.keys = [k for k in STREAM_ORDER if k in keys]
        self.models = {k: _stream_model(clip.cond_stage_model, k) for k in self.keys}

    def unsupported_reason(self) -> str | None:
        """Why the trimmed forward cannot be used on this CLIP, or None."""
        if len(self.keys) != len(set(self.keys)) or not self.keys:
            return "unknown token streams"
        for k, m in self.models.items():
            if m is None:
                return f"no clip_{k} module on the text encoder"
            text_model = getattr(getattr(m, "transformer", None), "text_model", None)
            needed = (hasattr(m, "process_tokens") and text_model is not None
                      and hasattr(text_model, "embeddings") and hasattr(text_model, "encoder")
                      and hasattr(text_model, "final_layer_norm"))
            if not needed:
                return f"clip_{k} is not ComfyUI's CLIP text model"
            if getattr(m, "enable_attention_masks", False) or getattr(m, "zero_out_masked", False):
                return f"clip_{k} uses attention masks"
            if m.layer not in ("last", "hidden"):
                return f"clip_{k} returns layer {m.layer!r}"
        return None

    def _prepare(self) -> None:
        """What ``CLIP.encode_from_tokens`` does before encoding: clip-skip, load (applies patches), device."""
        cs = self.clip.cond_stage_model
        cs.reset_clip_options()
        if self.clip.layer_idx is not None:
            cs.set_clip_options({"layer": self.clip.layer_idx})
        self.clip.load_model()
        cs.set_clip_options({"execution_device": self.clip.patcher.load_device})

    @torch.no_grad()
    def encode(self, chunk_list: list[dict[str, list]], empty_states: torch.Tensor, want_pooled: bool):
        """``(n, T, C)`` states for n chunks (C = all streams), and the pooled output of chunk 0 if asked.

        ``empty_states``: ``(77, C)`` the host's own encode of the empty prompt, for prompt weights.
        """
        self._prepare()
        try:
            firsts = []
            for c in chunk_list:
                ids = [e[0] for e in c[self.keys[0]]]
                firsts.append(next((i for i, t in enumerate(ids)
                                    if isinstance(t, numbers.Integral) and int(t) == END_ID), len(ids) - 1))
            width = min(max(firsts) + 1, len(chunk_list[0][self.keys[0]]))  # keep the end token: pooled
            outs, pooled, offset = [], None, 0
            for k in self.keys:
                z, p = self._stream(self.models[k], [c[k] for c in chunk_list], width, want_pooled)
                channels = z.shape[-1]
                z = self._apply_weights(z, [c[k] for c in chunk_list], empty_states[:, offset:offset + channels])
                offset += channels
                outs.append(z)
                if p is not None:
                    pooled = p  # SDXL: the last stream (g) provides the pooled output, as in the host
            return torch.cat(outs, dim=-1), pooled
        finally:
            self.clip.cond_stage_model.reset_clip_options()

    @staticmethod
    def _stream(m, chunks: list[list], width: int, want_pooled: bool):
        device = m.execution_device
        if device is None:
            device = m.transformer.get_input_embeddings().weight.device
        token_rows = [[entry[0] for entry in chunk] for chunk in chunks]  # what encode_token_weights passes
        embeds, _, num_tokens, embeds_info = m.process_tokens(token_rows, device)
        if any(info.get("type") != "embedding" for info in embeds_info):
            raise NotImplementedError("non-embedding inputs in the token stream")
        text_model = m.transformer.text_model
        position = text_model.embeddings.position_embedding.weight[:width]
        x = embeds[:, :width] + position.to(device=embeds.device, dtype=embeds.dtype)
        mask = torch.full((width, width), -torch.finfo(x.dtype).max, dtype=x.dtype, device=x.device).triu_(1)
        intermediate = m.layer_idx if m.layer == "hidden" else None
        x, hidden = text_model.encoder(x, mask=mask, intermediate_output=intermediate)
        x = text_model.final_layer_norm(x)
        if hidden is not None and m.layer_norm_hidden_state:
            hidden = text_model.final_layer_norm(hidden)
        z = (x if m.layer == "last" else hidden).float()
        pooled = None
        if want_pooled:
            p = x[0:1, num_tokens[0] - 1]
            if m.return_projected_pooled and hasattr(m.transformer, "text_projection"):
                p = m.transformer.text_projection(p)
            pooled = p.float()
        return z, pooled

    @staticmethod
    def _apply_weights(z: torch.Tensor, chunks: list[list], empty: torch.Tensor) -> torch.Tensor:
        """ComfyUI's prompt-weight rule, position-wise against the empty prompt."""
        empty = empty.to(z.device, z.dtype)
        for row, chunk in enumerate(chunks):
            weights = torch.tensor([float(e[1]) for e in chunk[: z.shape[1]]], dtype=z.dtype, device=z.device)
            if torch.all(weights == 1.0):
                continue
            w = weights.unsqueeze(-1)
            e = empty[: z.shape[1]]
            z[row] = torch.where(w != 1.0, (z[row] - e) * w + e, z[row])
        return z
