"""LongAlign for ComfyUI — the entry point ComfyUI imports from ``custom_nodes/<pack>/``.

Nodes register only inside a ComfyUI (one that has ``comfy_api``, the V3 node API). Importing this folder
anywhere else (tests, the trainer) imports no ``comfy`` module; the trainer and tools use ``longalign_core``.
"""

import importlib.util
import logging

#: Served by ComfyUI at /extensions/<this folder's name>/: the node help pages the frontend's "?" panel reads
#: (web/docs/<node id>/en.md) and one small frontend extension (web/js/). Set here, not as [tool.comfy] web in
#: pyproject.toml: ComfyUI 0.8.0 registers that under the project name ("comfyui-longalign"), while the frontend
#: asks for help pages under the folder name ("ComfyUI-LongAlign").
WEB_DIRECTORY = "./web"

# ComfyUI imports this folder as a package. pytest may also import this file on its own, as a top-level module
# named "__init__" when the folder's name is not a Python identifier (a clone named "ComfyUI-LongAlign"): then
# there is no package to import the nodes from, and nothing to register.
if __package__ and importlib.util.find_spec("comfy_api") is not None:
    try:
        from .nodes import comfy_entrypoint  # noqa: F401
    except ImportError as exc:  # a ComfyUI too old for the V3 API
        logging.getLogger("LongAlign").error(
            "LongAlign needs a ComfyUI with the V3 node API (comfy_api.latest); update ComfyUI. (%s)", exc)
        raise
