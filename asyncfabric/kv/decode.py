"""The decode side: owns the blocks, grants them to prefill sides, counts pages in.

Push protocol (docs/kv.md): a prefill side says hello with its layout (refused,
naming the field, when they cannot exchange pages), then asks for blocks per
request (ALLOC). The decode side takes the request's blocks, prefix-cache hits
first, and a tag, and answers with where to write (GRANT: the block ids and the
immediate). The request is complete when its counter reached
``layers * (blocks - hits) * pages_per_block`` immediates: one per page.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import asyncfabric as af

from .blocks import BlockPool
from .endpoint import PROBE_S, Endpoint
from .errors import LayoutMismatch, OutOfBlocks, RequestAborted, RequestFailed
from .imms import PROBE_TAG, TagPool, imm_of
from .layout import KVLayout, pages_per_block
from .plan import expected_imms
from .wire import ABORT, ABORTED, ALLOC, DENY, GRANT, HELLO, NOTE, REFUSE, RESULT, WELCOME, Msg


@dataclass
class _Link:
    """A prefill side as the decode side knows it."""

    id: int
    address: bytes
    layout: KVLayout
    probe: af.Descriptor
    probe_imm: int
    ppb: int


def _new_link_id(links: dict[int, _Link]) -> int:
    # random, so two decode sides hardly ever give one prefill side the same link id
    while True:
        i = secrets.randbits(31) + 1
        if i not in links:
            return i


class DecodeRequest:
    """One request whose KV the decode side receives.

    ``blocks``: its blocks in this side's cache, in token order; the first
    ``hits`` came from the prefix cache and are not written. ``await wait()``
    resolves when every page landed; ``finish(result)`` hands the result to the
    prefill side that asked and releases the blocks; ``abort()`` releases them
    without a result.
    """

    def __init__(
        self, side: KVDecode, link: _Link, rid: str, tokens: int, blocks: np.ndarray,
        hits: int, tag: int, hashes: list[bytes], meta: bytes, src_blocks: np.ndarray,
    ) -> None:  # fmt: skip
        self.id, self.tokens, self.blocks, self.hits = rid, tokens, blocks, hits
        self.meta, self.tag, self.imm = meta, tag, imm_of(side.slot, tag)
        self.expected = expected_imms(
            link.layout, side.layout, link.ppb, src_blocks[hits:], blocks[hits:], side.chunk_bytes
        )
        self._side, self._link, self._hashes = side, link, hashes
        self._counter = side.engine.counter(self.imm)
        self._fail: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._landed = False
        self._done = False
        self._posted: asyncio.Future[int] | None = None  # the peer's answer to our abort
        self._notes: asyncio.Queue[bytes] = asyncio.Queue()

    @property
    def landed(self) -> bool:
        return self._landed

    async def wait(self, timeout: float | None = None) -> None:
        """Wait until every page of the request landed. Raises :class:`RequestAborted`
        when a side aborted it, :class:`RequestFailed` when the prefill side died."""
        if self._landed:
            return
        if self._done:
            raise RequestAborted(self.id, "the request was already released")
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        # The counter is awaited in this task, in steps: between steps the prefill side
        # is probed, and a failure or an abort set meanwhile is raised. A timed-out
        # step consumes nothing, so the count carries over.
        while True:
            if self._fail.done():
                self._fail.result()
            step = PROBE_S if end is None else max(0.0, min(PROBE_S, end - loop.time()))
            try:
                await self._counter.wait(self.expected, timeout=step)
            except af.ImmTimeout:
                pass
            else:
                self._landed = True
                return
            if self._fail.done():
                self._fail.result()
            if end is not None and loop.time() >= end:
                raise af.ImmTimeout(
                    f"KV request {self.id!r}: {self.expected} pages not all landed within "
                    f"{timeout} s ({self._counter.count} so far)"
                )
            err = await self._side.alive(self._link.probe, self._link.probe_imm)
            if err is not None:
                self._side._lost_link(self._link, err)

    async def note(self, timeout: float | None = None) -> bytes:
        """The next note the prefill side sent with ``PrefillRequest.note`` (e.g. the
        first generated token, known only once the prefill finished)."""
        get = asyncio.ensure_future(self._notes.get())
        either: set[asyncio.Future[Any]] = {get, self._fail}
        done, _ = await asyncio.wait(either, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        if self._fail.done():
            self._fail.result()
        raise af.ImmTimeout(f"no note for KV request {self.id!r} within {timeout} s")

    async def finish(self, result: bytes = b"") -> None:
        """Send ``result`` to the prefill side that asked, publish the full blocks to
        the prefix cache and release the request's blocks."""
        if not self._landed:
            raise RequestAborted(self.id, "finish() before wait() returned: the KV has not landed")
        if self._done:
            return
        # published while still held, so the release keeps them cached (idle), not free
        self._side.pool.publish(self.blocks, self._hashes)
        self._release(keep=True)
        try:
            await self._side.send(
                self._link.address, Msg(RESULT, link=self._link.id, request=self.id, parts=[result])
            )
        except af.TransferError as exc:
            raise RequestFailed(
                self.id, f"the prefill side is gone, result not delivered: {exc}"
            ) from exc

    async def abort(self, reason: str = "aborted by the decode side") -> None:
        """Stop the request: the prefill side stops writing, pages in flight are
        drained, the blocks and the tag are released. Idempotent."""
        if self._done:
            return
        if self._landed:
            self._release(keep=True)
            return
        side = self._side
        self._posted = asyncio.get_running_loop().create_future()
        posted: int | None = None
        try:
            await side.send(
                self._link.address,
                Msg(ABORT, link=self._link.id, request=self.id, parts=[reason.encode()]),
            )
            posted = await asyncio.wait_for(self._posted, side.engine.peer_timeout)
        except (af.TransferError, asyncio.TimeoutError):
            posted = None  # the prefill side is gone: nothing more will land
        self._fail_with(RequestAborted(self.id, reason))
        await self._drain(posted)
        self._release(keep=False)

    async def _drain(self, posted: int | None) -> None:
        """Consume what arrived (or ``posted``, all the peer wrote), so the tag is clean."""
        # A wait() in progress queues ahead of this one; it gives up within a probe
        # step (consuming nothing) once it sees the failure set before this drain.
        c = self._counter
        n = c.count if posted is None else posted
        if n:
            try:
                await c.wait(n, timeout=self._side.engine.peer_timeout)
            except af.ImmTimeout:
                # Pages are lost with a dead peer; retire the tag rather than reuse it.
                self.tag = -1

    def _fail_with(self, exc: BaseException) -> None:
        if not self._fail.done():
            self._fail.set_exception(exc)
            self._fail.exception()  # retrieved: no "never retrieved" warning when unawaited

    def _release(self, keep: bool) -> None:
        if self._done:
            return
        self._done = True
        side = self._side
        side._requests.pop((self._link.id, self.id), None)
        hits, fresh = self.blocks[: self.hits], self.blocks[self.hits :]
        side.pool.release(hits, keep=True)
        side.pool.release(fresh, keep=keep)
        if self.tag >= 0:
            side.tags.give(self.tag)

    def __repr__(self) -> str:
        return (f"<DecodeRequest {self.id!r} {self.tokens} tokens, {len(self.blocks)} blocks "
                f"({self.hits} cached), {self.expected} pages>")  # fmt: skip


