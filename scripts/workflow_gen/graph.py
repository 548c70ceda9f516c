"""The graph builder: nodes with widget values, links by name, LiteGraph's execution order, the initial view."""

from __future__ import annotations

from dataclasses import dataclass, field

from .node_types import NodeType, load_node_types

NODE_TYPES: dict[str, NodeType] = load_node_types()

#: The window the initial view is framed for, the frontend's bars around the canvas (left, top, right, bottom),
#: and the height of a node's title bar (drawn above its pos).
VIEW = (1920, 1080)
VIEW_MARGINS = (80, 110, 30, 30)
TITLE_HEIGHT = 30


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[float, float]
    size: tuple[float, float]
    values: dict[str, object]  # widget name -> value (CONTROL included for seeds)
    title: str | None = None
    colors: dict = field(default_factory=dict)
    links_in: dict[str, tuple[Node, int]] = field(default_factory=dict)  # input name -> (source node, slot)

    @property
    def spec(self) -> NodeType:
        return NODE_TYPES[self.type]

    def out(self, name: str) -> tuple[Node, int]:
        """An output of this node by name, for :meth:`Workflow.link`."""
        names = [n for n, _ in self.spec.outputs]
        return self, names.index(name)


@dataclass
class Workflow:
    name: str  # short id: the API file's name (workflows/api/<name>.json)
    #: the UI file's name (workflows/<title>.json): ComfyUI 0.8.0's Templates dialog shows a custom node
    #: pack's template by its file name, as title and description, and searches it by that name
    title: str = ""
    #: one line on what the workflow shows, drawn on its template card (scripts/make_template_cards.py)
    blurb: str = ""
    #: the main path through the workflow's nodes, drawn on its template card as a chain of boxes
    card_path: tuple[str, ...] = ()
    nodes: list[Node] = field(default_factory=list)

    def add(self, type_: str, pos, size, title: str | None = None, colors: dict | None = None, **values) -> Node:
        spec = NODE_TYPES[type_]
        expected = list(spec.widgets)
        if sorted(values) != sorted(expected):
            raise ValueError(f"{type_}: widget values {sorted(values)} != widgets {sorted(expected)}")
        if size[0] < spec.min_size[0] or size[1] < spec.min_size[1]:
            raise ValueError(f"{type_}: size {size} is below the frontend's minimum {spec.min_size}")
        node = Node(len(self.nodes) + 1, type_, tuple(pos), tuple(size), values, title, dict(colors or {}))
        self.nodes.append(node)
        return node

    def reroute(self, source: tuple[Node, int], pos) -> Node:
        """A Reroute node at ``pos`` fed by ``source``; link onwards from ``node.out("")``."""
        node = self.add("Reroute", pos, (75, 26))
        self.link(source, node, "")
        return node

    @staticmethod
    def origin(source: tuple[Node, int]) -> tuple[Node, int]:
        """The real output behind a chain of Reroute nodes."""
        node, slot = source
        while node.type == "Reroute":
            node, slot = node.links_in[""]
        return node, slot

    def out_type(self, node: Node, slot: int) -> str:
        src, k = self.origin((node, slot))
        return src.spec.outputs[k][1]

    def note(self, text: str, pos, size) -> Node:
        return self.add("MarkdownNote", pos, size, title="Read me", text=text)

    @staticmethod
    def link(source: tuple[Node, int], target: Node, input_name: str) -> None:
        """Connect an output (``node.out(name)``) to a socket input or to a widget input of ``target``."""
        node, slot = source
        sockets = [n for n, _ in target.spec.inputs]
        if input_name not in sockets and input_name not in target.spec.widgets:
            raise ValueError(f"{target.type} has no input {input_name!r}")
        if input_name in target.links_in:
            raise ValueError(f"{target.type}.{input_name} is already connected")
        target.links_in[input_name] = (node, slot)

    def execution_order(self) -> list[Node]:
        """Nodes in a topological order (sources first, ties by id); what LiteGraph stores as ``order``."""
        done: list[Node] = []
        pending = sorted(self.nodes, key=lambda n: n.id)
        while pending:
            ready = [n for n in pending if all(src in done for src, _ in n.links_in.values())]
            if not ready:
                raise ValueError(f"{self.name}: the graph has a cycle")
            done.append(ready[0])
            pending.remove(ready[0])
        return done

    def links(self) -> list[tuple[int, Node, int, Node, str]]:
        """(link id, source, source slot, target, input name), numbered by target id then input position."""
        out = []
        for target in sorted(self.nodes, key=lambda n: n.id):
            order = [n for n, _ in target.spec.inputs] + list(target.spec.widgets)
            for name in sorted(target.links_in, key=order.index):
                src, slot = target.links_in[name]
                out.append((len(out) + 1, src, slot, target, name))
        return out

    def bounds(self) -> tuple[float, float, float, float]:
        """x0, y0, x1, y1 of everything drawn: the nodes with their title bars."""
        boxes = [(n.pos[0], n.pos[1] - TITLE_HEIGHT, n.pos[0] + n.size[0], n.pos[1] + n.size[1])
                 for n in self.nodes]
        return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                max(b[3] for b in boxes))

    def initial_view(self, width: int = VIEW[0], height: int = VIEW[1]) -> dict:
        """Canvas scale and offset that show the whole graph in a ``width`` x ``height`` window, clear of the
        frontend's side bar and top bar (LiteGraph maps a graph point p to the screen as (p + offset) * scale)."""
        left, top, right, bottom = VIEW_MARGINS
        x0, y0, x1, y1 = self.bounds()
        scale = min(1.0, (width - left - right) / (x1 - x0), (height - top - bottom) / (y1 - y0))
        scale = int(scale * 100) / 100  # round down to 0.01
        return {"scale": scale, "offset": [round(left / scale - x0, 1), round(top / scale - y0, 1)]}
