"""The common text direction V from a reference prompt set, and its cache (docs/method.md §4; paper §3.3):
``V = normalize(mean of t̄ over the set)``, each prompt segmented as the scores it decomposes are, cached next to
the model under a key of everything V depends on (the weights as loaded, the prompts, the split and long-segment
rules)."""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .denscore import common_direction, prompt_features
from .errors import BadInputError, LongAlignError
from .preference import PreferenceModel
from .segmentation import LongSegmentPolicy, SplitMode

log = logging.getLogger("LongAlign")


def default_reference_prompts() -> list[str]:
    """The shipped reference prompt set for V: a few hundred varied long prompts (one per line)."""
    path = Path(__file__).with_name("data") / "reference_prompts.txt"
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


#: Bumped when what a cached V means changes (the files of older versions are then ignored).
DIRECTION_CACHE_VERSION = 2


def direction_cache_file(model_path: str | Path | None, key: str, fallback_dir: str | Path | None = None) -> Path | None:
    """The one naming of V's cache files: ``longalign_direction-<key>.safetensors`` (``key`` from
    :func:`direction_key`) in the model's folder, or beside a single-file model, when that folder is writable;
    else in ``fallback_dir`` (ComfyUI's user folder); None when neither can hold it."""
    name = f"longalign_direction-{key}.safetensors"
    if model_path is not None:
        path = Path(model_path)
        folder = path if path.is_dir() else path.parent if path.is_file() else None
        if folder is not None and os.access(folder, os.W_OK):
            return folder / name
    if fallback_dir is not None:
        return Path(fallback_dir) / name
    return None


def weights_identity(model: PreferenceModel) -> str:
    """A digest of the preference model's weights as loaded (names, shapes, dtypes and, per tensor, its sum, its
    absolute sum and a few values): two models, or one model in two dtypes, give two identities. Reading it costs
    two reductions over the weights, far less than encoding a prompt set."""
    h = hashlib.sha256()
    stats = []
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            h.update(f"{name}{tuple(p.shape)}{p.dtype};".encode())
            x = p.detach().reshape(-1)
            head = x[:4].double()
            stats.append(torch.cat([torch.stack([x.sum(dtype=torch.float64), x.abs().sum(dtype=torch.float64)]),
                                    F.pad(head, (0, 4 - head.numel()))]))
    if stats:
        h.update(",".join(f"{v:.9g}" for v in torch.cat(stats).cpu().tolist()).encode())
    return h.hexdigest()


def direction_key(model: PreferenceModel, prompts: Sequence[str], split_mode: SplitMode = "sentence",
                  long_segments: LongSegmentPolicy = "truncate") -> str:
    """What a V depends on, as one digest: the preference model's weights (:func:`weights_identity`, dtype
    included), the prompts, the split rule and the long-segment rule."""
    h = hashlib.sha256()
    h.update(f"v{DIRECTION_CACHE_VERSION}|{model.kind}|{weights_identity(model)}|{prompts_digest(prompts)}|"
             f"{split_mode}|{long_segments}".encode())
    return h.hexdigest()[:24]


def _read_direction_cache(cache_file: str | Path, key: str) -> torch.Tensor | None:
    """V from a cache file written for the same :func:`direction_key`, or None. A corrupt or foreign cache is
    only a cache: warn and recompute (the new V then replaces it)."""
    from .errors import read_safetensors

    try:
        tensors, meta = read_safetensors(cache_file, "direction cache")
    except LongAlignError as exc:  # truncated, empty, corrupt
        log.warning("LongAlign: ignoring the direction cache: %s; V is recomputed and the cache rewritten", exc)
        return None
    v = tensors.get("direction")
    if meta.get("key") != key:
        return None
    if v is None or v.ndim != 1 or not torch.isfinite(v).all():
        log.warning("LongAlign: ignoring the direction cache %s (no finite 'direction' vector); V is recomputed",
                    cache_file)
        return None
    return v


def prompts_digest(prompts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


@torch.no_grad()
def direction_from_prompts(model: PreferenceModel, prompts: Sequence[str] | None = None,
                           split_mode: SplitMode = "sentence", long_segments: LongSegmentPolicy = "truncate",
                           batch_size: int = 64, cache_file: str | Path | None = None,
                           progress: Callable[[int, int], None] | None = None,
                           key: str | None = None) -> torch.Tensor:
    """``V`` for ``model`` from a prompt set (default: the shipped set), ``(D,)``.

    Each prompt is segmented exactly as the scores V decomposes are (``split_mode``, ``long_segments``: pass the
    scores' own). With ``cache_file`` (name it with :func:`direction_cache_file`), a V computed earlier with the
    same :func:`direction_key` (``key``, computed when not given) is read from it, and a new one is written to
    it atomically (safetensors).
    """
    prompts = list(prompts) if prompts is not None else default_reference_prompts()
    if not prompts:
        raise BadInputError("the reference prompt set is empty; give at least one prompt (a few hundred is better)")
    if cache_file is not None:
        key = key or direction_key(model, prompts, split_mode, long_segments)
        if Path(cache_file).is_file():
            cached = _read_direction_cache(cache_file, key)
            if cached is not None:
                return cached
    means = []
    steps = math.ceil(len(prompts) / batch_size)
    for i in range(steps):
        chunk = prompts[i * batch_size:(i + 1) * batch_size]
        means += [f.mean for f in prompt_features(model, chunk, split_mode, long_segments, cache_size=0,
                                                  texts_per_forward=None)]  # V: batches fixed by the set
        if progress is not None:
            progress(i + 1, steps)
    v = common_direction(torch.stack(means))
    if cache_file is not None:
        from safetensors.torch import save_file

        from .io_utils import atomic_path

        with atomic_path(cache_file) as tmp:
            save_file({"direction": v.contiguous().cpu()}, tmp,
                      metadata={"key": key, "prompts": str(len(prompts)), "model": model.name,
                                "split_mode": split_mode, "long_segments": long_segments})
    return v


def cached_direction(model: PreferenceModel, prompts: Sequence[str] | None = None, split_mode: SplitMode = "sentence",
                     long_segments: LongSegmentPolicy = "truncate", model_path: str | Path | None = None,
                     fallback_dir: str | Path | None = None,
                     progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """:func:`direction_from_prompts` cached where :func:`direction_cache_file` says (beside ``model_path``, else
    in ``fallback_dir``), keyed by :func:`direction_key`: what the Denscore nodes and the score CLI use. The
    trainer and the evaluation compute V at every start instead (a resumed run does what an uninterrupted one
    did)."""
    prompts = list(prompts) if prompts is not None else default_reference_prompts()
    key = direction_key(model, prompts, split_mode, long_segments)
    cache = direction_cache_file(model_path, key, fallback_dir)
    return direction_from_prompts(model, prompts, split_mode, long_segments, cache_file=cache, progress=progress,
                                  key=key)
