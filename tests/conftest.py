"""Hooks and fixtures: the event loops, the ``group`` fixture, slow cases.

Every test runs on asyncio; a module or test marked ``both_loops`` runs on
uvloop too (pytest-asyncio parametrizes its loop factory from
``pytest_asyncio_loop_factories``).  Set ``FMI_TEST_LOOP=uvloop`` to run the
rest of the suite on uvloop instead.  Shared helpers live in ``tests/helpers.py``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from typing import Any

import pytest

from tests.helpers import GROUPS, STORAGE_SIZES, UVLOOP_SIZES, GroupFactory, storage_group

pytest_plugins = [p for p in ("tests.storage_servers",) if importlib.util.find_spec(p) is not None]

LOOP = os.environ.get("FMI_TEST_LOOP", "asyncio")


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """``both_loops`` tests run on asyncio and uvloop; the rest on FMI_TEST_LOOP."""
    factories: dict[str, Any] = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop
    except ImportError:
        return factories
    if item.get_closest_marker("both_loops") is not None:
        factories["uvloop"] = uvloop.new_event_loop
    elif LOOP == "uvloop":
        factories = {"uvloop": uvloop.new_event_loop}
    return factories


def pytest_report_header(config: pytest.Config) -> str:
    return f"fmi-async event loop: {LOOP}"


@pytest.fixture(params=[*sorted(GROUPS), *STORAGE_SIZES])
def group(request: pytest.FixtureRequest) -> GroupFactory:
    """A factory: ``async with group(n, timeout=...) as comms``, for every channel."""
    if request.param in GROUPS:
        return GROUPS[request.param]
    return storage_group(request.getfixturevalue(f"{request.param}_config"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow",
        action="store_true",
        default=False,
        help="also run the cases marked slow (the group sizes, loops and variants the "
        "default run leaves out to keep within its time budget); `bash scripts/test --slow`",
    )


AWS_BACKENDS = ("s3", "dynamodb")
"""The storage channels served by the moto server, in the order ``aws_split`` deals to."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "aws_split(argname): the variants of argname take turns on S3 and DynamoDB "
        "(the first on S3, the second on DynamoDB, ...); every other channel runs them "
        "all, and --slow runs them all on both",
    )


def _aws_split_elsewhere(item: pytest.Item, params: dict[str, Any]) -> bool:
    """Whether ``item`` is a variant that ``aws_split`` deals to the other AWS backend
    (the backend is the ``group`` or ``backend`` parameter)."""
    marker = item.get_closest_marker("aws_split")
    backend = params.get("group", params.get("backend"))
    if marker is None or backend not in AWS_BACKENDS:
        return False
    argname = marker.args[0]
    values = next(m.args[1] for m in item.iter_markers("parametrize") if m.args[0] == argname)
    index = list(values).index(item.callspec.params[argname])  # type: ignore[attr-defined]
    return index % len(AWS_BACKENDS) != AWS_BACKENDS.index(backend)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark as slow the group sizes the default run leaves out: storage groups above
    the sizes their server serves quickly (``STORAGE_SIZES``), the variants of an
    ``aws_split`` case dealt to the other AWS backend, and on uvloop the sizes and
    channels ``UVLOOP_SIZES`` leaves to asyncio.

    They are left out of the default run (the count shows as "deselected") and
    run with ``--slow``: S3 and DynamoDB through the moto server answer a few
    hundred requests a second, so P = 16 there takes minutes per test.
    """
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        group = params.get("group", "")
        allowed = STORAGE_SIZES.get(group)
        if allowed is not None and "size" in params and params["size"] not in allowed:
            item.add_marker(pytest.mark.slow)
        elif _aws_split_elsewhere(item, params):
            item.add_marker(pytest.mark.slow)
        elif "[uvloop-" in item.nodeid and group in UVLOOP_SIZES:
            sizes = UVLOOP_SIZES[group]
            if not sizes or ("size" in params and params["size"] not in sizes):
                item.add_marker(pytest.mark.slow)
    if config.getoption("--slow"):
        return
    keep = [item for item in items if item.get_closest_marker("slow") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
