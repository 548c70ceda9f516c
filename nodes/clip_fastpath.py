"""Trimmed forward: run the host CLIP's own modules over only the positions the segments need.

ComfyUI's CLIP object always encodes 77 positions per chunk, so one chunk per 15-token sentence spends most of
its work on padding. CLIP is causal: the states at a segment's start and content positions do not depend on
anything after them. So each segment needs only its own positions, and segments of different lengths can share
one row (sequence packing, :func:`longalign_core.segment_encoding.pack_segments`): each segment's positions
count from 0 and an attention mask lets each position see only the earlier positions of its own segment, which
is the causal mask the host applies to a lone chunk. A 14-sentence prompt then costs about as many positions as
its tokens, like the host's 77-token chunking, instead of 14 × 77.

This module does exactly what ComfyUI's ``SDClipModel.forward`` does, minus the trailing padding, with the
host's own objects: the host tokenizer's chunks, ``SDClipModel.process_tokens`` (token and textual-inversion
embeddings), the text model's position embedding, encoder layers (LoRA patches applied by ``clip.load_model``)
and final layer norm, the clip-skip layer chosen by ``set_clip_options``, and ComfyUI's prompt-weight rule
``(z - z_empty) * w + z_empty``. :class:`TrimmedClipForward` refuses (returns a reason) whenever the host's
model is not one it understands. The caller (``clip_segments``) checks it against the host's own full encode
once per model state (model, patches, clip skip, device, dtype): the empty prompt packed behind real segments,
and a row with prompt weights and a row with embeddings when a prompt uses them; on a mismatch it falls back to
the host path for that model state.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..longalign_core.segment_encoding import PackedRows, pack_segments

#: What the host's internals raise when they are not what the trimmed forward expects (missing attribute, other
#: signature, shape mismatch). Anything else (ComfyUI's interrupt, KeyboardInterrupt) propagates.
STRUCTURAL_ERRORS = (AttributeError, TypeError, KeyError, IndexError, ValueError, NotImplementedError, RuntimeError)

#: The trimmed forward computes what the host computes, on fewer positions: only float rounding may differ.
CHECK_ATOL = 1e-4  # times the largest magnitude of the host's states (at least 1)
CHECK_RTOL = 1e-4

STREAM_ORDER = ("l", "h", "g")  # channel order of the host's concatenation (SDXL: cat(l, g))


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
    def encode(self, chunk_list: list[dict[str, list]], widths: Sequence[int], empty_states: torch.Tensor,
               want_pooled: bool):
        """``(n, W, C)`` states for n chunks (W = the widest of ``widths``, C = all streams; chunk i's states in
        its first ``widths[i]`` positions, zeros after), and the pooled output of chunk 0 if asked (then
        ``widths[0]`` must reach its end token).

        ``empty_states``: ``(77, C)`` the host's own encode of the empty prompt, for prompt weights.
        """
        self._prepare()
        try:
            layout = pack_segments(widths)
            outs, pooled, offset = [], None, 0
            for k in self.keys:
                z, p = self._stream(self.models[k], [c[k] for c in chunk_list], layout, want_pooled)
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
    def _stream(m, chunks: list[list], layout: PackedRows, want_pooled: bool):
        """One text encoder over the packed rows of ``layout`` → ``(n, W, C)`` per-chunk states and pooled."""
        device = m.execution_device
        if device is None:
            device = m.transformer.get_input_embeddings().weight.device
        token_rows = [[entry[0] for entry in chunk] for chunk in chunks]  # what encode_token_weights passes
        embeds, _, num_tokens, embeds_info = m.process_tokens(token_rows, device)
        if any(info.get("type") != "embedding" for info in embeds_info):
            raise NotImplementedError("non-embedding inputs in the token stream")
        if want_pooled and num_tokens[0] > layout.widths[0]:
            raise ValueError(f"chunk 0 is packed with {layout.widths[0]} positions, its end token is at {num_tokens[0] - 1}")
        text_model = m.transformer.text_model
        x = embeds.new_zeros(layout.rows, layout.width, embeds.shape[-1])
        for i, ((row, offset), w) in enumerate(zip(layout.placement, layout.widths)):
            x[row, offset:offset + w] = embeds[i, :w]
        position = text_model.embeddings.position_embedding.weight.to(device=x.device, dtype=x.dtype)
        x = x + position[layout.positions().to(x.device)]
        mask = layout.attention_mask(x.dtype, x.device)
        intermediate = m.layer_idx if m.layer == "hidden" else None
        x, hidden = text_model.encoder(x, mask=mask, intermediate_output=intermediate)
        x = text_model.final_layer_norm(x)
        if hidden is not None and m.layer_norm_hidden_state:
            hidden = text_model.final_layer_norm(hidden)
        packed = (x if m.layer == "last" else hidden).float()
        z = packed.new_zeros(len(chunks), max(layout.widths), packed.shape[-1])
        for i, ((row, offset), w) in enumerate(zip(layout.placement, layout.widths)):
            z[i, :w] = packed[row, offset:offset + w]
        pooled = None
        if want_pooled:
            row, offset = layout.placement[0]
            p = x[row:row + 1, offset + num_tokens[0] - 1]
            if m.return_projected_pooled and hasattr(m.transformer, "text_projection"):
                p = m.transformer.text_projection(p)
            pooled = p.float()
        return z, pooled

    @staticmethod
    def _apply_weights(z: torch.Tensor, chunks: list[list], empty: torch.Tensor) -> torch.Tensor:
        """ComfyUI's prompt-weight rule, position-wise against the empty prompt."""
        empty = empty.to(z.device, z.dtype)
        for row, chunk in enumerate(chunks):
            values = [float(e[1]) for e in chunk[: z.shape[1]]]
            if all(v == 1.0 for v in values):
                continue
            weights = torch.tensor(values, dtype=z.dtype, device=z.device)
            w = weights.unsqueeze(-1)
            e = empty[: z.shape[1]]
            z[row] = torch.where(w != 1.0, (z[row] - e) * w + e, z[row])
        return z
