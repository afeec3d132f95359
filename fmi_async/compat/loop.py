"""A private asyncio event loop in a background thread, and blocking calls into it.

Why a thread and not a private loop driven by each call
(``loop.run_until_complete``): the library does work between calls.  A
direct channel connects a pair when one of them first sends, and hole
punching needs *both* peers' loops running at that moment; the job lease is
renewed every ``lease_ttl / 3`` seconds; an abandoned collective's abort is
announced in the background; the UDP channel acknowledges and retransmits.
A loop that only runs inside calls would stall all of it while the program
computes between calls (a peer computing for a minute would lose its lease,
and a peer busy elsewhere could not be connected to).  A thread keeps the
loop running; a call costs one hand-over to it and back.

A call made from a thread whose own event loop is running would block that
loop: it raises :class:`~fmi_async.compat.errors.EventLoopError` instead.
Calls from several threads run concurrently on the loop, as tasks do.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from ..errors import ClosedError, CommTimeout
from .errors import EventLoopError

__all__ = ["LoopThread", "check_blocking_allowed"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

STOP_TIMEOUT = 10.0
"""Longest wait for the loop's thread to finish once stopped."""


def check_blocking_allowed(what: str) -> None:
    """Raise :class:`EventLoopError` when this thread's event loop is running."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise EventLoopError(
        f"{what} blocks, and it was called from a running asyncio event loop, which it would "
        "block: inside asyncio code use fmi_async.Communicator and await its calls (or call "
        "this from another thread, e.g. with asyncio.to_thread)"
    )


def _new_loop(use_uvloop: bool | None) -> asyncio.AbstractEventLoop:
    """uvloop when installed (as ``fmi.run``), unless ``use_uvloop`` is False."""
    if use_uvloop is not False:
        try:
            import uvloop
        except ImportError:
            if use_uvloop:
                from ..errors import ConfigError

                raise ConfigError("use_uvloop=True but uvloop is not installed") from None
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.new_event_loop()


class LoopThread:
    """An event loop running in a daemon thread until :meth:`stop`.

    Daemon, so a program that never closes its communicator still exits; the
    communicators close at interpreter exit from an ``atexit`` hook, which
    runs while daemon threads still do.
    """

    def __init__(self, name: str, *, use_uvloop: bool | None = None) -> None:
        self._loop = _new_loop(use_uvloop)
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<LoopThread {self._thread.name} {state}>"

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def _main(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    def call(self, coro: Coroutine[Any, Any, T], what: str, limit: float) -> T:
        """Run ``coro`` on the loop and return its result or raise its error.

        ``limit`` bounds the wait (the library bounds every call by its own
        deadline; this only guards against a call that never ends): past it
        the call is cancelled and :class:`~fmi_async.errors.CommTimeout` raised.
        Interrupted (``KeyboardInterrupt``), the call is cancelled too.
        """
        try:
            check_blocking_allowed(what)
            if not self.running:
                raise ClosedError(f"{what}: the communicator's event loop has stopped")
        except BaseException:
            coro.close()
            raise
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            done, _ = concurrent.futures.wait([future], timeout=limit)
        except BaseException:
            future.cancel()
            raise
        if not done:
            future.cancel()
            raise CommTimeout(f"{what} did not complete in {limit:g}s; it was cancelled")
        return future.result()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Start ``coro`` on the loop without waiting for it (a close from ``__del__``)."""
        if self.running:
            asyncio.run_coroutine_threadsafe(coro, self._loop)
        else:
            coro.close()

    def stop(self, *, wait: bool = True) -> None:
        """Stop the loop (its remaining tasks are cancelled) and, unless called from the
        loop's own thread or ``wait`` is False, wait for its thread to end."""
        if self._stopping:
            return
        self._stopping = True
        try:
            self._loop.call_soon_threadsafe(self._loop.stop)
        except RuntimeError:  # the loop is already closed
            return
        if wait and not self.in_loop_thread():
            self._thread.join(STOP_TIMEOUT)
            if self._thread.is_alive():
                logger.warning("%r did not stop within %gs", self, STOP_TIMEOUT)