class KVDecode(Endpoint):
    """The decode side of KV transfer on ``engine`` (it takes the engine's control inbox).

    ``slot`` separates KV instances on one engine (bits 20-27 of their immediates).
    Use ``async with KVDecode(...) as dec`` and take granted requests with
    ``await dec.next_request()``.
    """

    def __init__(
        self, engine: af.Engine, layout: KVLayout, *, slot: int = 0, device: str = "cpu"
    ) -> None:
        super().__init__(engine, layout, slot, device)
        self.pool = BlockPool(layout.blocks)
        self.tags = TagPool(self.slot)
        self._links: dict[int, _Link] = {}
        self._requests: dict[tuple[int, str], DecodeRequest] = {}
        self._queue: asyncio.Queue[DecodeRequest] = asyncio.Queue()
        self.refused: list[LayoutMismatch] = []  # handshakes refused, for the operator
        self.chunk_bytes = self.cache.descriptors()[0].chunk_bytes
        self.draining = False

    @property
    def requests(self) -> Sequence[DecodeRequest]:
        """Requests granted and not yet released."""
        return list(self._requests.values())

    async def drain(self, timeout: float | None = None) -> None:
        """Take no new requests (their ALLOC is refused as draining, and a router sends
        them elsewhere) and return once every request in flight was released."""
        self.draining = True
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        while self._requests:
            if end is not None and loop.time() > end:
                raise af.ImmTimeout(
                    f"{len(self._requests)} KV requests still in flight after {timeout} s"
                )
            await asyncio.sleep(0.01)

    async def next_request(self, timeout: float | None = None) -> DecodeRequest:
        """The next granted request (its pages may still be landing: ``await req.wait()``)."""
        return await asyncio.wait_for(self._queue.get(), timeout)

    async def aclose(self) -> None:
        for r in list(self._requests.values()):
            r._fail_with(RequestAborted(r.id, "the decode side closed"))
            r._release(keep=False)
        await super().aclose()

    # ------------------------------------------------------------ messages

    def on_message(self, m: Msg) -> None:
        if m.kind == HELLO:
            self.spawn(self._hello(m))
        elif m.kind == ALLOC:
            self._alloc(m)
        elif m.kind == ABORT:
            r = self._requests.get((m.link, m.request))
            if r is not None:
                self.spawn(self._peer_abort(r, m))
        elif m.kind == NOTE:
            r = self._requests.get((m.link, m.request))
            if r is not None:
                r._notes.put_nowait(m.parts[0])
        elif m.kind == ABORTED:
            r = self._requests.get((m.link, m.request))
            if r is not None and r._posted is not None and not r._posted.done():
                r._posted.set_result(int(m.num))

    async def _hello(self, m: Msg) -> None:
        theirs = KVLayout.from_bytes(m.parts[0])
        address = m.parts[1]
        try:
            self.layout.check_peer(theirs)
        except LayoutMismatch as exc:
            self.refused.append(exc)
            await self.send(
                address,
                Msg(
                    REFUSE,
                    request=m.request,
                    parts=[exc.field.encode(), repr(exc.theirs).encode(), repr(exc.ours).encode()],
                ),
            )
            return  # fmt: skip
        link = _Link(
            _new_link_id(self._links), address, theirs, af.Descriptor.from_bytes(m.parts[2]),
            imm_of(int(m.num), PROBE_TAG), pages_per_block(self.layout, theirs),
        )  # fmt: skip
        self._links[link.id] = link
        parts = [self.layout.to_bytes(), bytes(self._probe.descriptor())]
        parts += [bytes(d) for d in self.cache.descriptors()]
        await self.send(address, Msg(WELCOME, link=link.id, request=m.request, num=self.slot,
                                     parts=parts))  # fmt: skip

    def _alloc(self, m: Msg) -> None:
        link = self._links.get(m.link)
        if link is None:
            return
        if self.draining:
            self.spawn(self.send(link.address, Msg(DENY, link=link.id, request=m.request,
                                                   num=-2)))  # fmt: skip
            return
        tokens, meta, hashes = int(m.num), m.parts[0], m.parts[1:]
        n = self.layout.blocks_for(tokens)
        try:
            if len(m.blocks) != n:
                raise ValueError(
                    f"request {m.request!r}: {tokens} tokens take {n} blocks of "
                    f"{self.layout.block_tokens}, but {len(m.blocks)} source blocks came"
                )
            if (m.link, m.request) in self._requests:
                raise ValueError(f"request id {m.request!r} is already in flight on this link")
            blocks, hits = self.pool.acquire(n, hashes)
        except OutOfBlocks as exc:
            self.spawn(self.send(link.address, Msg(DENY, link=link.id, request=m.request, num=exc.need,
                                                   num2=exc.free)))  # fmt: skip
            return
        except ValueError as exc:
            self.spawn(self.send(link.address, Msg(DENY, link=link.id, request=m.request, num=-1,
                                                   parts=[str(exc).encode()])))  # fmt: skip
            return
        try:
            tag = self.tags.take()
        except Exception as exc:
            self.pool.release(blocks)
            self.spawn(self.send(link.address, Msg(DENY, link=link.id, request=m.request, num=-1,
                                                   parts=[str(exc).encode()])))  # fmt: skip
            return
        r = DecodeRequest(self, link, m.request, tokens, blocks, hits, tag, hashes, meta, m.blocks)
        self._requests[(link.id, r.id)] = r
        self.spawn(self._grant(link, r))

    async def _grant(self, link: _Link, r: DecodeRequest) -> None:
        try:
            await self.send(link.address, Msg(GRANT, link=link.id, request=r.id, num=r.imm, num2=r.hits,
                                              blocks=r.blocks))  # fmt: skip
        except af.TransferError as exc:
            self._lost_link(link, exc)
            return
        self._queue.put_nowait(r)

    async def _peer_abort(self, r: DecodeRequest, m: Msg) -> None:
        reason = m.parts[0].decode() if m.parts else "aborted by the prefill side"
        r._fail_with(RequestAborted(r.id, reason))
        await r._drain(int(m.num))
        r._release(keep=False)

    def _lost_link(self, link: _Link, err: BaseException) -> None:
        """The prefill side died: fail and release the requests it was writing."""
        self._links.pop(link.id, None)
        for (lid, _), r in list(self._requests.items()):
            if lid == link.id and not r._landed:
                r._fail_with(RequestFailed(r.id, f"the prefill side died ({err})"))
                self.spawn(self._reap(r))

    async def _reap(self, r: DecodeRequest) -> None:
        await r._drain(None)
        r._release(keep=False)
