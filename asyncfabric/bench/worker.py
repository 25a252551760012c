"""Benchmark worker processes and the protocol that drives them.

The runner starts two workers (a sender and a receiver) or connects to one on
another host, and calls *roles* in them: ``(name, kwargs)`` in, ``("ok",
value)`` or ``("err", text)`` out. Roles are async functions in
:mod:`asyncfabric.bench.roles`; state (engines, regions, peer sockets) lives in
the worker between calls. Only plain data crosses the pipe.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import sys
import traceback
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

import anyio


def _serve_conn(conn: Connection) -> None:
    asyncio.run(_serve(conn))


async def _serve(conn: Connection) -> None:
    from . import roles

    state = roles.State()
    loop = asyncio.get_running_loop()
    conn.send(("ok", "ready"))
    try:
        while True:
            try:
                name, kwargs = await loop.run_in_executor(None, conn.recv)
            except EOFError:
                return
            if name == "exit":
                await state.close()
                conn.send(("ok", None))
                # NIXL, Mooncake: their teardown at interpreter exit crashes (a spawned worker
                # only: `bench serve` goes on serving)
                if state.hard_exit and mp.parent_process() is not None:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(0)
                return
            try:
                fn = getattr(roles, name, None)
                if fn is None or name.startswith("_") or not asyncio.iscoroutinefunction(fn):
                    raise ValueError(f"unknown benchmark role {name!r}")
                conn.send(("ok", await fn(state, **kwargs)))
            except Exception as exc:
                conn.send(("err", f"{name}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        await state.close()


class WorkerError(RuntimeError):
    """A worker reported an error or stopped answering."""


class Worker:
    """One worker: spawned locally (``Worker.spawn``) or on another host (``Worker.connect``)."""

    def __init__(self, conn: Connection, proc: Any = None, where: str = "local") -> None:
        self._conn, self.proc, self.where = conn, proc, where

    @classmethod
    def spawn(cls, name: str) -> Worker:
        # Workers do no linear algebra: numpy's OpenBLAS pool would only add threads
        # that compete for the cores the measured ones need (spawned children take
        # the parent's environment as it is now).
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve_conn, args=(child,), daemon=True, name=name)
        proc.start()
        child.close()
        return cls(parent, proc)

    @classmethod
    def connect(cls, address: str, authkey: bytes) -> Worker:
        host, _, port = address.rpartition(":")
        try:
            conn = Client((host, int(port)), authkey=authkey)
        except (OSError, ValueError) as exc:
            raise WorkerError(
                f"cannot reach a benchmark worker at {address!r} ({exc}); start one there with "
                "`asyncfabric bench serve --listen HOST:PORT`"
            ) from None
        return cls(conn, None, address)

    async def ready(self, timeout: float = 120) -> None:
        await self._reply(timeout)

    async def _reply(self, timeout: float) -> Any:
        def get() -> Any:
            if not self._conn.poll(timeout):
                raise WorkerError(f"benchmark worker ({self.where}) gave no answer in {timeout} s")
            return self._conn.recv()

        try:
            status, value = await anyio.to_thread.run_sync(get)
        except EOFError:
            raise WorkerError(f"benchmark worker ({self.where}) died") from None
        if status != "ok":
            raise WorkerError(value)
        return value

    async def call(self, name: str, timeout: float = 300, **kwargs: Any) -> Any:
        self._conn.send((name, kwargs))
        return await self._reply(timeout)

    async def aclose(self) -> None:
        try:
            if self.proc is None or self.proc.is_alive():
                await self.call("exit", timeout=20)
        except Exception:
            pass
        if self.proc is not None:
            await anyio.to_thread.run_sync(self.proc.join, 10)
            if self.proc.is_alive():
                self.proc.kill()
                await anyio.to_thread.run_sync(self.proc.join, 5)
        self._conn.close()


def serve_forever(address: str, authkey: bytes) -> None:
    """Serve runs from other hosts, one connection at a time (``bench serve``)."""
    host, _, port = address.rpartition(":")
    with Listener((host, int(port)), authkey=authkey) as lst:
        print(f"asyncfabric bench worker listening on {address}", flush=True)
        while True:
            with lst.accept() as conn:
                _serve_conn(conn)
