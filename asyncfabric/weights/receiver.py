"""The inference side: two buffers, a counter per version, an atomic flip.

A receiver serves one buffer while the next version lands in the other.
``wait_version(v)`` waits for the counter of ``v`` to reach the plan's count,
then flips: :meth:`params` returns the new version's tensors from then on.
Readers that still hold the old version (``async with rx.reading()``) keep it
intact: only when the last of them leaves does the receiver tell the trainers
(one immediate each) that the old buffer may be overwritten by the next update.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import torch

import asyncfabric as af

from . import imms
from .endpoints import ReceiverInfo, SenderInfo
from .errors import ReceiverFailed
from .layout import Layout
from .plan import plan


class Receiver:
    """Inference rank ``rank`` of ``layout``, fed by trainers of layout ``trainer``.

    ``index``: unique among this instance's receivers (0..127); ``slot``: the
    weight-update instance on this engine (0..255); ``cast``: as in :func:`plan`.
    ``initial``: optional full tensors to serve before the first update."""

    def __init__(
        self,
        engine: af.Engine,
        layout: Layout,
        rank: int,
        trainer: Layout,
        *,
        index: int,
        name: str | None = None,
        slot: int = 0,
        cast: bool = False,
        device: Any = "cpu",
    ) -> None:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"index must be an int, got {index!r}")
        if not 0 <= index < imms.MAX_RECEIVERS:
            raise ValueError(f"index must be in 0..{imms.MAX_RECEIVERS - 1}, got {index}")
        self.engine = engine
        self.layout = layout
        self.rank = layout._rank(rank)
        self.index = index
        self.name = name or f"rx{index}"
        self.slot = imms.check_slot(slot)
        self._plan = plan(trainer, layout, cast=cast)
        self._bufs = (layout.alloc(rank, device), layout.alloc(rank, device))
        self._regions = tuple(engine.register(b) for b in self._bufs)
        self._views = tuple(layout.views(b, rank) for b in self._bufs)
        chunk = self._regions[0].descriptor().chunk_bytes
        self.expected = self._plan.expected_imms(self.rank, chunk)
        """Immediates one update delivers here (the plan's count)."""
        self._cur = 0
        self.version: int | None = None
        """The version served now (None: none received yet)."""
        self._readers = [0, 0]
        self._ack_due: int | None = None  # buffer whose readers must leave before the ack
        self._senders: tuple[SenderInfo, ...] = ()
        self.ack_failures: dict[str, Exception] = {}
        """Trainers an acknowledgement could not reach (by name), with the error."""

    @property
    def info(self) -> ReceiverInfo:
        return ReceiverInfo(
            self.name, self.index, self.rank, self.layout,
            (self._regions[0].descriptor(), self._regions[1].descriptor()),
        )  # fmt: skip

    def params(self) -> dict[str, torch.Tensor]:
        """The served version's shards (views; see :meth:`reading` to keep them intact)."""
        return self._views[self._cur]

    @property
    def buffer(self) -> torch.Tensor:
        """The served version's flat buffer."""
        return self._bufs[self._cur]

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[dict[str, torch.Tensor]]:
        """The served version's shards, kept from being overwritten until the block ends."""
        b = self._cur
        self._readers[b] += 1
        try:
            yield self._views[b]
        finally:
            self._readers[b] -= 1
            if self._ack_due == b and not self._readers[b]:
                await self._ack()

    async def start(self, senders: Sequence[SenderInfo]) -> None:
        """Tell the trainers this receiver is ready for its first update."""
        self._senders = tuple(senders)
        await self._send_ack(None)

    async def wait_version(self, version: int, *, timeout: float | None = None) -> None:
        """Wait until update ``version`` has fully landed, then serve it (atomic flip).

        Raises :class:`ReceiverFailed` if it has not landed within ``timeout``
        seconds (a trainer died or is slow); the served version stays as it was."""
        c = self.engine.counter(imms.data(self.slot, version))
        try:
            await c.wait(self.expected, timeout=timeout)
        except af.ImmTimeout:
            raise ReceiverFailed(
                f"receiver {self.name}: update {version} did not land within {timeout} s "
                f"({c.count} of {self.expected} writes arrived); a trainer is slow or gone. "
                f"Version {self.version} is still served"
            ) from None
        old = self._cur
        self._cur = 1 - old
        self.version = version
        self._ack_due = old
        if not self._readers[old]:
            await self._ack()

    async def _ack(self) -> None:
        self._ack_due = None
        await self._send_ack(self.version)

    async def _send_ack(self, version: int | None) -> None:
        imm = imms.ack(self.slot, self.index, version)
        for s in self._senders:
            try:
                await self.engine.write_imm(s.ack, imm)
            except af.TransferError as exc:
                # a trainer that is gone needs no ack; the others still get theirs
                self.ack_failures[s.name] = exc

    def close(self) -> None:
        for r in self._regions:
            r.close()
