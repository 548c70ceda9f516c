"""Segment-level preference score and its decomposition (docs/method.md §4; paper §3.2–3.3).

Symbols (paper): for an image x and a prompt with segments s_1..s_K,

* ``t_k = normalize(text_features(s_k))``, ``t̄ = mean_k t_k`` (not re-normalised), ``x̂ = normalize(image_features(x))``;
* score ``S = t̄ · x̂`` = the mean of the per-segment cosines ``S_k = t_k · x̂``;
* common text direction ``V = normalize(mean of t̄ over a prompt set)``; projection scalar ``η = t̄ · V``;
  ``t⊥ = t̄ − ηV``; **text-relevant** part ``x̂ · t⊥``; **text-irrelevant** part ``η x̂ · V``; their sum is S;
* reweighted score ``S_ω = x̂ · (t⊥ + ω η V)`` (reweight factor ω, paper value 0.3): the text-irrelevant part's
  gradient is scaled by ω. The reference writes ``t̃ = t̄ − (1 − ω)(t̄ · V) V``.

Scores are plain cosines (no logit scale); the paper reports them ×100.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F

from .errors import BadConfigError, BadInputError, kind_of
from .preference import PreferenceModel
from .segmentation import LongSegmentPolicy, Segment, SplitMode, fit_segments, split_segments

log = logging.getLogger("LongAlign")

CropMode = Literal["center", "random"]
CROP_MODES: tuple[str, ...] = ("center", "random")

#: Reweight factor ω of the text-irrelevant part (paper §3.3, reference ``REWEIGHT=0.3``).
DEFAULT_REWEIGHT = 0.3
#: The reference crops 504 px of a 512 px image before resizing ("for blocky blur").
REFERENCE_CROP_FRACTION = 504 / 512
#: Smallest image side accepted for scoring.
MIN_IMAGE_SIDE = 8
#: How far outside [0, 1] pixel values may stray (resampling overshoot) before images are refused.
RANGE_SLACK = 0.1


# ------------------------------------------------------------------------------------------------------------
# Images


def validate_images(images: torch.Tensor) -> None:
    """Raise :class:`BadInputError` unless ``images`` is a non-empty finite float ``(B, 3, H, W)`` batch in
    [0, 1]; the message says how to convert what was given (uint8, 0–255 floats, [-1, 1], channels-last).

    Values up to :data:`RANGE_SLACK` outside [0, 1] pass (resampling overshoot, e.g. a bicubic upscale)."""
    if not torch.is_tensor(images):
        raise TypeError(f"images must be a tensor (B, 3, H, W), got {type(images).__name__}")
    if not images.is_floating_point():
        fix = "images.float() / 255" if images.dtype == torch.uint8 else "images.float() (scaled to 0..1)"
        raise BadInputError(f"images must be a float tensor with values in [0, 1], got dtype {images.dtype}; "
                            f"convert with {fix}")
    if images.ndim != 4:
        raise BadInputError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}"
                            + ("; add the batch axis with images[None]" if images.ndim == 3 else ""))
    if images.shape[0] == 0:
        raise BadInputError("the image batch is empty: nothing to score")
    channels = images.shape[1]
    if channels != 3:
        if images.shape[-1] in (1, 3, 4) and channels > 4:
            fix = "this looks channels-last (B, H, W, C), like a ComfyUI IMAGE: use images.permute(0, 3, 1, 2)"
        else:
            fix = {1: "repeat the grey channel: images.expand(-1, 3, -1, -1)",
                   4: "drop the alpha channel: images[:, :3]"}.get(channels, "convert the images to RGB")
        raise BadInputError(f"images must be RGB (3 channels), got {channels} channels in shape "
                            f"{tuple(images.shape)}; {fix}")
    if min(images.shape[-2:]) < MIN_IMAGE_SIDE:
        raise BadInputError(f"images of {images.shape[-2]}x{images.shape[-1]} px are too small to score "
                            f"(at least {MIN_IMAGE_SIDE} px per side)")
    lo, hi = (float(v) for v in torch.aminmax(images.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise BadInputError("images contain NaN or infinite values (a diverged sampler or VAE?)")
    if lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK:
        if hi > 1.5 and lo >= -RANGE_SLACK and hi <= 255 + RANGE_SLACK:
            fix = "they look like 0–255 values: divide by 255"
        elif lo < -0.5 and lo >= -1 - RANGE_SLACK and hi <= 1 + RANGE_SLACK:
            fix = "they look like [-1, 1] values (a VAE's output): use (images + 1) / 2"
        elif -0.5 <= lo and hi <= 1.5:
            fix = "slightly outside (resampling overshoot?): clamp with images.clamp(0, 1)"
        else:
            fix = "rescale them to [0, 1]"
        raise BadInputError(f"images must have values in [0, 1], found {lo:.4g}..{hi:.4g}; {fix}")


def preprocess_images(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float],
                      crop: CropMode = "center", crop_fraction: float = REFERENCE_CROP_FRACTION,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Differentiable CLIP preprocessing of ``(B, 3, H, W)`` images in [0, 1] (docs/method.md §4).

    A square crop of ``crop_fraction`` of the shorter side (504 of 512, the reference) — centred for scoring,
    random for training like the reference — resized to ``size`` (bilinear with antialiasing, as torchvision's
    ``Resize`` on tensors), then normalised. Returns ``(B, 3, size, size)`` in the input dtype.
    """
    if crop not in CROP_MODES:
        raise BadConfigError(f"crop {crop!r} is not one of {CROP_MODES}")
    if not 0 < crop_fraction <= 1:
        raise BadConfigError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    h, w = images.shape[-2:]
    side = max(1, round(min(h, w) * crop_fraction))
    if crop == "center":
        top, left = (h - side) // 2, (w - side) // 2
    else:
        top = int(torch.randint(0, h - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - side + 1, (1,), generator=generator))
    x = images[..., top:top + side, left:left + side]
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


