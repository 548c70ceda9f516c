"""ComfyUI-facing nodes (V3 schema). Imported only inside ComfyUI: every module here may import comfy_api."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import denscore_nodes, host, training_nodes, weights_nodes
from .text_encode import LongAlignTextEncode

host.register_model_folders()

NODES: list[type[io.ComfyNode]] = [LongAlignTextEncode, *weights_nodes.NODES, *denscore_nodes.NODES,
                                   *training_nodes.NODES]


class LongAlignExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> LongAlignExtension:
    return LongAlignExtension()
