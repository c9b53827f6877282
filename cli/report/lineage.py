"""The lineage graph of the report: which entries were merged from or imported as which.

`lineage_graph` finds the nodes (entries, and parents outside the registry) and parent → child
edges; `lineage_layout` places them in generation columns, ordered so fewer edges cross, and
gives every box and curve its coordinates. The template `lineage.html.j2` draws the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from adaptory.cli.report.plots import number
from adaptory.registry.entry import Entry

NODE_W, NODE_H, GAP_X, GAP_Y, MARGIN = 200, 44, 70, 14, 12
MAX_LONE_NODES = 12  # more entries without parents or children are listed, not drawn
MAX_LABEL = 26


@dataclass
class GraphNode:
    key: str
    label: str
    detail: str
    entry: Entry | None = None
    title: str = ""
    generation: int = 0
    x: float = 0.0
    y: float = 0.0

    @property
    def short_label(self) -> str:
        return self.label if len(self.label) <= MAX_LABEL else self.label[: MAX_LABEL - 1] + "…"

    @property
    def kind(self) -> str:
        """CSS classes: `entry <task>` or `external`."""
        return "entry " + (self.entry.task or "other") if self.entry else "external"


@dataclass(frozen=True)
class GraphEdge:
    parent: str
    child: str
    weight: float | None
    kind: str  # "merge" (parent in the registry) or "source" (an import path, a removed entry)


@dataclass(frozen=True)
class DrawnEdge:
    """An edge as drawn: its SVG path, tooltip, and where its weight label goes (if any)."""

    kind: str
    d: str
    tip: str
    weight: float | None
    label_x: float
    label_y: float


@dataclass
class LineageLayout:
    """What the template draws; `nodes` empty means nothing to draw."""

    nodes: list[GraphNode] = field(default_factory=list)
    edges: list[DrawnEdge] = field(default_factory=list)
    width: float = 0.0
    height: float = 0.0
    left_out: int = 0  # unconnected entries not drawn (more than MAX_LONE_NODES of them)


def find_parent(parent: dict, entries: Sequence[Entry]) -> Entry | None:
    """The listed entry a parent record names: by exact ref, digest, name+version, tag or name."""
    by_ref = {e.ref: e for e in entries}
    ref = parent.get("ref")
    if isinstance(ref, str) and ref in by_ref:
        return by_ref[ref]
    digest = parent.get("digest")
    if digest:
        found = [e for e in entries if e.digest == digest]
        if found:
            return found[-1]
    name, version = parent.get("name"), parent.get("version")
    if name is not None and version is not None and f"{name}:{version}" in by_ref:
        return by_ref[f"{name}:{version}"]
    if isinstance(ref, str) and ref:
        name, _, rest = ref.partition(":")
        same = [e for e in entries if e.name == name]
        if rest:
            same = [e for e in same if rest in (e.tags or [])]
        return same[-1] if same else None
    return None


def lineage_graph(entries: Sequence[Entry]) -> tuple[dict[str, GraphNode], list[GraphEdge]]:
    """Nodes (every entry, plus parents that are not entries) and parent → child edges."""
    nodes: dict[str, GraphNode] = {}
    for entry in entries:
        detail = " · ".join(str(v) for v in (entry.method, entry.task) if v)
        nodes[f"e{entry.id}"] = GraphNode(f"e{entry.id}", entry.ref, detail, entry)
    edges: list[GraphEdge] = []
    for entry in entries:
        child = f"e{entry.id}"
        for parent in entry.parents or []:
            if not isinstance(parent, dict):
                parent = {"ref": str(parent)}
            found = find_parent(parent, entries)
            weight = number(parent.get("weight"))
            if found is not None:
                if found.id != entry.id:
                    edges.append(GraphEdge(f"e{found.id}", child, weight, "merge"))
                continue
            source = parent.get("ref") or parent.get("imported_from") or parent.get("name")
            if not source:
                continue
            key = f"x{source}"
            if key not in nodes:
                is_path = parent.get("ref") is None and parent.get("imported_from") is not None
                label = Path(str(source)).name or str(source) if is_path else str(source)
                detail = "imported from" if is_path else "not in the registry"
                nodes[key] = GraphNode(key, label, detail, title=str(source))
            edges.append(GraphEdge(key, child, weight, "source"))
    assign_generations(nodes, edges)
    return nodes, edges


def assign_generations(nodes: dict[str, GraphNode], edges: list[GraphEdge]) -> None:
    """Entries get their generation among entries (0 for roots); a parent outside the registry
    sits one column left of its first child (an import path is not an ancestor of everything)."""
    parents_of: dict[str, list[str]] = {}
    for edge in edges:
        if edge.kind == "merge":
            parents_of.setdefault(edge.child, []).append(edge.parent)
    generations: dict[str, int] = {}

    def generation(key: str, visiting: frozenset = frozenset()) -> int:
        if key not in generations:
            ups = [p for p in parents_of.get(key, []) if p not in visiting]  # cycles end here
            generations[key] = 1 + max(generation(p, visiting | {key}) for p in ups) if ups else 0
        return generations[key]

    for key, node in nodes.items():
        if node.entry is not None:
            node.generation = generation(key)
    for key, node in nodes.items():
        if node.entry is None:
            node.generation = min(nodes[e.child].generation for e in edges if e.parent == key) - 1
    first = min((node.generation for node in nodes.values()), default=0)
    for node in nodes.values():
        node.generation -= first


def neighbours(edges: list[GraphEdge]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Each node's parents and each node's children, by key."""
    parents_of: dict[str, list[str]] = {}
    children_of: dict[str, list[str]] = {}
    for edge in edges:
        parents_of.setdefault(edge.child, []).append(edge.parent)
        children_of.setdefault(edge.parent, []).append(edge.child)
    return parents_of, children_of


