"""The package's layers and import graph, read from the source.

``LAYERS`` names the layers bottom to top and the modules in each; a module
may import its own layer and the layers below, never one above.  The graph is
read with :mod:`ast` (every ``import`` in a module, inside functions too, but
not those under ``if TYPE_CHECKING:``, which only name types), so it is what
the code does, not what a document says.  ``tests/test_layering.py``
fails on an upward import; ``docs/architecture.md`` shows the picture.

Regenerate the picture (Graphviz's ``dot`` renders it)::

    python -m fmi_async.tools.depgraph --dot docs/dependencies.dot --svg docs/dependencies.svg
"""

from __future__ import annotations

import argparse
import ast
import itertools
import logging
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "LAYERS",
    "PACKAGE",
    "component",
    "dot",
    "import_graph",
    "layer_of",
    "upward_imports",
]

logger = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parents[1]

# Bottom to top.  A name stands for a module and everything under it; the
# longest matching name decides.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("fmi_async.errors", "fmi_async.ops", "fmi_async.wire")),
    # Tables and sans-IO state every layer may read: the channel registry, the
    # options parser, the job lease's record logic.
    (
        "tables",
        ("fmi_async.channels.registry", "fmi_async.channels.options", "fmi_async.jobs.record"),
    ),
    ("config", ("fmi_async.config",)),
    ("transport", ("fmi_async.channels", "fmi_async.holepunch")),
    ("jobs", ("fmi_async.jobs",)),
    ("collectives", ("fmi_async.collectives",)),
    ("selection", ("fmi_async.selection",)),
    (
        "communicator",
        (
            "fmi_async.communicator",
            "fmi_async.calls",
            "fmi_async.groups",
            "fmi_async.dispatch",
            "fmi_async.local",
            "fmi_async.runner",
            "fmi_async.clean",
            "fmi_async.web",
            "fmi_async",
        ),
    ),
    # FMI's blocking API over the communicator (nothing below imports it).
    ("compat", ("fmi_async.compat",)),
    ("tools", ("fmi_async.tools", "fmi_async.natsim", "fmi_async.__main__")),
)

_RANK = {name: rank for rank, (_, names) in enumerate(LAYERS) for name in names}


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path


def _targets(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: dict[str, Path]
) -> list[str]:
    """The modules an import statement loads: ``from pkg import mod`` counts ``mod``
    (a package's own ``__init__`` only when a name is taken from it)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        origin = ".".join([*base, node.module] if node.module else base)
    else:
        origin = node.module or ""
    out = []
    for alias in node.names:
        sub = f"{origin}.{alias.name}"
        out.append(sub if sub in known else origin)
    return out


def _typing_only(tree: ast.AST) -> set[ast.AST]:
    """Nodes under ``if TYPE_CHECKING:``: annotations, not imports at run time."""
    out: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                out.update(ast.walk(child))
    return out


def import_graph() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports."""
    modules = dict(_modules())
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        found: set[str] = set()
        skip = _typing_only(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and node not in skip:
                for name in _targets(node, module, path.name == "__init__.py", modules):
                    if name in modules and name != module:
                        found.add(name)
        graph[module] = found
    return graph


def _owner(module: str) -> str:
    """The longest layer entry naming ``module`` or a package above it."""
    parts = module.split(".")
    for end in range(len(parts), 1, -1):  # "fmi_async" itself names only the package file
        name = ".".join(parts[:end])
        if name in _RANK:
            return name
    if module in _RANK:
        return module
    raise KeyError(f"module {module} is in no layer: add it to LAYERS")


def layer_of(module: str) -> int:
    """The rank (0 = bottom) of ``module``'s layer."""
    return _RANK[_owner(module)]


def upward_imports(graph: dict[str, set[str]] | None = None) -> list[str]:
    """Imports of a higher layer by a lower one, as ``"a -> b (layer x -> y)"``."""
    graph = import_graph() if graph is None else graph
    out = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            low, high = layer_of(module), layer_of(target)
            if high > low:
                out.append(f"{module} -> {target} ({LAYERS[low][0]} -> {LAYERS[high][0]})")
    return out


# Modules drawn in a box of their own; every other module is drawn in its
# top-level package's (or is a top-level module).
OWN_BOX = frozenset(
    {
        "channels.base",
        "channels.mailbox",
        "channels.options",
        "channels.registry",
        "channels.udp",
        "holepunch.registry",
        "holepunch.udp",
        "jobs.record",
    }
)


def component(module: str) -> str:
    """The box a module is drawn in: one of :data:`OWN_BOX`, else its top-level part."""
    parts = module.split(".")[1:] or ["fmi_async"]
    two = ".".join(parts[:2])
    return two if two in OWN_BOX else parts[0]


def _reduced(edges: set[tuple[str, str]], rank: dict[str, int]) -> list[tuple[str, str]]:
    """The edges to draw: every edge within a layer, and an edge down to a lower
    layer unless the importer reaches the same box through a box of a layer in
    between (a partial transitive reduction, for reading; cycles inside a layer
    cannot hide an edge)."""
    succ: dict[str, set[str]] = {}
    for a, b in edges:
        succ.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str) -> bool:
        seen, stack = {start}, [start]
        while stack:
            for nxt in succ.get(stack.pop(), ()):
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return False

    def implied(a: str, b: str) -> bool:
        return any(rank[a] > rank[c] > rank[b] and reaches(c, b) for c in succ.get(a, ()))

    return sorted(e for e in edges if rank[e[0]] == rank[e[1]] or not implied(*e))


