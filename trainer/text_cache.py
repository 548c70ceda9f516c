"""``--cache-text-embeddings``: every prompt of the run (training prompts or captions, the held-out validation
prompts, the empty prompt) encoded once at set-up, so that the CLIP text encoders leave memory before the
preference model loads: 1.5 GiB of bf16 weights on SDXL (CLIP-L + OpenCLIP-bigG), 0.23 GiB on SD1.5. The
diffusers SDXL training scripts and kohya's ``--cache_text_encoder_outputs`` do the same for the same reason.

Each prompt keeps its own row: the segment-level conditioning at its own length (the budget, or with
``--overflow extend`` its multiple of the budget), SDXL's pooled bigG vector, and what overflow cost it. A step's
rows are padded to the step's longest with the encoders' padding embedding, exactly as a batch encode pads them.
The rows stay on the CPU (GPU memory is what is short) and move to the device per step. The preference model's
text tower goes the same way (:func:`pin_reward_texts`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from longalign_core.segment_encoding import output_length

#: Prompts per encoder forward while the cache is built.
BUILD_CHUNK = 16


@dataclass
class CachedRow:
    cond: torch.Tensor  # (L_p, C): the prompt's conditioning at its own length
    pooled: torch.Tensor | None  # (1280,) on SDXL
    cut: bool  # a token of the prompt did not reach the conditioning
    lost: int  # tokens dropped by the budget + cut from over-long segments


def check_cache_fits(nbytes: float, count: int, share: float = 0.5) -> None:
    """Refuse (one paragraph) a cache estimated at ``nbytes`` for ``count`` texts that would take more than
    ``share`` of the CPU memory available now."""
    import psutil

    from longalign_core.errors import BadConfigError

    available = psutil.virtual_memory().available
    if nbytes > share * available:
        raise BadConfigError(
            f"--cache-text-embeddings: the embeddings of the run's {count} distinct prompts need about "
            f"{nbytes / 2**30:.1f} GiB of CPU memory and {available / 2**30:.1f} GiB is available: drop "
            f"--cache-text-embeddings (the text encoders then stay loaded), or train on fewer prompts")


class TextEmbeddingCache:
    """The run's prompts -> :class:`CachedRow`, and the padding embedding ``pad`` ``(C,)`` that fills a shorter
    row up to a step's common length."""

    def __init__(self, rows: dict[str, CachedRow], pad: torch.Tensor):
        self.rows, self.pad = rows, pad

    @classmethod
    def build(cls, encode_rows, encoder, prompts: Iterable[str], budget: int, overflow: str,
              progress: bool = True) -> "TextEmbeddingCache":
        """Encode every distinct prompt of ``prompts`` (and the empty prompt) with ``encode_rows`` (texts ->
        ``cond``, ``pooled``, reports; :meth:`trainer.conditioning.StepEncoder.encode_rows`), ``BUILD_CHUNK`` at
        a time; ``encoder`` gives the padding embedding."""
        from tqdm.auto import tqdm

        texts = list(dict.fromkeys([""] + list(prompts)))
        rows: dict[str, CachedRow] = {}
        checked = False
        for start in tqdm(range(0, len(texts), BUILD_CHUNK), desc="caching text embeddings", unit="chunk",
                          disable=not progress, leave=False):
            chunk = texts[start:start + BUILD_CHUNK]
            cond, pooled, reports = encode_rows(chunk)
            for b, (text, report) in enumerate(zip(chunk, reports)):
                length = output_length(report.merged, budget, overflow)
                rows[text] = CachedRow(cond[b, :length].cpu().clone(),
                                       None if pooled is None else pooled[b].cpu().clone(),
                                       cut=not report.lossless, lost=report.dropped + report.truncated)
            if not checked:  # from the first chunk's rows: refuse a cache that cannot fit before building it
                check_cache_fits(sum(rows[t].cond.nbytes for t in chunk) / len(chunk) * len(texts), len(texts))
                checked = True
        pads = encoder.padding_embeddings() if hasattr(encoder, "padding_embeddings") else \
            (encoder.padding_embedding(),)
        pad = torch.cat([p.to(cond.device, cond.dtype) for p in pads], dim=-1).cpu()
        return cls(rows, pad)

    def lookup(self, texts: list[str], device: torch.device):
        """``cond`` ``(B, L, C)`` padded to the longest row, ``pooled`` ``(B, 1280)`` or None, and the rows (for
        their overflow counts)."""
        missing = [t for t in texts if t not in self.rows]
        if missing:  # every text the run encodes is cached at set-up: a miss is a bug, never a silent encode
            raise KeyError(f"{len(missing)} prompt(s) are not in the text embedding cache, e.g. {missing[0][:80]!r}")
        rows = [self.rows[t] for t in texts]
        length = max(r.cond.shape[0] for r in rows)
        cond = self.pad.expand(len(rows), length, -1).clone()
        for b, r in enumerate(rows):
            cond[b, :r.cond.shape[0]] = r.cond
        pooled = None if rows[0].pooled is None else torch.stack([r.pooled for r in rows]).to(device)
        return cond.to(device), pooled, rows

    @property
    def nbytes(self) -> int:
        return sum(r.cond.nbytes + (0 if r.pooled is None else r.pooled.nbytes) for r in self.rows.values())

    def __len__(self) -> int:
        return len(self.rows)


def cache_text_embeddings(text, base, data, main: bool) -> None:
    """``--cache-text-embeddings`` at set-up, before the preference model loads: every text a step will encode
    (``data``'s training prompts or captions, its validation prompts, the empty prompt) into ``text``'s cache
    (:class:`~trainer.conditioning.StepEncoder`), then ``base``'s CLIP text encoders out of memory."""
    import gc

    text.cache_prompts(data.training_texts() + list(data.validation_prompts))
    base.text_encoder = base.text_encoder_2 = None
    gc.collect()
    if main:
        print(f"text embeddings cached: {len(text.cache)} prompts, {text.cache.nbytes / 2**20:.1f} MiB on the CPU; "
              f"the text encoders are freed", flush=True)


def pin_reward_texts(judge, texts: list[str], cfg, main: bool) -> None:
    """``--cache-text-embeddings`` once V is built: the segment features of every text the preference model
    ``judge`` will score against (the reward stage's prompts, the validation prompts) computed once and pinned,
    segmented as ``cfg`` says, then its text tower out of memory (0.66 GiB of bf16 weights on a CLIP-H/14-sized
    model such as Denscore)."""
    import gc

    from longalign_core.denscore import pin_prompt_features

    held = pin_prompt_features(judge, texts, cfg.split_mode, cfg.long_segments)
    freed = judge.drop_text_tower()
    gc.collect()
    if main:
        print(f"preference text features cached: {len(set(texts))} prompts, {held / 2**20:.1f} MiB; its text "
              f"tower ({freed / 2**30:.2f} GiB) is freed", flush=True)
