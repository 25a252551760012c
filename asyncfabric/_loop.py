"""Event-loop adapters: asyncio and trio, picked at engine open with sniffio.

The engine needs three things from a loop: a waiter (future) it can resolve
from a callback, a way to await it with a timeout, and a callback when the
transport's notify fd is readable. anyio alone would hide the fd watcher
behind a task group, which cannot outlive a Jupyter cell; so each loop gets
its own small adapter.
"""

from __future__ import annotations

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

    def new_waiter(self) -> Any:
        raise NotImplementedError

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        raise NotImplementedError

    def unwatch(self) -> None:
        raise NotImplementedError

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
        self.new_waiter = self.loop.create_future  # type: ignore[method-assign]
        self._fd: int | None = None

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
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

    def new_waiter(self) -> _TrioWaiter:
        return _TrioWaiter(self._trio.Event())

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        trio = self._trio
        self._scope = trio.CancelScope()

        async def watcher() -> None:
            # A system task must never raise (trio would abort the whole run): an error
            # in dispatch is reported and the watcher keeps serving.
            with self._scope:
                while True:
                    await trio.lowlevel.wait_readable(fd)
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
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None


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
