"""The API format a script posts to ComfyUI's ``/prompt``: node id -> class_type, inputs, title.

Rendered from the same graph as the UI file, so the two cannot drift apart: frontend-only nodes (notes,
reroutes) are left out, a link through reroutes points at the real output, and frontend-only widgets
(``control_after_generate``, ``previewMode``) are not sent.
"""

from __future__ import annotations

from .node_types import CONTROL
from .graph import Workflow


def api_prompt(wf: Workflow) -> dict:
    """The workflow as ``app.graphToPrompt`` turns it into a prompt."""
    prompt = {}
    for n in wf.nodes:
        if n.spec.virtual:
            continue
        inputs: dict[str, object] = {}
        for name in n.spec.widgets:
            if name == CONTROL:
                continue
            if name in n.links_in:
                src, slot = wf.origin(n.links_in[name])
                inputs[name] = [str(src.id), slot]
            else:
                inputs[name] = n.values[name]
        for name, _ in n.spec.inputs:
            if name in n.links_in:
                src, slot = wf.origin(n.links_in[name])
                inputs[name] = [str(src.id), slot]
        prompt[str(n.id)] = {"inputs": inputs, "class_type": n.type,
                             "_meta": {"title": n.title or n.spec.display_name}}
    return prompt
