"""``fmi invoke``: run N invocations of a Lambda-style handler on this machine.

Each invocation is a process of its own (:mod:`.invoke_runtime`) that imports
the handler's module fresh and calls ``handler(event, context)`` once, as AWS
Lambda does: the event is the user's, with the job's identity merged in
(:func:`.invoke_events.job_events`, which the example invoker for real Lambda functions uses
too), and the context counts the function's time limit down.  The process is
killed when the limit passes and the invocation reported as Lambda reports it
("Task timed out after N seconds").

What the peers need to meet is the launcher's (:func:`.launcher.launch_session`):
a rendezvous server on loopback with a secret of this run, and by default a
simulated NAT box per invocation.  The event's config points at that server;
the secret is in the function's environment (``FMI_SECRET``), never in the
event, as a deployment keeps it (docs/deploy-lambda.md).

When every invocation has ended, one JSON line per invocation goes to stdout
(in peer order); the exit status is 0 when all of them succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..natsim import PRESETS
from . import invoke_runtime
from .invoke_events import SECRET_VARIABLE, event_config, job_events
from .invoke_runtime import REPORT_FD_VARIABLE
from .launcher import (
    EXIT_INTERRUPTED,
    _load_user_config,
    _note,
    _pump,
    _signal_group,
    launch_session,
)

__all__ = ["Invocation", "add_invoke_arguments", "cmd_invoke"]

logger = logging.getLogger(__name__)

_LAUNCHER_VARIABLES = ("FMI_PEER_ID", "FMI_NUM_PEERS", "FMI_COMM_NAME", "FMI_RUN_ID", "FMI_CONFIG")
_REPORT_LIMIT = 8 * 1024 * 1024  # one report line: the result (Lambda's own limit is 6 MB)


# ---------------------------------------------------------------- the command


def add_invoke_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fmi invoke``."""
    parser.add_argument("-n", "--num-peers", type=int, required=True, help="number of invocations")
    parser.add_argument(
        "path",
        type=Path,
        help="the handler's file (its directory is the task root), or a directory",
    )
    parser.add_argument(
        "--handler",
        dest="handler_spec",  # "handler" is the cli's own attribute
        help="module.function, as Lambda's handler setting (default: FILE's stem + '.handler')",
    )
    parser.add_argument(
        "--event", default="{}", help="the event, a JSON object (or @FILE); default {}"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="the function's time limit in seconds, from the handler's call (default 60; "
        "Lambda's own default is 3)",
    )
    parser.add_argument(
        "--init-timeout",
        type=float,
        default=10.0,
        help="time limit of the module's import (Lambda's init phase; default 10)",
    )
    parser.add_argument(
        "--memory", type=int, default=128, help="the function's memory in MB (default 128)"
    )
    parser.add_argument("--config", type=Path, help="JSON config file (FMI's format)")
    parser.add_argument("--name", default="FMI_WORLD", help="communicator name")
    parser.add_argument("--function-name", help="the function's name (default: the module's)")
    parser.add_argument(
        "--nat",
        choices=["none", *PRESETS],
        default="port-restricted",
        help="put every invocation behind its own simulated NAT of this type (as fmi run)",
    )


