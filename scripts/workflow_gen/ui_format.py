"""The UI ("Save") format a user drags into ComfyUI: a LiteGraph graph, version 0.4, as frontend 1.35.9 saves it.

Widget values are stored in the order the frontend builds a node's widgets (``NodeType.widgets``: a node's
widget inputs in schema order, KSampler's seed followed by the frontend-only ``control_after_generate``
value), then the widgets the frontend adds on its own.
"""

from __future__ import annotations

from .graph import Node, Workflow
from .node_types import CONTROL, widget_kinds


def _widget_inputs(node: Node) -> list[str]:
    """The widget inputs saved with a node: the frontend gives every widget an input slot after the sockets (in
    widget order, the frontend-only CONTROL left out); a file lists them up to the last one a link drives."""
    names = [w for w in node.spec.widgets if w != CONTROL]
    linked = [k for k, w in enumerate(names) if w in node.links_in]
    return names[:linked[-1] + 1] if linked else []


def _slot(target: Node, name: str) -> int:
    """The index of input ``name`` in the node's saved inputs: sockets, then widget inputs."""
    return ([n for n, _ in target.spec.inputs] + _widget_inputs(target)).index(name)


def _node_entry(wf: Workflow, n: Node, links, order: dict[int, int]) -> dict:
    spec = n.spec
    inputs = [{"name": name, "type": t, "link": None} for name, t in spec.inputs]
    kinds = dict(widget_kinds(n.type))
    for name in _widget_inputs(n):
        if name in n.links_in:
            src, slot = n.links_in[name]
            kind = wf.out_type(src, slot)
        else:
            kind = kinds[name]
        inputs.append({"name": name, "type": kind, "widget": {"name": name}, "link": None})
    slot_of = {i["name"]: k for k, i in enumerate(inputs)}
    for link_id, src, slot, target, name in links:
        if target is n:
            inputs[slot_of[name]]["link"] = link_id
    outputs = []
    for k, (name, t) in enumerate(spec.outputs):
        ids = [lid for lid, src, slot, _, _ in links if src is n and slot == k]
        if n.type == "Reroute":  # the frontend types a reroute's output by what it carries
            t = wf.out_type(n, k)
        outputs.append({"name": name, "type": t, "links": ids, "slot_index": k})
    entry = {"id": n.id, "type": n.type}
    if n.title:
        entry["title"] = n.title
    entry.update({"pos": list(n.pos), "size": list(n.size), "flags": {}, "order": order[n.id], "mode": 0,
                  "inputs": inputs, "outputs": outputs,
                  "properties": {"showOutputText": False, "horizontal": False} if n.type == "Reroute"
                  else {"Node name for S&R": n.type},
                  "widgets_values": [n.values[w] for w in spec.widgets] + [v for _, v in spec.frontend_widgets]})
    entry.update(n.colors)
    return entry


def ui_graph(wf: Workflow) -> dict:
    """The workflow as the frontend saves it."""
    links = wf.links()
    order = {n.id: i for i, n in enumerate(wf.execution_order())}
    return {
        "last_node_id": max(n.id for n in wf.nodes),
        "last_link_id": len(links),
        "nodes": [_node_entry(wf, n, links, order) for n in wf.nodes],
        "links": [[lid, src.id, slot, target.id, _slot(target, name), wf.out_type(src, slot)]
                  for lid, src, slot, target, name in links],
        "groups": [],
        "config": {},
        "extra": {"ds": wf.initial_view()},
        "version": 0.4,
    }
