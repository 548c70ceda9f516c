"""CLIP-based preference models (Denscore, PickScore, CLIP-H, HPSv2) loaded from the files users have (docs/method.md §4).

* Denscore, PickScore, CLIP-H: a Hugging Face ``CLIPModel`` folder (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``), with the CLIP-H tokenizer / preprocessor files next to it or in a separate folder
  (``processor=``). Online users may pass Hub ids instead.
* HPSv2: an ``open_clip`` checkpoint (``HPS_v2_compressed.pt`` / ``.safetensors``) for the ``ViT-H-14``
  architecture, through ``open_clip_torch``.

``.pt``/``.bin`` files are read with ``torch.load(weights_only=True)``: a file that carries pickled code is
refused, never executed. :class:`PreferenceModel` gives every kind the same two calls, ``text_features`` and
``image_features``, and the preprocessing constants its image tower expects.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch

from .errors import BadConfigError, BadModelFileError, looks_local

log = logging.getLogger("LongAlign")

ModelKind = Literal["auto", "hf_clip", "open_clip"]
MODEL_KINDS: tuple[str, ...] = ("auto", "hf_clip", "open_clip")

#: The attributes that make up the text tower of each kind of model (what ``text_features`` runs).
TEXT_TOWER = {"hf_clip": ("text_model", "text_projection"),
              "open_clip": ("transformer", "token_embedding", "ln_final", "positional_embedding", "text_projection")}

#: OpenAI/LAION CLIP normalisation (docs/method.md §4).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class PreferenceModelError(BadModelFileError):
    """A preference model file or folder is missing, of the wrong kind, or corrupt."""


@dataclass
class PreferenceModel:
    """A CLIP-style preference model: ``text_features(texts) -> (N, D)``, ``image_features(pixels) -> (B, D)``
    (unnormalised embeddings), with ``image_size``, ``mean`` and ``std`` for its image preprocessing."""

    name: str
    kind: str
    model: torch.nn.Module
    tokenize: Callable[[Sequence[str]], torch.Tensor]
    count_tokens: Callable[[str], int]
    image_size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    context_length: int = 77
    text_tower_dropped: bool = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device=None, dtype=None) -> "PreferenceModel":
        self.model.to(device=device, dtype=dtype)
        return self

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, D)`` projected text embeddings, each text truncated to ``context_length`` tokens."""
        if self.text_tower_dropped:
            raise RuntimeError(f"the text tower of preference model {self.name} was freed (--cache-text-embeddings) "
                               f"and {len(texts)} text(s) are not among the pinned prompts, "
                               f"e.g. {list(texts)[0]!r:.80}")
        ids = self.tokenize(list(texts)).to(self.device)
        if self.kind == "open_clip":
            return self.model.encode_text(ids)
        out = self.model.get_text_features(input_ids=ids)
        return out if torch.is_tensor(out) else out.pooler_output

    def drop_text_tower(self) -> int:
        """Free the text tower (once every text the run scores against is pinned:
        :func:`~longalign_core.denscore.pin_prompt_features`); the image tower stays. Returns the bytes freed."""
        tower = {n: part for n in TEXT_TOWER[self.kind] if (part := getattr(self.model, n, None)) is not None}
        freed = sum(t.numel() * t.element_size() for part in tower.values()
                    for t in (part.parameters() if isinstance(part, torch.nn.Module) else [part]))
        for n in tower:
            setattr(self.model, n, None)
        self.text_tower_dropped = True
        return freed

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` projected image embeddings of preprocessed ``(B, 3, S, S)`` pixels."""
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        if self.kind == "open_clip":
            return self.model.encode_image(pixels)
        out = self.model.get_image_features(pixel_values=pixels)
        return out if torch.is_tensor(out) else out.pooler_output


# ------------------------------------------------------------------------------------------------------------
# Loading


def safe_torch_load(path: str | Path):
    """``torch.load(weights_only=True)``; errors as :class:`PreferenceModelError`."""
    from .io_utils import CheckpointError
    from .io_utils import safe_torch_load as _load

    try:
        return _load(path, "preference model checkpoint")
    except CheckpointError as exc:
        raise PreferenceModelError(str(exc)) from None


def _hf_tokenizer(source: str | Path | None, fallback_source: str | Path):
    from transformers import CLIPTokenizer

    for candidate in [source, fallback_source]:
        if candidate is None:
            continue
        try:
            return CLIPTokenizer.from_pretrained(str(candidate))
        except (OSError, ValueError, TypeError):
            continue
    from .clip_vocab import load_clip_tokenizer

    log.warning("LongAlign: no CLIP tokenizer files next to %s; using the built-in CLIP vocabulary", fallback_source)
    return load_clip_tokenizer()


def _hf_image_preprocessing(source: str | Path | None, model_dir: str | Path, default_size: int):
    """Image size, mean and std from a ``preprocessor_config.json`` (processor folder first, then the model)."""
    for folder in [source, model_dir]:
        if folder is None or not (Path(folder) / "preprocessor_config.json").is_file():
            continue
        cfg = json.loads((Path(folder) / "preprocessor_config.json").read_text())
        size = cfg.get("crop_size", cfg.get("size", default_size))
        if isinstance(size, dict):
            size = size.get("height", size.get("shortest_edge", default_size))
        return int(size), tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))
    return default_size, CLIP_MEAN, CLIP_STD


def load_hf_clip(path: str | Path, processor: str | Path | None = None,
                 dtype: torch.dtype | None = None) -> PreferenceModel:
    """A Hugging Face ``CLIPModel`` folder (Denscore, PickScore, CLIP-H), or a Hub id when online; read directly in
    ``dtype`` when given, with one copy of the weights in memory (:mod:`.dtype_loading`)."""
    from safetensors import SafetensorError
    from transformers import CLIPModel

    from .dtype_loading import from_pretrained_in_dtype

    local = Path(path)
    if local.exists() or looks_local(path):
        _check_hf_clip_folder(local)
    if processor is not None and not Path(processor).is_dir() and (Path(processor).exists() or
                                                                   looks_local(processor)):
        raise PreferenceModelError(f"processor folder {processor} not found (it should hold the CLIP-H tokenizer "
                                   f"and preprocessor_config.json); check the path")
    try:
        model = CLIPModel.from_pretrained(str(path), use_safetensors=None) if dtype is None else \
            from_pretrained_in_dtype(CLIPModel, path, dtype, use_safetensors=None)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not local.exists():
            raise PreferenceModelError(f"{path} is not a local folder, and loading it as a Hugging Face Hub id "
                                       f"failed ({detail}); check the path") from None
        raise PreferenceModelError(f"could not load a CLIPModel from {path}: {detail}") from None
    tokenizer = _hf_tokenizer(processor, path)
    default_size = model.config.vision_config.image_size
    size, mean, std = _hf_image_preprocessing(processor, path if local.exists() else "", default_size)
    return wrap_hf_clip(model, tokenizer, Path(str(path)).name, size, mean, std)


def _check_hf_clip_folder(local: Path) -> None:
    """Refuse a folder that is not a loadable Hugging Face ``CLIPModel`` with a message naming the file at
    fault (missing folder, bad ``config.json``, a corrupt or truncated weights file)."""
    from .errors import check_input_file, check_weights_folder

    if not local.exists():
        raise PreferenceModelError(f"preference model folder {local} not found; check the path")
    if not local.is_dir():
        raise PreferenceModelError(f"{local} is a file; a Hugging Face CLIPModel is a folder with config.json")
    if not (local / "config.json").is_file():
        raise PreferenceModelError(f"{local} is not a Hugging Face CLIPModel folder: config.json is missing "
                                   f"(expected config.json + model.safetensors)")
    check_input_file(local / "config.json", "model config", error=PreferenceModelError)
    try:
        config = json.loads((local / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PreferenceModelError(f"{local / 'config.json'} is not valid JSON ({exc}); download it again") from None
    if not isinstance(config, dict) or config.get("model_type") != "clip":
        kind = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise PreferenceModelError(f"{local}/config.json describes a {kind!r} model, "
                                   f"expected a CLIPModel (model_type 'clip')")
    weights = [f for f in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
               if (local / f).exists()]
    if not weights:
        raise PreferenceModelError(f"{local} has config.json but no weights (model.safetensors or "
                                   f"pytorch_model.bin)")
    check_weights_folder(local, "preference model", "download its model.safetensors again",
                         error=PreferenceModelError)


def wrap_hf_clip(model, tokenizer, name: str = "clip", image_size: int | None = None,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> PreferenceModel:
    """A :class:`PreferenceModel` around an in-memory transformers ``CLIPModel`` and ``CLIPTokenizer``."""
    model.eval().requires_grad_(False)
    context = min(int(tokenizer.model_max_length), model.config.text_config.max_position_embeddings)

    def tokenize(texts):
        # Padding to the longest text is exact: CLIP's text tower is causal and pools at the end token.
        return tokenizer(list(texts), padding=True, truncation=True, max_length=context,
                         return_tensors="pt").input_ids

    def count(text):
        return len(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])

    size = image_size or model.config.vision_config.image_size
    return PreferenceModel(name, "hf_clip", model, tokenize, count, int(size), tuple(mean), tuple(std), context)


def _open_clip_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from .errors import read_safetensors

        sd, _ = read_safetensors(path, "open_clip checkpoint", error=PreferenceModelError)
    else:
        sd = safe_torch_load(path)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise PreferenceModelError(f"{path} does not hold a state dict of tensors (expected an open_clip checkpoint)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def load_open_clip(path: str | Path, arch: str = "ViT-H-14") -> PreferenceModel:
    """An ``open_clip`` checkpoint such as HPSv2 (``arch`` ``ViT-H-14``). ``arch`` may also be the path of an
    open_clip model-config JSON for other shapes."""
    import open_clip

    from .errors import check_input_file

    path = check_input_file(path, "open_clip checkpoint", error=PreferenceModelError)
    if arch.endswith(".json"):
        open_clip.add_model_config(arch)
        arch = Path(arch).stem
    if arch not in open_clip.list_models():
        raise PreferenceModelError(f"unknown open_clip architecture {arch!r}; HPSv2 uses 'ViT-H-14'")
    sd = _open_clip_state_dict(path)  # before building the model: a bad file fails fast
    model = open_clip.create_model(arch, pretrained=None)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing:
        raise PreferenceModelError(f"{path} does not match open_clip {arch}: {len(missing)} weights missing "
                                   f"(e.g. {missing[:3]}), {len(unexpected)} unexpected")
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(arch)
    context = int(getattr(tokenizer, "context_length", 77))
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = tuple(getattr(model.visual, "image_mean", None) or CLIP_MEAN)
    std = tuple(getattr(model.visual, "image_std", None) or CLIP_STD)
    from .clip_vocab import load_clip_tokenizer

    counter = load_clip_tokenizer()

    def count(text):
        return len(counter(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])

    return PreferenceModel(path.stem, "open_clip", model, lambda texts: tokenizer(list(texts)), count, size,
                           mean, std, context)


def load_preference_model(path: str | Path, kind: ModelKind = "auto", processor: str | Path | None = None,
                          arch: str = "ViT-H-14", device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32) -> PreferenceModel:
    """Load a preference model. ``kind="auto"``: a folder (or Hub id) is a Hugging Face CLIPModel, a file is an
    open_clip checkpoint."""
    if kind not in MODEL_KINDS:
        raise BadConfigError(f"kind {kind!r} is not one of {MODEL_KINDS}")
    p = Path(path)
    if kind == "auto":
        kind = "open_clip" if p.is_file() else "hf_clip"
    if kind == "hf_clip" and p.is_file():
        raise PreferenceModelError(f"{p} is a file; a Hugging Face CLIPModel is a folder with config.json")
    loaded = load_hf_clip(path, processor, dtype) if kind == "hf_clip" else load_open_clip(p, arch)
    return loaded.to(device=device, dtype=dtype)