@dataclass
class Invocation:
    """One invocation's request and, once it ended, its outcome."""

    peer_id: int
    request_id: str
    event: dict[str, Any]
    status: str = "pending"  # succeeded, failed, timed out
    result: Any = None
    error: dict[str, Any] | None = None
    usage: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The JSON line printed for this invocation."""
        out: dict[str, Any] = {
            "peer_id": self.peer_id,
            "request_id": self.request_id,
            "status": self.status,
        }
        if self.error is None:
            out["result"] = self.result
        else:
            out["error"] = self.error
        return {**out, **self.usage}


def cmd_invoke(args: argparse.Namespace) -> int:
    """Run the invocations; 0 when all succeeded, 1 when one failed or timed out.

    Raises :class:`~fmi_async.errors.ConfigError` for bad arguments, a
    missing handler file, an event that is not a JSON object or a config
    that does not load.
    """
    if args.num_peers < 1:
        raise ConfigError(f"-n must be at least 1, got {args.num_peers}")
    for name in ("timeout", "init_timeout"):
        value = getattr(args, name)
        if not 0 < value < float("inf"):
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive number of seconds")
    if args.memory < 1:
        raise ConfigError(f"--memory must be a positive number of MB, got {args.memory}")
    task_root, handler = _handler_of(args.path, args.handler_spec)
    event = _read_event(args.event)
    job_events(event, 1, args.name, "check", {})  # a bad event fails here, not in N processes
    user = _load_user_config(args.config)
    function = args.function_name or handler.rpartition(".")[0].replace("/", "-")
    return asyncio.run(_invoke_all(args, task_root, handler, function, event, user))


def _handler_of(path: Path, handler: str | None) -> tuple[Path, str]:
    """The task root and the ``module.function`` to call."""
    if path.is_dir():
        return path.resolve(), handler or "handler.handler"
    if not path.is_file():
        raise ConfigError(f"handler {path} not found")
    if path.suffix != ".py":
        raise ConfigError(f"handler {path} is not a Python file")
    return path.resolve().parent, handler or f"{path.stem}.handler"


def _read_event(text: str) -> Any:
    source = "--event"
    if text.startswith("@"):
        source = text[1:]
        try:
            text = Path(source).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read event file {source}: {exc.strerror}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source} is not valid JSON: {exc}") from exc


async def _invoke_all(
    args: argparse.Namespace,
    task_root: Path,
    handler: str,
    function: str,
    event: Mapping[str, Any],
    user: dict[str, Any],
) -> int:
    async with launch_session(args.num_peers, args.nat, user) as session:
        events = job_events(
            event, args.num_peers, args.name, session.run_id, event_config(session.config)
        )
        calls = [Invocation(i, str(uuid.uuid4()), ev) for i, ev in enumerate(events)]
        settings = _Settings(
            task_root, handler, function, args.memory, args.timeout, args.init_timeout
        )
        envs = [
            {**_function_env(settings, session.secret), **session.nat_env(i)}
            for i in range(len(calls))
        ]
        interrupted = await _run_interruptibly(
            [_invoke(call, settings, env) for call, env in zip(calls, envs, strict=True)]
        )
        summary = session.nat_summary(args.nat)
        if summary:
            _note(summary)
    if interrupted:
        _note("interrupted; every invocation was stopped")
        return EXIT_INTERRUPTED
    for call in calls:
        print(json.dumps(call.record()), flush=True)
    failed = [c for c in calls if c.status != "succeeded"]
    for call in failed:
        message = (call.error or {}).get("errorMessage", "")
        _note(f"peer {call.peer_id} {call.status}: {message}")
    return 1 if failed else 0


@dataclass(frozen=True)
class _Settings:
    task_root: Path
    handler: str
    function: str
    memory: int
    timeout: float
    init_timeout: float


def _function_env(settings: _Settings, secret: str) -> dict[str, str]:
    """The environment of a function: the user's, less the launcher's, plus Lambda's own."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(
        {
            SECRET_VARIABLE: secret,
            "AWS_LAMBDA_FUNCTION_NAME": settings.function,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(settings.memory),
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{settings.function}",
            "LAMBDA_TASK_ROOT": str(settings.task_root),
            "_HANDLER": settings.handler,
        }
    )
    return env


