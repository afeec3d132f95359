"""fmi_async.compat's pieces: FMI's names, declarations, operators, config, the loop thread
and the communicator's life cycle."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import threading
import uuid
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fmi_async.compat as fmi
from fmi_async import SUM, Hint
from fmi_async.compat.config import load_config
from fmi_async.compat.operators import OperatorCache
from fmi_async.compat.values import resolve
from fmi_async.errors import ClosedError, OperatorError
from tests.compat.helpers import fmi_config_file, peer_env, redis_backend
from tests.helpers import REPO

t, d, f, o = fmi.types, fmi.datatypes, fmi.func, fmi.op


# ---------------------------------------------------------------- FMI's names


def test_every_name_fmi_programs_use() -> None:
    """What FMI's client.py reaches through ``import fmi``."""
    assert [m.name for m in fmi.datatypes] == ["int", "double", "int_list", "double_list"]
    assert [m.name for m in fmi.op] == ["sum", "prod", "max", "min", "custom"]
    assert {m.name for m in fmi.hints} == {"fast", "cheap"}
    for name in ("Communicator", "types", "func", "hints", "datatypes", "op"):
        assert name in fmi.__all__
    assert repr(t(d.int_list, 2)) == "types(datatypes.int_list, 2)"
    assert repr(f(o.sum)) == "func(op.sum)"


# ---------------------------------------------------------------- declarations


@pytest.mark.parametrize(
    ("declared", "value", "sent"),
    [
        (t(d.int), 42, [42]),
        (t(d.int), True, [1]),  # FMI's int conversion takes bools
        (t(d.int), np.int32(-7), [-7]),
        (t(d.double), 3, [3.0]),  # and its double conversion ints
        (t(d.double), np.float32(0.5), [0.5]),
        (t(d.int, 5), 1, [1]),  # n is ignored for a scalar, as in FMI
        (t(d.int_list, 3), [1, 2, 3], [1, 2, 3]),
        (t(d.int_list, 2), (4, 5), [4, 5]),
        (t(d.double_list, 2), [1, 2.5], [1.0, 2.5]),
        (t(d.double_list, 2), np.array([1.0, 2.0], dtype=np.float32), [1.0, 2.0]),
    ],
)
def test_declarations_accept(declared: Any, value: Any, sent: list[Any]) -> None:
    spec = resolve(declared, "send")
    arr = spec.to_array(value, "send")
    assert arr.dtype == spec.dtype and arr.tolist() == sent
    back = spec.from_array(arr, "recv")
    assert back == (sent if spec.is_list else sent[0])
    assert type(back if not spec.is_list else back[0]) is (int if spec.is_int else float)


@pytest.mark.parametrize(
    ("declared", "value", "error"),
    [
        (t(d.int), 1.5, fmi.DatatypeError),
        (t(d.int), "1", fmi.DatatypeError),
        (t(d.int), [1], fmi.DatatypeError),
        (t(d.int), 2**63, fmi.DatatypeError),
        (t(d.double), None, fmi.DatatypeError),
        (t(d.double), 1j, fmi.DatatypeError),
        (t(d.int_list, 2), [1, 2.5], fmi.DatatypeError),
        (t(d.int_list, 2), [1, "2"], fmi.DatatypeError),
        (t(d.int_list, 2), [[1], [2]], fmi.DatatypeError),
        (t(d.int_list, 2), [1, [2, 3]], fmi.DatatypeError),
        (t(d.int_list, 2), 12, fmi.DatatypeError),
        (t(d.int_list, 2), [2**64, 1], fmi.DatatypeError),
        (t(d.int_list, 2), [1, 2, 3], fmi.LengthMismatchError),
        (t(d.double_list, 3), [], fmi.LengthMismatchError),
        (t(d.int_list), [1], fmi.LengthMismatchError),
        (t(d.int_list, 0), [], fmi.LengthMismatchError),
        (t(d.int_list, "2"), [1, 2], fmi.LengthMismatchError),
        (t("int"), 1, fmi.DatatypeError),
        (d.int, 1, fmi.DatatypeError),
        (None, 1, fmi.DatatypeError),
    ],
)
def test_declarations_refuse(declared: Any, value: Any, error: type[Exception]) -> None:
    with pytest.raises(error) as caught:
        resolve(declared, "allreduce").to_array(value, "allreduce")
    assert type(caught.value) is error
    assert "allreduce" in str(caught.value)
    assert isinstance(caught.value, (TypeError, ValueError))  # what Python code expects