def dot(graph: dict[str, set[str]] | None = None) -> str:
    """The component graph in Graphviz's DOT language, one row per layer, top to
    bottom, an arrow from importer to imported (an arrow between layers that a
    longer path implies is left out)."""
    graph = import_graph() if graph is None else graph
    boxes: dict[str, int] = {}
    for module in graph:
        box = component(module)
        boxes[box] = max(boxes.get(box, 0), layer_of(module))
    edges = {
        (component(a), component(b))
        for a, targets in graph.items()
        for b in targets
        if component(a) != component(b)
    }
    lines = [
        "// Generated by python -m fmi_async.tools.depgraph; do not edit.",
        "digraph fmi_async {",
        "  rankdir=TB; newrank=true; nodesep=0.25; ranksep=0.45;",
        "  node [shape=box, fontname=Helvetica, fontsize=11];",
        "  edge [color=gray40, arrowsize=0.6];",
    ]
    rows: list[list[str]] = []
    for rank, (name, _) in reversed(list(enumerate(LAYERS))):
        members = sorted(b for b, r in boxes.items() if r == rank)
        if not members:
            continue
        rows.append(members)
        lines.append(f'  subgraph "cluster_{name}" {{ label="{name}"; labeljust=l; color=gray70;')
        lines += [f'    "{m}";' for m in members]
        lines.append("  }")
        lines.append("  { rank=same; " + " ".join(f'"{m}";' for m in members) + " }")
    for upper, lower in itertools.pairwise(rows):  # keep the layers stacked in order
        lines.append(f'  "{upper[0]}" -> "{lower[0]}" [style=invis];')
    lines += [f'  "{a}" -> "{b}";' for a, b in _reduced(edges, boxes)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fmi_async.tools.depgraph")
    parser.add_argument("--dot", type=Path, help="write the DOT source here")
    parser.add_argument("--svg", type=Path, help="render an SVG here (needs Graphviz's dot)")
    args = parser.parse_args(argv)
    graph = import_graph()
    bad = upward_imports(graph)
    for line in bad:
        print(f"upward import: {line}")
    text = dot(graph)
    if args.dot:
        args.dot.write_text(text)
    else:
        print(text, end="")
    if args.svg:
        exe = shutil.which("dot")
        if exe is None:
            print("Graphviz's dot is not installed (apt-get install graphviz)")
            return 2
        args.svg.write_bytes(
            subprocess.run(
                [exe, "-Tsvg"], input=text.encode(), check=True, capture_output=True
            ).stdout
        )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
