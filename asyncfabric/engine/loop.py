"""Event-loop adapters: asyncio and trio, picked at engine open with sniffio.

The engine needs three things from a loop: a waiter (future) it can resolve
from a callback, a way to await it with a timeout, and a callback when the
transport's notify fd is readable. anyio alone would hide the fd watcher
behind a task group, which cannot outlive a Jupyter cell; so each loop gets
its own small adapter.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import anyio
import sniffio


class _TrioWaiter:
    __slots__ = ("_event", "_result", "_exc", "_done")

    def __init__(self, event: Any) -> None:
        self._event = event
        self._result: Any = None
        self._exc: BaseException | None = None
        self._done = False

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return False

    def exception(self) -> BaseException | None:
        return self._exc

    def set_result(self, value: Any) -> None:
        if not self._done:
            self._result, self._done = value, True
            self._event.set()

    def set_exception(self, exc: BaseException) -> None:
        if not self._done:
            self._exc, self._done = exc, True
            self._event.set()

    def result(self) -> Any:
        if self._exc is not None:
            raise self._exc
        return self._result

    def __await__(self) -> Any:
        if not self._done:
            yield from self._event.wait().__await__()
        return self.result()


class LoopAdapter:
    library: str
    # The loop whose callbacks the fast path's own waiters may schedule
    # (_waiter.c): asyncio's base loop only; None elsewhere.
    waiter_loop: Any = None

    def new_waiter(self) -> Any:
        raise NotImplementedError

    def watch(self, fd: int, callback: Callable[[], object]) -> None:
        raise NotImplementedError

    def unwatch(self) -> None:
        raise NotImplementedError

    def has_ready(self) -> bool:
        """Whether other callbacks are ready to run now (so a busy-wait would delay them)."""
        return False

    async def wait(self, waiter: Any, timeout: float | None) -> Any:
        if timeout is None:
            return await waiter
        with anyio.fail_after(timeout):
            return await waiter


class AsyncioAdapter(LoopAdapter):
    library = "asyncio"

    def __init__(self) -> None:
        import asyncio

        self.loop = asyncio.get_running_loop()
        # The base loop's create_future is a Python method around the C Future:
        # one call fewer per transfer (uvloop and others keep their own).
        if type(self.loop).create_future is asyncio.BaseEventLoop.create_future:
            self.new_waiter = functools.partial(asyncio.Future, loop=self.loop)  # type: ignore[method-assign]
            self.waiter_loop = self.loop
        else:
            self.new_waiter = self.loop.create_future  # type: ignore[method-assign]
        self._fd: int | None = None
        # asyncio keeps runnable callbacks in loop._ready (CPython's base loop
        # and uvloop-free event loops); without it we assume idle.
        self._ready = getattr(self.loop, "_ready", None)

    def has_ready(self) -> bool:
        return bool(self._ready)

    async def wait(self, waiter: Any, timeout: float | None) -> Any:
        if timeout is None:
            return await waiter
        if waiter.done():
            return waiter.result()
        if not hasattr(asyncio.Task, "uncancel"):  # Python 3.10
            return await super().wait(waiter, timeout)
        # A plain call_later timer: anyio's cancel scopes cost several times more
        # per wait, and every wait on the hot path may carry a timeout.
        task = asyncio.current_task()
        fired = False

        def expire() -> None:
            nonlocal fired
            if not waiter.done() and task is not None:
                fired = True
                task.cancel()

        handle = self.loop.call_later(timeout, expire)
        try:
            return await waiter
        except asyncio.CancelledError:
            if fired and task is not None:
                # 3.11+: only our own cancel pending means a timeout; 3.10 has no
                # uncancel(), and a fired timer is then taken as the cause.
                uncancel = getattr(task, "uncancel", None)
                if uncancel is None or uncancel() == 0:
                    raise TimeoutError from None
            raise
        finally:
            handle.cancel()

    def watch(self, fd: int, callback: Callable[[], object]) -> None:
        def on_readable() -> None:
            try:
                os.read(fd, 8)
            except OSError:  # BlockingIOError; EINVAL: an epoll fd (pyverbs), drain consumes it
                pass
            callback()

        self._fd = fd
        self.loop.add_reader(fd, on_readable)

    def unwatch(self) -> None:
        if self._fd is not None and not self.loop.is_closed():
            self.loop.remove_reader(self._fd)
        self._fd = None


class TrioAdapter(LoopAdapter):
    library = "trio"

    def __init__(self) -> None:
        import trio

        self._trio = trio
        self._scope: Any = None
        self._fd = -1
        self._closing = False

    def new_waiter(self) -> _TrioWaiter:
        return _TrioWaiter(self._trio.Event())

    def watch(self, fd: int, callback: Callable[[], object]) -> None:
        trio = self._trio
        # The watcher holds its own reference: an engine closed before the task
        # first runs has unwatched (self._scope is None by then), and a system
        # task that raised would take the whole trio run down.
        scope = self._scope = trio.CancelScope()
        self._fd = fd

        async def watcher() -> None:
            # A system task must never raise (trio would abort the whole run): an error
            # in dispatch is reported and the watcher keeps serving. Once unwatch() ran,
            # the fd number is dead (and may be reused): touch it no more.
            with scope:
                while not self._closing:
                    try:
                        await trio.lowlevel.wait_readable(fd)
                    except (trio.ClosedResourceError, OSError):
                        return  # unwatch() closed the fd (engine close)
                    if self._closing:
                        return
                    try:
                        os.read(fd, 8)
                    except OSError:  # EAGAIN; EINVAL: an epoll fd (pyverbs), drain consumes it
                        pass
                    try:
                        callback()
                    except Exception:
                        logging.getLogger("asyncfabric").exception("event dispatch failed")

        trio.lowlevel.spawn_system_task(watcher, name="asyncfabric-notify")

    def unwatch(self) -> None:
        self._closing = True
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None
            # The fd is closed right after; trio must forget it first, or the watcher
            # task, still parked in wait_readable, dies with EBADF and takes the run down.
            try:
                self._trio.lowlevel.notify_closing(self._fd)
            except RuntimeError:  # not inside trio any more
                pass


def current_adapter() -> LoopAdapter:
    try:
        lib = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        raise RuntimeError(
            "asyncfabric engines are opened from async code (asyncio or trio); "
            "in a script use asyncfabric.run(main()) or asyncio.run(main())"
        ) from None
    if lib == "asyncio":
        return AsyncioAdapter()
    if lib == "trio":
        return TrioAdapter()
    raise RuntimeError(f"asyncfabric supports asyncio and trio, not {lib}")