def test_errors_are_fmi_errors() -> None:
    for error in (fmi.DatatypeError, fmi.LengthMismatchError, fmi.UnknownOperatorError):
        assert issubclass(error, fmi.FMIError)
    assert issubclass(fmi.LengthMismatchError, fmi.DatatypeError)
    assert issubclass(fmi.EventLoopError, RuntimeError)


# ---------------------------------------------------------------- operators


def test_builtin_operators_are_the_librarys() -> None:
    cache, spec = OperatorCache(), resolve(t(d.int_list, 2), "reduce")
    assert cache.get(f(o.sum), spec, "reduce") is SUM
    assert cache.get(f(o.max), spec, "reduce").name == "MAX"


def test_custom_operator_is_elementwise_and_remembered() -> None:
    cache, spec = OperatorCache(), resolve(t(d.int_list, 3), "reduce")

    def twice(a: int, b: int) -> int:
        return 2 * a + 2 * b

    op = cache.get(f(o.custom, twice, True, False), spec, "reduce")
    assert (op.commutative, op.associative, op.name) == (True, False, "custom:twice")
    assert cache.get(f(o.custom, twice, True, False), spec, "reduce") is op
    a, b = np.array([1, 2, 3]), np.array([10, 20, 30])
    assert op(a, b).tolist() == [22, 44, 66]
    halves = cache.get(f(o.custom, lambda x, y: (x + y) / 2), spec, "reduce")
    with pytest.raises(OperatorError, match="must return an int"):
        halves(a, b)