async def _run_interruptibly(jobs: list[Coroutine[Any, Any, None]]) -> bool:
    """Run the invocations to their end; True when Ctrl-C or SIGTERM stopped them."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    tasks = [asyncio.create_task(job) for job in jobs]
    stopper = asyncio.create_task(stop.wait())
    try:
        pending: set[asyncio.Task[Any]] = set(tasks)
        while pending and not stop.is_set():  # each round ends an invocation, or all of them
            _, pending = await asyncio.wait(
                pending | {stopper}, return_when=asyncio.FIRST_COMPLETED
            )
            pending.discard(stopper)
        return stop.is_set()
    finally:
        stopper.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _invoke(call: Invocation, settings: _Settings, env: dict[str, str]) -> None:
    """One invocation: start its process, enforce its limits, fill in its outcome."""
    read_fd, write_fd = os.pipe()
    log_stream = f"{time.strftime('%Y/%m/%d')}/[$LATEST]{uuid.uuid4().hex}"
    request = {
        "request_id": call.request_id,
        "task_root": str(settings.task_root),
        "handler": settings.handler,
        "event": call.event,
        "timeout": settings.timeout,
        "memory": settings.memory,
        "function_name": settings.function,
        "function_arn": f"arn:aws:lambda:local:000000000000:function:{settings.function}",
        "log_group_name": f"/aws/lambda/{settings.function}",
        "log_stream_name": log_stream,
    }
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            invoke_runtime.__file__,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={
                **env,
                "AWS_LAMBDA_LOG_STREAM_NAME": log_stream,
                REPORT_FD_VARIABLE: str(write_fd),
            },
            cwd=settings.task_root,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
    finally:
        os.close(write_fd)
    prefix = f"[peer {call.peer_id}] "
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    pumps = [
        asyncio.create_task(_pump(proc.stdout, lambda: sys.stdout, prefix)),
        asyncio.create_task(_pump(proc.stderr, lambda: sys.stderr, prefix)),
    ]
    loop = asyncio.get_running_loop()
    reports = asyncio.StreamReader(limit=_REPORT_LIMIT)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reports), os.fdopen(read_fd, "rb", buffering=0)
    )
    try:
        proc.stdin.write(json.dumps(request).encode())
        with contextlib.suppress(ConnectionError):
            await proc.stdin.drain()
        proc.stdin.close()
        await _supervise(call, settings, proc, reports)
    except Exception as exc:  # a report that is not JSON, or one past the size limit
        logger.debug("invocation of peer %d", call.peer_id, exc_info=True)
        call.status = "failed"
        call.error = {"errorType": "Runtime.InvalidReport", "errorMessage": str(exc)}
    finally:
        if proc.returncode is None:
            # Stopped from outside (Ctrl-C): a moment to close, as the launcher gives.
            _signal_group(proc, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(proc.wait()), 3.0)
        _signal_group(proc, signal.SIGKILL)  # what the function started goes with it
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(proc.wait()), 5.0)
        transport.close()
        _, unfinished = await asyncio.wait(pumps, timeout=2.0)
        for task in unfinished:
            task.cancel()
    if call.status != "pending":
        _note(_report_line(call, settings))


async def _supervise(
    call: Invocation,
    settings: _Settings,
    proc: asyncio.subprocess.Process,
    reports: asyncio.StreamReader,
) -> None:
    """Wait for the init report, then the result, each within its limit; kill on overrun."""
    init = await _next_report(reports, settings.init_timeout)
    if init is None or "error" in init:
        await _ended_early(
            call, proc, init, f"INIT timed out after {settings.init_timeout:.2f} seconds"
        )
        return
    call.usage["init_ms"] = float(init.get("init_ms", 0.0))
    remaining = max(0.0, (int(init["ready"]) - time.time_ns() // 1_000_000) / 1000)
    done = await _next_report(reports, remaining)
    if done is None and proc.returncode is None and not reports.at_eof():
        _signal_group(proc, signal.SIGKILL)  # Lambda stops a function at its limit, no grace
        call.status = "timed out"
        call.error = {
            "errorType": "Sandbox.Timedout",
            "errorMessage": f"RequestId: {call.request_id} Error: Task timed out after "
            f"{settings.timeout:.2f} seconds",
        }
        call.usage["duration_ms"] = round(settings.timeout * 1000, 2)
        return
    if done is None or "error" in done:
        await _ended_early(call, proc, done, None)
        return
    call.status = "succeeded"
    call.result = done.get("result")
    call.usage.update({k: float(done[k]) for k in ("duration_ms", "max_memory_mb") if k in done})
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(proc.wait()), 5.0)


async def _ended_early(
    call: Invocation,
    proc: asyncio.subprocess.Process,
    report: dict[str, Any] | None,
    timeout_message: str | None,
) -> None:
    """A failed invocation: the runtime's error report, an init overrun, or an early exit."""
    call.status = "failed"
    if report is not None:
        call.error = report["error"]
        call.usage.update(
            {k: float(report[k]) for k in ("duration_ms", "max_memory_mb") if k in report}
        )
        return
    if proc.returncode is None and timeout_message is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(proc.wait()), 0.5)  # exiting, or stuck in init?
    if proc.returncode is None and timeout_message is not None:
        _signal_group(proc, signal.SIGKILL)
        call.status = "timed out"
        call.error = {"errorType": "Runtime.InitTimeout", "errorMessage": timeout_message}
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(proc.wait()), 5.0)
    code = proc.returncode
    how = f"signal: {-code}" if code is not None and code < 0 else f"exit status {code}"
    call.error = {
        "errorType": "Runtime.ExitError",
        "errorMessage": f"RequestId: {call.request_id} Error: Runtime exited with error: {how}",
    }


async def _next_report(reports: asyncio.StreamReader, timeout: float) -> dict[str, Any] | None:
    """The next JSON report line, or None at end of stream or when ``timeout`` passes."""
    try:
        line = await asyncio.wait_for(reports.readline(), timeout)
    except TimeoutError:
        return None
    if not line:
        return None
    message: dict[str, Any] = json.loads(line)
    return message


def _report_line(call: Invocation, settings: _Settings) -> str:
    """Lambda's REPORT log line for one invocation."""
    usage = call.usage
    duration = usage.get("duration_ms", 0.0)
    billed = int(-(-duration // 1))
    parts = [
        f"peer {call.peer_id} REPORT RequestId: {call.request_id}",
        f"Duration: {duration:.2f} ms",
        f"Billed Duration: {billed} ms",
        f"Memory Size: {settings.memory} MB",
    ]
    if "max_memory_mb" in usage:
        parts.append(f"Max Memory Used: {usage['max_memory_mb']:.0f} MB")
    if "init_ms" in usage:
        parts.append(f"Init Duration: {usage['init_ms']:.2f} ms")
    return "\t".join(parts)