# ------------------------------------------------------------------------------------------------------------
# Text


@dataclass
class PromptFeatures:
    """A prompt's segments and their normalised text embeddings ``t_k`` ``(K, D)``; ``truncated[k]`` counts the
    tokens segment k lost to the text encoder's window."""

    segments: list[Segment]
    features: torch.Tensor
    truncated: list[int]

    @property
    def mean(self) -> torch.Tensor:
        """``t̄``: the mean of the normalised segment embeddings (not re-normalised)."""
        return self.features.mean(dim=0)


def _cache_of(model: PreferenceModel) -> "OrderedDict[tuple, PromptFeatures]":
    cache = getattr(model, "_longalign_text_cache", None)
    if cache is None:
        cache = OrderedDict()
        setattr(model, "_longalign_text_cache", cache)
    return cache


def _pinned_of(model: PreferenceModel) -> dict[tuple, PromptFeatures]:
    pinned = getattr(model, "_longalign_pinned_text", None)
    if pinned is None:
        pinned = {}
        setattr(model, "_longalign_pinned_text", pinned)
    return pinned


def pin_prompt_features(model: PreferenceModel, prompts: Sequence[str], split_mode: SplitMode = "sentence",
                        long_segments: LongSegmentPolicy = "truncate", chunk: int = 64) -> int:
    """Encode every distinct prompt of ``prompts`` now (``chunk`` prompts per text forward) and keep the results
    for good: :func:`prompt_features` never evicts them, so the text tower can then be freed
    (:meth:`~longalign_core.preference.PreferenceModel.drop_text_tower`). Returns the bytes the features hold."""
    pinned = _pinned_of(model)
    todo = [p for p in dict.fromkeys(prompts) if (p, split_mode, long_segments) not in pinned]
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        for p, feats in zip(part, prompt_features(model, part, split_mode, long_segments)):
            pinned[(p, split_mode, long_segments)] = feats
    return sum(f.features.numel() * f.features.element_size() for f in pinned.values())


def segment_text_features(model: PreferenceModel, texts: Sequence[str],
                          texts_per_forward: int | None = 1) -> torch.Tensor:
    """Normalised text embeddings ``(N, D)`` of segment texts, by default each text in a forward of its own.

    One forward per text makes a segment's embedding a function of its text alone: batched, the padding length
    and the matrix shapes depend on the other texts of the batch, and on some CPUs (GEMM and attention kernels
    chosen by shape) so do the last bits of every row. A score must not change with the prompts scored beside
    it, with the order a resumed or multi-process run meets them in, or with the cache's state.
    ``texts_per_forward=None`` puts all texts in one forward (V from a fixed prompt set, where the batches are
    fixed by the set itself).
    """
    step = len(texts) if texts_per_forward is None else texts_per_forward
    return torch.cat([F.normalize(model.text_features(list(texts[i:i + step])).float(), dim=-1)
                      for i in range(0, len(texts), max(step, 1))])


def judge_segments(model: PreferenceModel, prompt: str, split_mode: SplitMode = "sentence",
                   long_segments: LongSegmentPolicy = "truncate",
                   count: Callable[[str], int] | None = None) -> list[Segment]:
    """The segments of ``prompt`` the judge scores: sentences fitted to its text window (``count``: a cached
    ``model.count_tokens``). What :func:`prompt_features` encodes, and what a ``scores.csv`` has a row for."""
    return fit_segments(split_segments(prompt, split_mode), count or model.count_tokens, model.context_length - 2,
                        long_segments)


