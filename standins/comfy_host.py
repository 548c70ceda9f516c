"""ComfyUI as the host: the checkout at ``COMFYUI_PATH`` made importable the way ComfyUI's own start-up would, this
pack loaded as a custom node, and ComfyUI ``CLIP`` objects with random full-size weights. Used by the real-ComfyUI
tests (through ``tests/comfy_support.py``) and ``bench/encode.py``. Nothing here copies ComfyUI code: it imports
the checkout the user points at."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")

# Text encoder shapes ComfyUI hard-codes (its sd1/sd2/bigG configs); values are random here.
CLIP_SHAPES = {
    "l": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768),
    "h": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              hidden_act="gelu", projection_dim=1024),
    "g": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              hidden_act="gelu", projection_dim=1280),
}


def comfy_version(path: str | None = COMFYUI_PATH) -> str:
    """``__version__`` of the ComfyUI checkout at ``path`` (its ``comfyui_version.py``), or "unknown version"."""
    try:
        text = Path(path, "comfyui_version.py").read_text()
    except (OSError, TypeError):
        return "unknown version"
    found = re.search(r"__version__\s*=\s*[\"']([^\"']+)", text)
    return found.group(1) if found else "unknown version"


def import_comfy():
    """Make the checkout importable on a CPU-only torch (ComfyUI picks its device at import)."""
    # ComfyUI first on the path, every time: its top-level ``nodes`` module must win over this pack's ``nodes/``
    # package even when pytest has put the checkout itself on the path (a folder named like ComfyUI-LongAlign).
    if sys.path[:1] != [COMFYUI_PATH]:
        if COMFYUI_PATH in sys.path:
            sys.path.remove(COMFYUI_PATH)
        sys.path.insert(0, COMFYUI_PATH)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management  # noqa: F401
    import comfy.sd

    return comfy


def load_pack(name: str = "longalign_pack"):
    """Import this repository as ComfyUI imports a custom node folder: as a package from its ``__init__.py``."""
    if name in sys.modules:
        return sys.modules[name]
    import_comfy()
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def random_clip_text_state_dict(kind: str, seed: int = 0, with_projection: bool = False) -> dict[str, torch.Tensor]:
    """Random weights for a full-size CLIP text encoder in Hugging Face ``CLIPTextModel`` key layout
    (``text_model.…``), as ComfyUI's text-encoder loader reads them."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407, **CLIP_SHAPES[kind])
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(cfg)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, tensor in model.state_dict().items():
        if "position_ids" in key:
            continue
        if key.startswith("text_projection") and not with_projection:
            continue
        if tensor.ndim == 1:
            value = torch.zeros(tensor.shape) if key.endswith("bias") else torch.ones(tensor.shape)
        elif "embedding" in key:
            value = torch.randn(tensor.shape, generator=gen) * 0.3
        else:
            value = torch.randn(tensor.shape, generator=gen) / math.sqrt(tensor.shape[1])
        if not key.startswith(("text_model.", "text_projection")):
            key = "text_model." + key  # transformers 5 drops the prefix ComfyUI expects
        sd[key] = value
    return sd


def host_clip(kinds: str, seed: int = 0):
    """A ComfyUI ``CLIP`` object with random full-size weights, fp32: ``"l"`` (SD1.x), ``"h"`` (SD2.x),
    ``"gl"`` (SDXL)."""
    comfy = import_comfy()
    sds = [random_clip_text_state_dict(k, seed + i, with_projection=(k == "g")) for i, k in enumerate(kinds)]
    return comfy.sd.load_text_encoder_state_dicts(sds, clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                                                  model_options={"dtype": torch.float32})
