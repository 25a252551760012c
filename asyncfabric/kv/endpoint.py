"""What both roles share: an engine whose control inbox the role owns, its paged
cache, a liveness probe target, and the loop that dispatches control messages."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import numpy as np

import asyncfabric as af

from .cache import PagedCache
from .imms import PROBE_TAG, check_slot, imm_of
from .layout import KVLayout
from .wire import Msg

# How often a side waiting on its peer checks that the peer is alive (a zero-byte write:
# a dead peer fails it within the engine's peer_timeout, at once for a dead local process).
PROBE_S = 0.2


class Endpoint:
    def __init__(self, engine: af.Engine, layout: KVLayout, slot: int, device: str) -> None:
        self.engine, self.layout, self.slot = engine, layout, check_slot(slot)
        self.cache = PagedCache(engine, layout, device)
        self._probe_buf = np.zeros(8, np.uint8)
        self._probe = engine.register(self._probe_buf)
        self.probe_imm = imm_of(self.slot, PROBE_TAG)
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        while not self._closed:
            try:
                data = await self.engine.recv()
            except af.EngineClosed:
                return
            try:
                self.on_message(Msg.decode(data))
            except Exception as exc:  # a bad message must not stop the role
                self.on_bad_message(exc)

    def on_message(self, msg: Msg) -> None:
        raise NotImplementedError

    def on_bad_message(self, exc: Exception) -> None:
        import logging

        logging.getLogger("asyncfabric.kv").warning("KV control message dropped: %s", exc)

    async def send(self, to: Any, msg: Msg) -> None:
        await self.engine.send(to, msg.encode())

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        return asyncio.get_running_loop().create_task(coro)

    async def alive(self, probe: af.Descriptor, imm: int) -> BaseException | None:
        """None if the peer owning ``probe`` took a zero-byte write, else the error."""
        try:
            await self.engine.write_imm(probe, imm, timeout=self.engine.peer_timeout)
        except (af.TransferError, af.EngineClosed, af.ImmTimeout) as exc:
            return exc
        return None

    async def aclose(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._probe.close()
        self.cache.close()

    async def __aenter__(self) -> Any:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