@torch.no_grad()
def prompt_features(model: PreferenceModel, prompts: Sequence[str], split_mode: SplitMode = "sentence",
                    long_segments: LongSegmentPolicy = "truncate", cache_size: int = 256,
                    texts_per_forward: int | None = 1) -> list[PromptFeatures]:
    """Segment embeddings for each prompt; each distinct uncached segment text is encoded once, on its own
    (:func:`segment_text_features`), so the result does not depend on the other prompts of the call.
    ``texts_per_forward`` other than 1 batches the segments (faster, but then a result depends on the call's
    other prompts): such a call neither reads nor fills the model's cache.

    Results are cached on the model per (prompt, split mode, long-segment policy): best-of-N and repeated runs
    score many images against one prompt (and :func:`pin_prompt_features` keeps a run's prompts for good).
    ``long_segments="truncate"`` (the reference) cuts a segment at the text window and reports it; ``"split"``
    sub-splits it instead.
    """
    cache, pinned = (_cache_of(model), _pinned_of(model)) if texts_per_forward == 1 else (OrderedDict(), {})
    window = model.context_length - 2
    count = functools.lru_cache(maxsize=None)(model.count_tokens)  # fitting and reporting count each segment
    todo: dict[tuple, list[Segment]] = {}
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise BadInputError(f"prompt {i} is {kind_of(p)} ({p!r:.40}), not a string")
        key = (p, split_mode, long_segments)
        if key not in cache and key not in pinned and key not in todo:
            todo[key] = judge_segments(model, p, split_mode, long_segments, count)
    if todo:
        distinct = list(dict.fromkeys(s.text for segs in todo.values() for s in segs))
        by_text = dict(zip(distinct, segment_text_features(model, distinct, texts_per_forward)))
        for key, segs in todo.items():
            counts = [count(s.text) for s in segs]
            feats = torch.stack([by_text[s.text] for s in segs])
            cache[key] = PromptFeatures(segs, feats, [max(0, n - window) for n in counts])
    out = []
    for p in prompts:
        key = (p, split_mode, long_segments)
        if key in pinned:
            out.append(pinned[key])
            continue
        cache.move_to_end(key)
        out.append(cache[key])
    while len(cache) > cache_size:
        cache.popitem(last=False)
    return out


# ------------------------------------------------------------------------------------------------------------
# The decomposition


def common_direction(prompt_means: torch.Tensor) -> torch.Tensor:
    """``V``: the normalised mean of prompt embeddings ``t̄`` ``(M, D)`` over a prompt set → ``(D,)``."""
    if prompt_means.ndim != 2 or prompt_means.shape[0] == 0:
        raise ValueError(f"expected (M, D) prompt embeddings with M >= 1, got {tuple(prompt_means.shape)}")
    return F.normalize(prompt_means.float().mean(dim=0), dim=0)


