"""A step's conditioning: the segment-level encoding of its prompts (docs/method.md §1; SDXL: both encoders and
the pooled bigG vector), the LongSD T5 branch when given (§2), the empty prompt's for classifier-free guidance,
and what the UNet is called with (SDXL adds the pooled vectors and the size/crop ids)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longalign_core.errors import BadInputError
from longalign_core.segment_encoding import TokenBudgetError

from .sampling import UNetConditioning, sdxl_time_ids


@dataclass
class StepConditioning:
    """The conditioning of one step: ``cond`` ``(B, L, C)`` and, for CFG, ``uncond`` of the same length, with
    what overflow did (per step: prompts cut, tokens lost by the CLIP part and the T5 part). SDXL adds the pooled
    bigG vectors ``pooled`` / ``uncond_pooled`` ``(B, 1280)``."""

    cond: torch.Tensor
    uncond: torch.Tensor | None
    prompts_cut: int
    tokens_lost: int
    t5_tokens_lost: int
    pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None

    @property
    def stats(self) -> dict:
        return {"prompts_cut": self.prompts_cut, "tokens_lost": self.tokens_lost,
                "t5_tokens_lost": self.t5_tokens_lost, "cond_length": self.cond.shape[1]}


class StepEncoder:
    """Encodes a step's prompts with the run's text options (``cfg``: token budget, overflow, split mode, long
    segments) through ``encoder`` (:class:`~longalign_core.clip_text.CLIPSegmentEncoder` or
    :class:`~longalign_core.sdxl_text.SDXLSegmentEncoder`) and the optional T5 branch, in ``dtype``."""

    def __init__(self, cfg, encoder, t5, dtype: torch.dtype, device: torch.device, is_sdxl: bool):
        self.cfg, self.encoder, self.t5, self.dtype, self.device, self.is_sdxl = cfg, encoder, t5, dtype, device, is_sdxl
        self.cache = None  # a TextEmbeddingCache once cache_prompts ran (--cache-text-embeddings)

    def encode_rows(self, texts: list[str]):
        """The CLIP part of ``texts``: ``cond`` ``(B, L, C)``, SDXL's ``pooled`` (else None) and a report per
        text (one encoder call, so every row has one common length)."""
        cfg = self.cfg
        with torch.no_grad():
            try:
                enc = self.encoder.encode(texts, budget=cfg.token_budget, overflow=cfg.overflow,
                                          split_mode=cfg.split_mode, long_segments=cfg.long_segments)
            except TokenBudgetError as err:  # the core's check, in this CLI's option names
                raise BadInputError(
                    f"a prompt needs {err.needed} tokens but --token-budget is {cfg.token_budget} and --overflow is "
                    f"error: use --overflow truncate (the release) or extend, raise --token-budget, or shorten it "
                    f"in {cfg.prompts or 'the prompts'}. The prompt: {texts[err.prompt_index][:120]!r}…") from None
        return enc.cond, (enc.pooled if self.is_sdxl else None), enc.reports

    def cache_prompts(self, prompts) -> None:
        """Encode every one of ``prompts`` (and the empty prompt) now and drop the CLIP text encoders: later
        steps read the cache (:mod:`trainer.text_cache`)."""
        from .text_cache import TextEmbeddingCache

        cfg = self.cfg
        self.cache = TextEmbeddingCache.build(self.encode_rows, self.encoder, prompts, cfg.token_budget,
                                              cfg.overflow)
        self.encoder = None

    def encode(self, prompts: list[str], with_uncond: bool = True) -> StepConditioning:
        """Segment-level conditioning of ``prompts`` (+ the T5 branch) and, with ``with_uncond``, the empty
        prompt's for CFG — encoded together, so every row has one common length: the budget (truncate, error)
        or the step's longest prompt rounded up to a multiple of the budget (extend); the T5 part is always
        ``T5_MAX_LENGTH`` tokens after it."""
        cfg, n = self.cfg, len(prompts)
        texts = list(prompts) + ([""] * n if with_uncond else [])
        if self.cache is not None:
            cond, pooled, rows = self.cache.lookup(texts, self.device)
            prompts_cut, tokens_lost = sum(r.cut for r in rows[:n]), sum(r.lost for r in rows[:n])
        else:
            cond, pooled, reports = self.encode_rows(texts)
            prompts_cut = sum(1 for r in reports[:n] if not r.lossless)
            tokens_lost = sum(r.dropped + r.truncated for r in reports[:n])
        with torch.no_grad():
            states = self.t5.t5_states(texts) if self.t5 is not None else None
        t5_lost = 0
        if states is not None:  # the adapter keeps its graph when it is being trained
            from longalign_core.t5_branch import combine_conditioning

            with torch.set_grad_enabled(cfg.train_t5_adapter and torch.is_grad_enabled()):
                cond = combine_conditioning(cond, self.t5.adapt(states))
            t5_lost = sum(max(0, self.t5.count_tokens(p) - self.t5.max_length) for p in prompts)
        cond = cond.to(self.dtype)
        pooled = pooled.to(self.dtype) if pooled is not None else None
        return StepConditioning(cond[:n], cond[n:] if with_uncond else None, prompts_cut=prompts_cut,
                                tokens_lost=tokens_lost, t5_tokens_lost=t5_lost,
                                pooled=None if pooled is None else pooled[:n],
                                uncond_pooled=None if pooled is None or not with_uncond else pooled[n:])

    def unet_conditioning(self, step_cond: StepConditioning, time_ids: torch.Tensor | None = None
                          ) -> tuple[UNetConditioning, UNetConditioning | None]:
        """The UNet's conditioning of the step's rows and (for CFG) of the empty prompt. SDXL adds the pooled
        vectors and ``time_ids`` ``(B, 6)``: by default those of a generated image, ``(res, res, 0, 0, res,
        res)``, for the prompts and the empty prompt alike (diffusers' pipeline does the same)."""
        if not self.is_sdxl:
            uncond = None if step_cond.uncond is None else UNetConditioning(step_cond.uncond)
            return UNetConditioning(step_cond.cond), uncond
        n, res = step_cond.cond.shape[0], self.cfg.resolution
        if time_ids is None:
            time_ids = sdxl_time_ids((res, res), (0, 0), (res, res)).expand(n, 6)
        time_ids = time_ids.to(self.device, self.dtype)
        cond = UNetConditioning(step_cond.cond, step_cond.pooled, time_ids)
        uncond = None if step_cond.uncond is None else \
            UNetConditioning(step_cond.uncond, step_cond.uncond_pooled, time_ids)
        return cond, uncond