def order_columns(nodes: dict[str, GraphNode], edges: list[GraphEdge]) -> dict[int, list]:
    """The nodes by generation column, each column ordered top to bottom.

    Barycentre sweeps (Sugiyama's heuristic): sort each column by the mean row of its neighbours
    in the column before it, downwards, upwards, downwards; fewer edges cross. Unconnected
    entries go last.
    """
    parents_of, children_of = neighbours(edges)
    linked = set(parents_of) | set(children_of)
    columns: dict[int, list[GraphNode]] = {}
    for node in nodes.values():
        columns.setdefault(node.generation, []).append(node)
    rows = max(len(c) for c in columns.values())
    order: dict[str, float] = {}  # node key -> row, columns centred on the tallest

    def place(column: list[GraphNode]) -> None:
        order.update({n.key: (rows - len(column)) / 2 + i for i, n in enumerate(column)})

    for column in columns.values():
        column.sort(key=lambda n: (n.key not in linked, n.entry is None,
                                   n.entry.name if n.entry else n.label,
                                   n.entry.version if n.entry else 0))  # fmt: skip
        place(column)
    gens = sorted(columns)
    down, up = (gens[1:], parents_of), (gens[-2::-1], children_of)
    for sweep, links in (down, up, down):
        for gen in sweep:
            column = columns[gen]
            for node in column:
                near = [order[k] for k in links.get(node.key, [])]
                node.y = sum(near) / len(near) if near else order[node.key]
            column.sort(key=lambda n: (n.key not in linked, n.y))
            place(column)
    return columns


def lineage_layout(entries: Sequence[Entry]) -> LineageLayout:
    """The graph of `entries` placed for drawing; a crowd of unconnected entries is left out."""
    nodes, edges = lineage_graph(entries)
    parents_of, children_of = neighbours(edges)
    lone = [key for key in nodes if key not in parents_of and key not in children_of]
    left_out = 0
    if len(lone) > MAX_LONE_NODES:  # a tall column of unconnected boxes says nothing
        for key in lone:
            del nodes[key]
        left_out = len(lone)
    if not nodes:
        return LineageLayout(left_out=left_out)
    columns = order_columns(nodes, edges)
    rows = max(len(c) for c in columns.values())
    pitch = NODE_H + GAP_Y
    for gen, column in columns.items():
        offset = (rows - len(column)) * pitch / 2
        for i, node in enumerate(column):
            node.x = MARGIN + gen * (NODE_W + GAP_X)
            node.y = MARGIN + offset + i * pitch
    return LineageLayout(
        nodes=list(nodes.values()),
        edges=draw_edges(nodes, edges),
        width=MARGIN * 2 + (max(columns) + 1) * NODE_W + max(columns) * GAP_X,
        height=MARGIN * 2 + rows * pitch - GAP_Y,
        left_out=left_out,
    )


def draw_edges(nodes: dict[str, GraphNode], edges: list[GraphEdge]) -> list[DrawnEdge]:
    """Each edge as a cubic curve from its parent's right side to its child's left side.

    Several edges leaving (or entering) one box are spread down its side in the order of the
    boxes at their other ends, so they do not cross there. An edge within a cycle loops under
    the boxes.
    """
    outgoing: dict[str, list[GraphEdge]] = {}
    incoming: dict[str, list[GraphEdge]] = {}
    for edge in edges:
        outgoing.setdefault(edge.parent, []).append(edge)
        incoming.setdefault(edge.child, []).append(edge)
    for group in (*outgoing.values(), *incoming.values()):
        group.sort(key=lambda e: (nodes[e.parent].y, nodes[e.child].y))

    def spread(group: list[GraphEdge], edge: GraphEdge) -> float:
        return NODE_H * (group.index(edge) + 1) / (len(group) + 1)

    drawn = []
    for edge in edges:
        a, b = nodes[edge.parent], nodes[edge.child]
        x1, y1 = a.x + NODE_W, a.y + spread(outgoing[edge.parent], edge)
        x2, y2 = b.x, b.y + spread(incoming[edge.child], edge)
        if b.generation <= a.generation:
            x1, x2 = a.x + NODE_W / 2, b.x + NODE_W / 2
            y1, y2 = a.y + NODE_H, b.y + NODE_H
            d = f"M{x1:.1f} {y1:.1f} C{x1:.1f} {y1 + 30:.1f} {x2:.1f} {y2 + 30:.1f} {x2:.1f} {y2:.1f}"
        else:
            bend = (x2 - x1) / 2
            d = (
                f"M{x1:.1f} {y1:.1f} C{x1 + bend:.1f} {y1:.1f} {x2 - bend:.1f} {y2:.1f} "
                f"{x2:.1f} {y2:.1f}"
            )
        tip = f"{a.label} → {b.label}" + (f" (weight {edge.weight:.4g})" if edge.weight else "")
        # The label sits at the curve's midpoint, which is the chord's midpoint by symmetry.
        drawn.append(DrawnEdge(edge.kind, d, tip, edge.weight, (x1 + x2) / 2, (y1 + y2) / 2 + 4))
    return drawn
