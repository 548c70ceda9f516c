"""LongAlign for ComfyUI — the entry point ComfyUI imports from ``custom_nodes/<pack>/``.

Nodes register only inside a ComfyUI (one that has ``comfy_api``, the V3 node API). Importing this folder
anywhere else (tests, the trainer) imports no ``comfy`` module; the trainer and tools use ``longalign_core``.
"""

import importlib.util
import logging

if importlib.util.find_spec("comfy_api") is not None:
    try:
        from .nodes import comfy_entrypoint  # noqa: F401
    except ImportError as exc:  # a ComfyUI too old for the V3 API
        logging.getLogger("LongAlign").error(
            "LongAlign needs a ComfyUI with the V3 node API (comfy_api.latest); update ComfyUI. (%s)", exc)
        raise