@pytest.mark.parametrize(
    ("declared", "error"),
    [
        (f("sum"), fmi.UnknownOperatorError),
        (f(7), fmi.UnknownOperatorError),
        (f(o.custom), fmi.UnknownOperatorError),
        (f(o.custom, 3, True, True), fmi.UnknownOperatorError),
        (o.sum, fmi.UnknownOperatorError),
        (f(o.custom, max, "yes", True), OperatorError),
    ],
)
def test_operators_refuse(declared: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        OperatorCache().get(declared, resolve(t(d.int), "allreduce"), "allreduce")


# ---------------------------------------------------------------- config


def test_fmi_config_file_loads_unchanged() -> None:
    config = load_config(str(REPO / "config" / "fmi.json"), env={})
    assert config.enabled() == ["tcp"]
    assert config.options("tcp")["port"] == 10000
    assert "s3" in config.model and "redis" in config.model


def test_launcher_supplies_rendezvous_and_secret() -> None:
    """Under ``fmi run`` (FMI_CONFIG set): the launcher's server and secret, the file's
    channels and options."""
    launcher = {
        "backends": {"TCP": {"host": "10.0.0.1", "port": 4242}},
        "security": {"secret": "s3cret"},
    }
    env = {"FMI_CONFIG": json.dumps(launcher)}
    config = load_config(str(REPO / "config" / "fmi.json"), env=env)
    tcp = config.options("tcp")
    assert (tcp["host"], tcp["port"], tcp["max_timeout"]) == ("10.0.0.1", 4242, 1000)
    assert config.secret == b"s3cret"
    redis_only = load_config({"backends": {"Redis": {"host": "h", "port": 1}}}, env=env)
    assert redis_only.enabled() == ["redis"]


# ---------------------------------------------------------------- the communicator


@pytest.fixture
def redis_file(redis_server: tuple[str, int], tmp_path: Path) -> Path:
    return fmi_config_file(tmp_path, Redis=redis_backend(redis_server))


def test_one_peer_job_and_life_cycle(redis_file: Path) -> None:
    comm = fmi.Communicator(0, 1, str(redis_file), "Alone", run_id=uuid.uuid4().hex)
    assert comm.comm.hint() is Hint.CHEAP  # FMI's default
    comm.hint(fmi.hints.fast)
    assert comm.comm.hint() is Hint.FAST
    with pytest.raises(fmi.FMIError):
        comm.hint("fast")  # type: ignore[arg-type]
    assert comm.allreduce([1, 2], f(o.sum), t(d.int_list, 2)) == [1, 2]
    assert comm.scatter([5, 6], 0, t(d.int_list, 2)) == [5, 6]
    assert comm.gather(3.5, 0, t(d.double)) == [3.5]
    assert comm.stats()["num_peers"] == 1
    thread = next(th for th in threading.enumerate() if th.name == "fmi-compat-Alone-0")
    comm.close()
    comm.close()  # closing twice is a no-op
    assert not thread.is_alive()
    assert "closed" in repr(comm)
    with pytest.raises(ClosedError):
        comm.barrier()


def test_context_manager_and_garbage_collection_close(redis_file: Path) -> None:
    run = uuid.uuid4().hex
    with fmi.Communicator(0, 1, str(redis_file), "With", run_id=run, use_uvloop=False) as comm:
        assert comm.scan(2.5, f(o.prod), t(d.double)) == 2.5  # on asyncio's own loop
    assert "closed" in repr(comm)
    dropped = fmi.Communicator(0, 1, str(redis_file), "Dropped", run_id=uuid.uuid4().hex)
    thread = next(th for th in threading.enumerate() if th.name == "fmi-compat-Dropped-0")
    ref, inner = weakref.ref(dropped), dropped.comm
    del dropped
    gc.collect()
    assert ref() is None
    thread.join(10)
    assert not thread.is_alive()
    assert repr(inner).endswith("closed>")


async def test_blocking_calls_refused_inside_a_running_loop(redis_file: Path) -> None:
    """Inside asyncio code the blocking API would block the loop: a clear error, before
    anything starts; from a thread without a loop it works."""
    with pytest.raises(fmi.EventLoopError, match="await"):
        fmi.Communicator(0, 1, str(redis_file), "InLoop")
    comm = await asyncio.to_thread(
        fmi.Communicator, 0, 1, str(redis_file), "InLoop", run_id=uuid.uuid4().hex
    )
    try:
        with pytest.raises(fmi.EventLoopError):
            comm.bcast(1, 0, t(d.int))
        assert await asyncio.to_thread(comm.bcast, 1, 0, t(d.int)) == 1
    finally:
        await asyncio.to_thread(comm.close)
    # collected inside a running loop, where it cannot wait: it closes in the background
    dropped = await asyncio.to_thread(
        fmi.Communicator, 0, 1, str(redis_file), "Collected", run_id=uuid.uuid4().hex
    )
    thread = next(th for th in threading.enumerate() if th.name == "fmi-compat-Collected-0")
    inner = dropped.comm
    del dropped
    gc.collect()
    await asyncio.to_thread(thread.join, 10)
    assert not thread.is_alive()
    assert repr(inner).endswith("closed>")


def test_program_that_never_closes_cleans_up_at_exit(
    redis_server: tuple[str, int], redis_file: Path
) -> None:
    """An FMI program leaves its communicator open; at exit it is closed, and what it
    stored is deleted."""
    import redis

    name = f"Exit{uuid.uuid4().hex[:8]}"
    program = (
        "import fmi_async.compat as fmi, sys\n"
        f"comm = fmi.Communicator(0, 1, {str(redis_file)!r}, {name!r})\n"
        "print(comm.bcast([1.5, 2.5], 0, fmi.types(fmi.datatypes.double_list, 2)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
        env=peer_env(uuid.uuid4().hex[:12]),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[1.5, 2.5]"
    client = redis.Redis(*redis_server)
    try:
        assert [k for k in client.scan_iter(match=f"*{name}*")] == []
    finally:
        client.close()
