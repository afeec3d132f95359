"""What runs inside one invocation of ``fmi invoke``: a small Lambda-like runtime.

``fmi invoke`` runs this file as a script (``python .../invoke_runtime.py``,
so that nothing but the standard library is imported before the handler's
module, whose import is then timed as Lambda times a cold start) once per
invocation, writes the request (handler, event, function settings) as JSON to
its stdin, and reads what this runtime reports from the file descriptor named
by ``FMI_INVOKE_REPORT_FD``, one JSON object per line:

1. ``{"ready": DEADLINE_MS, "init_ms": ...}`` once the handler's module is
   imported (Lambda's *init* phase, which has a time limit of its own), or
   ``{"error": ...}`` when it cannot be;
2. ``{"result": ..., "duration_ms": ..., "max_memory_mb": ...}`` when the
   handler returned, or ``{"error": {...}, ...}`` when it raised, with the
   fields of the error payload Lambda's Python runtime returns
   (``errorMessage``, ``errorType``, ``requestId``, ``stackTrace``).

``DEADLINE_MS`` is wall-clock epoch milliseconds, as Lambda's runtime API
hands a function its deadline; ``context.get_remaining_time_in_millis()``
counts down to it, and the parent kills the process when it passes.

The handler is ``module.function`` (Lambda's ``handler.handler``), imported
from the task root with the task root as the working directory.  A coroutine
function is run with :func:`asyncio.run`; so is an awaitable a plain
function returns.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
import os
import resource
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = ["LambdaContext", "error_payload", "load_handler", "main"]

logger = logging.getLogger(__name__)

REPORT_FD_VARIABLE = "FMI_INVOKE_REPORT_FD"
RESPONSE_LIMIT = 6 * 1024 * 1024  # Lambda's limit of a synchronous invocation's response


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class LambdaContext:
    """The context object of one invocation, with the attributes of Lambda's Python runtime.

    ``memory_limit_in_mb`` is a string, as the runtime has it (it reads
    ``AWS_LAMBDA_FUNCTION_MEMORY_SIZE``): handlers call ``int()`` on it.
    """

    function_name: str
    memory_limit_in_mb: str
    aws_request_id: str
    deadline_ms: int
    function_version: str = "$LATEST"
    invoked_function_arn: str = ""
    log_group_name: str = ""
    log_stream_name: str = ""
    identity: Any = None
    client_context: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds left before the function is stopped (never below 0)."""
        return max(0, self.deadline_ms - _now_ms())


def load_handler(spec: str) -> Any:
    """The callable named ``module.function`` (``dir/module.function`` also works).

    Raises :class:`ImportError` when the module cannot be imported and
    :class:`AttributeError` when it has no such attribute (the runtime
    reports them as Lambda does, ``Runtime.ImportModuleError`` and
    ``Runtime.HandlerNotFound``).
    """
    module_name, _, attr = spec.replace("/", ".").rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"handler {spec!r} is not of the form module.function")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise AttributeError(f"Handler '{attr}' missing on module '{module_name}'") from None


def error_payload(
    exc: BaseException,
    request_id: str,
    error_type: str | None = None,
    message: str | None = None,
) -> dict[str, Any]:
    """The error payload Lambda's Python runtime returns for ``exc``."""
    frames = traceback.extract_tb(exc.__traceback__)
    return {
        "errorMessage": str(exc) if message is None else message,
        "errorType": error_type or type(exc).__name__,
        "requestId": request_id,
        "stackTrace": [line for line in traceback.format_list(frames)],
    }


def _report(out: TextIO, message: Mapping[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def _max_memory_mb() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS, where this emulation is not exact).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _call(handler: Any, event: Any, context: LambdaContext) -> Any:
    if inspect.iscoroutinefunction(handler):
        return asyncio.run(handler(event, context))
    result = handler(event, context)
    if inspect.isawaitable(result):
        return asyncio.run(_awaited(result))
    return result


async def _awaited(value: Any) -> Any:
    return await value


def run_invocation(request: Mapping[str, Any], out: TextIO) -> int:
    """Import the handler, call it once with the request's event, report; the exit status."""
    request_id = str(request["request_id"])
    init_start = time.perf_counter()
    task_root = str(request["task_root"])
    sys.path.insert(0, task_root)
    try:
        handler = load_handler(str(request["handler"]))
    except (ImportError, SyntaxError) as exc:
        module = str(request["handler"]).rpartition(".")[0]
        message = f"Unable to import module '{module}': {exc}"
        _report(
            out, {"error": error_payload(exc, request_id, "Runtime.ImportModuleError", message)}
        )
        return 1
    except Exception as exc:
        _report(out, {"error": error_payload(exc, request_id, "Runtime.HandlerNotFound")})
        return 1
    init_ms = (time.perf_counter() - init_start) * 1000
    deadline_ms = _now_ms() + int(float(request["timeout"]) * 1000)
    context = LambdaContext(
        function_name=str(request["function_name"]),
        memory_limit_in_mb=str(request["memory"]),
        aws_request_id=request_id,
        deadline_ms=deadline_ms,
        invoked_function_arn=str(request.get("function_arn", "")),
        log_group_name=str(request.get("log_group_name", "")),
        log_stream_name=str(request.get("log_stream_name", "")),
    )
    _report(out, {"ready": deadline_ms, "init_ms": round(init_ms, 2)})
    start = time.perf_counter()
    try:
        result = _call(handler, request["event"], context)
    except Exception as exc:
        _drop_runtime_frames(exc)
        _log_error(exc)
        _report(out, {"error": error_payload(exc, request_id), **_usage(start)})
        return 1
    try:
        size = len(json.dumps(result).encode())
    except (TypeError, ValueError) as exc:
        message = f"Unable to marshal response: {exc}"
        error = error_payload(exc, request_id, "Runtime.MarshalError", message)
        _report(out, {"error": error, **_usage(start)})
        return 1
    if size > RESPONSE_LIMIT:
        error = {
            "errorType": "Function.ResponseSizeTooLarge",
            "errorMessage": f"Response payload size ({size} bytes) exceeded maximum allowed "
            f"payload size ({RESPONSE_LIMIT} bytes).",
        }
        _report(out, {"error": error, **_usage(start)})
        return 1
    _report(out, {"result": result, **_usage(start)})
    return 0


def _drop_runtime_frames(exc: BaseException) -> None:
    """Start the traceback at the handler, as Lambda's own runtime shows it."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    exc.with_traceback(tb)


def _log_error(exc: BaseException) -> None:
    """The error in the function's log (stderr), as Lambda's runtime logs it."""
    trace = "".join(traceback.format_exception(exc)).rstrip()
    print(f"[ERROR] {type(exc).__name__}: {exc}\n{trace}", file=sys.stderr, flush=True)


def _usage(start: float) -> dict[str, float]:
    return {
        "duration_ms": round((time.perf_counter() - start) * 1000, 2),
        "max_memory_mb": round(_max_memory_mb(), 1),
    }


def main() -> int:
    """Read the request from stdin, run it, report on ``FMI_INVOKE_REPORT_FD``."""
    if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
        del sys.path[0]  # run as a script: the tools' modules must not shadow the user's
    request = json.loads(sys.stdin.read())
    with os.fdopen(int(os.environ[REPORT_FD_VARIABLE]), "w") as out:
        return run_invocation(request, out)


if __name__ == "__main__":
    sys.exit(main())
