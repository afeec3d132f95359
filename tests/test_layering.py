"""Import layering, checked on the source: what production modules may import.

The NAT simulator (:mod:`fmi_async.natsim`) belongs to tests and ``fmi run
--nat``.  No module under ``fmi_async/channels`` or ``fmi_async/holepunch``
imports it; the one exception is the plug point
:func:`fmi_async.holepunch.net.simulated_network`, which loads it by name
when a simulated gateway is configured.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fmi_async"
PRODUCTION = ("channels", "holepunch")
SIMULATOR = "fmi_async.natsim"
PLUG_MODULE = "fmi_async.holepunch.net"
PLUG_FUNCTION = "simulated_network"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _production_modules() -> Iterator[tuple[str, Path]]:
    for sub in PRODUCTION:
        for path in sorted((PACKAGE / sub).rglob("*.py")):
            yield _module_name(path), path


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The absolute names an import statement binds, submodules of ``from`` imports included."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        origin = ".".join([*base, node.module] if node.module else base)
    else:
        origin = node.module or ""
    return [origin, *(f"{origin}.{alias.name}" for alias in node.names)]


def _is_simulator(name: str) -> bool:
    return name == SIMULATOR or name.startswith(SIMULATOR + ".")


def _enclosing_functions(tree: ast.AST) -> dict[ast.AST, str]:
    owner: dict[ast.AST, str] = {}
    for func in ast.walk(tree):
        if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(func):
                owner.setdefault(node, func.name)
    return owner


def test_production_modules_do_not_import_the_nat_simulator() -> None:
    offences = []
    for module, path in _production_modules():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = _imported(node, module, path.name == "__init__.py")
                if any(_is_simulator(name) for name in names):
                    offences.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offences, f"production modules import the NAT simulator: {offences}"


def test_the_simulator_is_loaded_by_name_in_one_function_only() -> None:
    """Names of the simulator appear in code only in the plug point's module, and
    ``importlib.import_module`` is called there only inside the plug function."""
    offences = []
    loaders = []
    for module, path in _production_modules():
        tree = ast.parse(path.read_text(), str(path))
        owner = _enclosing_functions(tree)
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and _is_simulator(node.value)
                and id(node) not in docstrings
                and module != PLUG_MODULE
            ):
                offences.append(f"{path.relative_to(PACKAGE)}:{node.lineno} names the simulator")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "import_module"
                and module == PLUG_MODULE
            ):
                loaders.append(owner.get(node))
    assert not offences, offences
    assert loaders == [PLUG_FUNCTION], f"{PLUG_MODULE} loads modules in {loaders}"


def test_loading_the_network_channels_leaves_the_simulator_unloaded() -> None:
    code = (
        "import sys\n"
        "import fmi_async, fmi_async.channels.tcp, fmi_async.channels.udp.channel\n"
        "from fmi_async.holepunch.net import simulated_network\n"
        "assert simulated_network(None, environ=lambda name: None) is None\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('fmi_async.natsim'))\n"
        "assert not loaded, loaded\n"
    )
    env = {name: value for name, value in os.environ.items() if not name.startswith("FMI_NAT")}
    env["PYTHONPATH"] = str(PACKAGE.parent)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr


def test_a_configured_gateway_loads_the_simulator_through_the_plug_point() -> None:
    from fmi_async.holepunch.net import simulated_network
    from fmi_async.natsim import NATNetwork

    net = simulated_network({"gateway": "127.0.0.1:5", "udp_gateway": "127.0.0.1:6"})
    assert isinstance(net, NATNetwork)
    assert net.gateway == ("127.0.0.1", 5) and net.udp_gateway == ("127.0.0.1", 6)
    env = {"FMI_NAT_GATEWAY": "127.0.0.1:7"}
    from_env = simulated_network(None, environ=env.get)
    assert isinstance(from_env, NATNetwork) and from_env.gateway == ("127.0.0.1", 7)


def test_one_table_of_reserved_first_bytes() -> None:
    """Every module of the UDP stack, hole punching and the simulator reads the first
    bytes of datagrams from channels/udp/kinds.py instead of spelling them again."""
    from fmi_async.channels.udp import datagram, kinds
    from fmi_async.holepunch import udp
    from fmi_async.natsim import gateway

    assert datagram.MAGIC == kinds.CHANNEL
    assert udp.RESERVED_MIN == kinds.RESERVED_MIN and udp.UDP_RELAY == kinds.RELAY
    assert gateway.UDP_NAT == kinds.NAT
    spelled = []
    for path in [
        *sorted((PACKAGE / "channels" / "udp").glob("*.py")),
        PACKAGE / "holepunch" / "udp.py",
        PACKAGE / "holepunch" / "server.py",
        *sorted((PACKAGE / "natsim").glob("*.py")),
    ]:
        if path.name == "kinds.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(
                node.value, ast.Constant
            ):
                value = node.value.value
                if isinstance(value, int) and (value == kinds.CHANNEL or 0xF0 <= value <= 0xFF):
                    spelled.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not spelled, f"first bytes spelled outside kinds.py: {spelled}"


# ---------------------------------------------------------------- the layers


def test_no_layer_imports_a_layer_above_it() -> None:
    """fmi_async.tools.depgraph.LAYERS, bottom to top; an upward import fails here."""
    from fmi_async.tools.depgraph import upward_imports

    assert upward_imports() == []


def test_channels_and_selection_know_nothing_above_them() -> None:
    """Named checks of the rules the issue states, on the same import graph."""
    from fmi_async.tools.depgraph import import_graph

    graph = import_graph()
    above = ("fmi_async.communicator", "fmi_async.tools", "fmi_async.local", "fmi_async.runner")
    for module, targets in graph.items():
        if module.startswith(("fmi_async.channels", "fmi_async.selection", "fmi_async.holepunch")):
            bad = [t for t in targets if t.startswith(above) or t == "fmi_async"]
            assert not bad, f"{module} imports {bad}"
        if module.startswith("fmi_async.channels"):
            assert not any(t.startswith("fmi_async.natsim") for t in targets), module
        if module.startswith("fmi_async.collectives"):
            bad = [t for t in targets if t.startswith(("fmi_async.selection", *above))]
            assert not bad, f"{module} imports {bad}"


def test_every_module_is_in_a_layer() -> None:
    from fmi_async.tools.depgraph import import_graph, layer_of

    for module in import_graph():
        layer_of(module)  # raises KeyError naming a module no layer holds


def test_the_checked_in_dependency_picture_is_current() -> None:
    from fmi_async.tools.depgraph import dot

    path = PACKAGE.parent / "docs" / "dependencies.dot"
    assert path.read_text() == dot(), (
        "docs/dependencies.dot is stale: run python -m fmi_async.tools.depgraph "
        "--dot docs/dependencies.dot --svg docs/dependencies.svg"
    )


def test_every_error_is_exported_by_the_package() -> None:
    """The curated API lists every FMIError subclass (anyio checks its __all__ alike)."""
    import fmi_async
    from fmi_async import errors

    assert set(errors.__all__) <= set(fmi_async.__all__)
    assert all(getattr(fmi_async, name) is getattr(errors, name) for name in errors.__all__)