def batch_common_direction(t_bar: torch.Tensor,
                           gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The reference's per-step ``V`` (``loss.dense_score``): the mean of the batch's ``t̄``; with ``gather``
    (e.g. ``accelerator.gather``), the mean of every process's batch mean; then normalised."""
    m = t_bar.mean(dim=0)
    if gather is not None:
        m = gather(m[None]).mean(dim=0)
    return m / m.norm()


@dataclass
class Decomposition:
    """``score = relevant + irrelevant``; ``eta`` = η = t̄·V; ``reweighted`` = S_ω. All ``(B,)``."""

    score: torch.Tensor
    relevant: torch.Tensor
    irrelevant: torch.Tensor
    eta: torch.Tensor
    reweighted: torch.Tensor


def decompose(t_bar: torch.Tensor, x_hat: torch.Tensor, direction: torch.Tensor,
              omega: float = DEFAULT_REWEIGHT) -> Decomposition:
    """Split ``S = t̄ · x̂`` into the text-relevant part ``x̂·t⊥`` and text-irrelevant part ``η x̂·V`` (paper
    Eq. 6–7), and the reweighted score ``S_ω = x̂·(t⊥ + ω η V)``. Shapes: t̄, x̂ ``(B, D)``, V ``(D,)``."""
    v = direction.to(t_bar)
    # row-wise products summed, not ``t_bar @ v``: a matrix-vector kernel's rows depend on how many rows it has
    eta = (t_bar * v).sum(-1)
    t_perp = t_bar - eta[:, None] * v
    x_v = (x_hat * v).sum(-1)
    relevant = (x_hat * t_perp).sum(-1)
    irrelevant = eta * x_v
    return Decomposition(relevant + irrelevant, relevant, irrelevant, eta, relevant + omega * irrelevant)


def reweight_text(t_bar: torch.Tensor, direction: torch.Tensor, omega: float = DEFAULT_REWEIGHT) -> torch.Tensor:
    """The reference's reweighted text embedding ``t̃ = t̄ − (1 − ω)(t̄·V)V``; ``t̃ · x̂ = S_ω``."""
    v = direction.to(t_bar)
    return t_bar - (1 - omega) * (t_bar * v).sum(-1)[:, None] * v


# ------------------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class ScoreResult:
    """Scores of B images: image-level :class:`Decomposition` ``(B,)`` plus, per image, the per-segment
    ``(K_b,)`` scores and their two parts (their means are the image-level values)."""

    parts: Decomposition
    segment_scores: list[torch.Tensor]
    segment_relevant: list[torch.Tensor]
    segment_irrelevant: list[torch.Tensor]
    prompts: list[PromptFeatures]
    direction: torch.Tensor | None = None  # the V the scores were decomposed along
    warnings: list[str] = field(default_factory=list)

    @property
    def score(self) -> torch.Tensor:
        return self.parts.score


def _pair_prompts(n_images: int, prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts] * n_images
    prompts = list(prompts)
    if len(prompts) == 1:
        return prompts * n_images
    if len(prompts) != n_images:
        raise BadInputError(f"{len(prompts)} prompts for {n_images} images: give one prompt, or one per image")
    return prompts


def image_embeddings(model: PreferenceModel, images: torch.Tensor, crop: CropMode = "center",
                     generator: torch.Generator | None = None, validate: bool = True) -> torch.Tensor:
    """``x̂``: normalised image embeddings ``(B, D)`` of ``(B, 3, H, W)`` images in [0, 1] (differentiable)."""
    if validate:
        validate_images(images)
    pixels = preprocess_images(images, model.image_size, model.mean, model.std, crop, generator=generator)
    # one image a forward: an image's embedding must not depend on the images scored beside it (see
    # segment_text_features); the crop (one draw for the batch) and the resize are per-image operations already
    feats = torch.cat([model.image_features(pixels[b:b + 1]) for b in range(pixels.shape[0])])
    return F.normalize(feats.float(), dim=-1)


def segment_score(model: PreferenceModel, images: torch.Tensor, prompts: str | Sequence[str],
                  direction: torch.Tensor | None = None, omega: float = DEFAULT_REWEIGHT,
                  crop: CropMode = "center", split_mode: SplitMode = "sentence",
                  long_segments: LongSegmentPolicy = "truncate",
                  generator: torch.Generator | None = None,
                  gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ScoreResult:
    """Segment-level score of each image against its prompt (one prompt for all, or one per image), decomposed
    along ``direction`` (V; default: the batch's own prompts, which collapses for a single prompt — pass V
    from a prompt set, see :func:`direction_from_prompts`). Each image and each uncached segment goes through a
    forward of its own, so a score depends on its image and prompt alone, not on the batch. Differentiable with respect to ``images``. ``gather``
    (e.g. ``accelerator.gather``) makes the per-batch V the mean over all processes, as in the reference trainer.
    """
    if not 0.0 <= omega <= 1.0:
        raise BadConfigError(f"omega (reweight factor) must be in [0, 1], got {omega}")
    validate_images(images)
    paired = _pair_prompts(images.shape[0], prompts)
    for i, p in enumerate(paired):
        if not isinstance(p, str):
            raise BadInputError(f"prompt {i} is {kind_of(p)} ({p!r:.40}), not a string")
        if not p.strip():
            which = f" (prompt {i} of {len(paired)})" if len(set(paired)) > 1 else ""
            raise BadInputError(f"prompt is empty{which}: nothing to score the image against")
    feats = prompt_features(model, paired, split_mode, long_segments)
    x_hat = image_embeddings(model, images, crop, generator, validate=False)  # validated above
    t_bar = torch.stack([f.mean for f in feats]).to(x_hat.device)
    v = batch_common_direction(t_bar, gather) if direction is None else direction.to(x_hat.device).float()
    parts = decompose(t_bar, x_hat, v, omega)
    seg_s, seg_r, seg_i, warnings = [], [], [], []
    for b, f in enumerate(feats):
        t_k = f.features.to(x_hat.device)
        s_k = t_k @ x_hat[b]
        eta_k = t_k @ v
        irr_k = eta_k * (x_hat[b] @ v)
        seg_s.append(s_k)
        seg_i.append(irr_k)
        seg_r.append(s_k - irr_k)
    for pf in {id(f): f for f in feats}.values():
        lost = sum(pf.truncated)
        if lost:
            warnings.append(f"{lost} tokens of over-long segments were cut at the text encoder's "
                            f"{model.context_length}-token window")
    return ScoreResult(parts, seg_s, seg_r, seg_i, feats, v, warnings)
