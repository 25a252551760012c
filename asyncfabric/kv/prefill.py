"""The prefill side: asks a decode side for blocks and pushes the request's pages.

Pages go layer by layer (``post(layers)`` as each layer's KV is ready, so the
transfer overlaps the rest of the prefill) or all at once (``push()``). Each
post is one ``write_many`` of a prebuilt :class:`asyncfabric.Batch`: the
Python cost per post does not grow with the number of blocks.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

import asyncfabric as af

from .blocks import BlockPool
from .endpoint import PROBE_S, Endpoint
from .errors import (
    KVError,
    LayoutMismatch,
    MemberDraining,
    OutOfBlocks,
    RequestAborted,
    RequestFailed,
)
from .imms import PROBE_TAG, imm_of
from .layout import KVLayout, pages_per_block
from .plan import add_layers, expected_imms
from .wire import ABORT, ABORTED, ALLOC, DENY, GRANT, HELLO, NOTE, REFUSE, RESULT, WELCOME, Msg

_nonce = itertools.count(1)


def _peer_gone(exc: af.TransferError) -> bool:
    """Whether ``exc`` says the target went away (every failed entry of a batch)."""
    if isinstance(exc, af.BatchError):
        return bool(exc.failures) and all(
            isinstance(e, af.PeerUnreachable) for e in exc.failures.values()
        )
    return isinstance(exc, af.PeerUnreachable)


@dataclass
class DecodeLink:
    """A decode side this prefill side shook hands with."""

    address: bytes
    link: int  # our id at the decode side
    layout: KVLayout
    descriptors: list[af.Descriptor]
    probe: af.Descriptor
    probe_imm: int
    ppb: int


class PrefillRequest:
    """One request's push. ``blocks``: this side's blocks holding its KV (fill them,
    e.g. :func:`asyncfabric.kv.hf.store_layer`); ``dst_blocks``/``hits``: what the
    decode side granted; only blocks ``hits:`` are written."""

    def __init__(
        self, side: KVPrefill, link: DecodeLink, rid: str, tokens: int, blocks: np.ndarray,
        dst_blocks: np.ndarray, hits: int, imm: int,
    ) -> None:  # fmt: skip
        self.id, self.tokens, self.blocks = rid, tokens, blocks
        self.dst_blocks, self.hits, self.imm = dst_blocks, hits, imm
        self.link = link
        self.pages = expected_imms(side.layout, link.layout, link.ppb, blocks[hits:],
                                   dst_blocks[hits:], link.descriptors[0].chunk_bytes)  # fmt: skip
        self._side = side
        self._posts: list[asyncio.Task[None]] = []
        self.posted = 0  # immediates posted so far (of ``pages``)
        self._next_layer = 0
        self._aborted: str | None = None
        self._result: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._done = False

    def batch(self, layers: range) -> af.Batch:
        """The writes of ``layers`` (built once per call; post with ``post``)."""
        b = af.Batch()
        add_layers(b, self._side.cache, self.link.layout, self.link.descriptors, layers,
                   self.blocks[self.hits :], self.dst_blocks[self.hits :], self.imm,
                   self.link.ppb)  # fmt: skip
        return b

    def post(self, layers: range | int) -> asyncio.Task[None]:
        """Start writing ``layers`` (an int: that one layer), whose KV is in the
        blocks now; returns the task that ends when they are written."""
        if isinstance(layers, int):
            layers = range(layers, layers + 1)
        self._check_post(layers)
        if self.hits == len(self.blocks) or not len(layers):
            t: asyncio.Task[None] = self._side.spawn(asyncio.sleep(0))
        else:
            b = self.batch(layers)
            self.posted += len(layers) * self.pages // self._side.layout.layers
            t = self._side.spawn(self._write(b))
        self._posts.append(t)
        return t

    def _check_post(self, layers: range) -> None:
        if self._aborted is not None:
            raise RequestAborted(self.id, self._aborted)
        if self._done:
            raise KVError(f"KV request {self.id!r} was already released")
        if layers.start != self._next_layer or layers.stop > self._side.layout.layers:
            raise ValueError(
                f"post layers in order, each once: the next is {self._next_layer}, "
                f"got {layers.start}..{layers.stop - 1}"
            )
        self._next_layer = layers.stop

    async def push(self) -> None:
        """Write every layer not posted yet, then wait until all are written.
        Raises :class:`RequestFailed` when the decode side died before the pages
        landed (``result()`` then raises it too)."""
        layers = range(self._next_layer, self._side.layout.layers)
        if layers and self.hits < len(self.blocks):
            self._check_post(layers)
            b = self.batch(layers)
            self.posted += len(layers) * self.pages // self._side.layout.layers
            # awaited in this task, not a side task: the engine spins for its own
            # waiter only when nothing else is ready to run
            await self._write(b)
        self._next_layer = self._side.layout.layers
        await self.written()

    async def _write(self, b: af.Batch) -> None:
        try:
            await self._side.engine.write_many(b)
        except af.TransferError as exc:
            if not _peer_gone(exc):
                raise
            # the decode side died between granting blocks and our writes: the request
            # fails as one whose result was lost, so callers handle one exception
            err = RequestFailed(self.id, f"the decode side died while its pages were written "
                                         f"({exc})")  # fmt: skip
            self._fail(err)
            raise err from exc

    async def written(self) -> None:
        """Wait until every posted write finished (raises the first failure)."""
        if self._posts:
            await asyncio.gather(*self._posts)

    async def note(self, data: bytes) -> None:
        """Send ``data`` to the decode side's ``DecodeRequest.note()`` (small: it
        travels as a control message)."""
        await self._side.send(self.link.address, Msg(NOTE, link=self.link.link, request=self.id,
                                                     parts=[bytes(data)]))  # fmt: skip

    async def result(self, timeout: float | None = None) -> bytes:
        """The decode side's result for this request (``DecodeRequest.finish``).
        Raises :class:`RequestFailed` when the decode side died, within the
        failure-detection bound, or :class:`RequestAborted`."""
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        try:
            while True:
                step = PROBE_S if end is None else max(0.0, min(PROBE_S, end - loop.time()))
                try:
                    return await asyncio.wait_for(asyncio.shield(self._result), step)
                except asyncio.TimeoutError:
                    pass
                if end is not None and loop.time() >= end:
                    raise af.ImmTimeout(f"no result for KV request {self.id!r} in {timeout} s")
                err = await self._side.alive(self.link.probe, self.link.probe_imm)
                if err is not None:
                    self._side._lost(self.link, err)
        finally:
            if self._result.done():
                self._release()

    async def abort(self, reason: str = "aborted by the prefill side") -> None:
        """Stop writing, tell the decode side how many pages were posted (it drains
        them, then releases its blocks) and release this side's blocks."""
        if self._done or self._result.done():
            self._release()
            return
        self._aborted = reason
        await asyncio.gather(*self._posts, return_exceptions=True)
        try:
            await self._side.send(self.link.address, Msg(
                ABORT, link=self.link.link, request=self.id, num=self.posted,
                parts=[reason.encode()]))  # fmt: skip
        except af.TransferError:
            pass  # the decode side is gone: nothing of this request lives on
        self._fail(RequestAborted(self.id, reason))
        self._release()

    def _fail(self, exc: BaseException) -> None:
        if not self._result.done():
            self._result.set_exception(exc)
            self._result.exception()

    def _release(self) -> None:
        if not self._done:
            self._done = True
            self._side._requests.pop((self.link.address, self.id), None)
            self._side.pool.release(self.blocks, keep=False)

    def __repr__(self) -> str:
        return f"<PrefillRequest {self.id!r} {self.tokens} tokens, {self.pages} pages>"


class KVPrefill(Endpoint):
    """The prefill side of KV transfer on ``engine`` (it takes the engine's control inbox).

    ``await pre.connect(decode_address)`` shakes hands (raises
    :class:`LayoutMismatch` naming the field); ``await pre.submit(link, id, tokens)``
    gets blocks on the decode side (raises :class:`OutOfBlocks`, nothing written).
    """

    def __init__(
        self, engine: af.Engine, layout: KVLayout, *, slot: int = 0, device: str = "cpu"
    ) -> None:
        super().__init__(engine, layout, slot, device)
        self.pool = BlockPool(layout.blocks)
        self.links: dict[bytes, DecodeLink] = {}
        self._hellos: dict[str, asyncio.Future[Msg]] = {}
        self._grants: dict[tuple[bytes, str], asyncio.Future[Msg]] = {}
        self._requests: dict[tuple[bytes, str], PrefillRequest] = {}

    async def connect(self, address: bytes, timeout: float = 10.0) -> DecodeLink:
        """Handshake with the decode side at ``address`` (its engine's address)."""
        await self.start()
        address = bytes(address)
        if address in self.links:
            return self.links[address]
        nonce = f"hello-{next(_nonce)}"
        fut: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._hellos[nonce] = fut
        try:
            await self.send(address, Msg(HELLO, request=nonce, num=self.slot, parts=[
                self.layout.to_bytes(), self.engine.address,
                bytes(self._probe.descriptor())]))  # fmt: skip
            m = await asyncio.wait_for(fut, timeout)
        finally:
            self._hellos.pop(nonce, None)
        if m.kind == REFUSE:
            f, theirs, ours = (p.decode() for p in m.parts)
            raise LayoutMismatch(f, ours, theirs)
        layout = KVLayout.from_bytes(m.parts[0])
        self.layout.check_peer(layout)
        link = DecodeLink(
            address, m.link, layout, [af.Descriptor.from_bytes(p) for p in m.parts[2:]],
            af.Descriptor.from_bytes(m.parts[1]), imm_of(int(m.num), PROBE_TAG),
            pages_per_block(self.layout, layout),
        )  # fmt: skip
        self.links[address] = link
        return link

    async def submit(
        self,
        link: DecodeLink,
        request: str,
        tokens: int,
        *,
        prefix: Sequence[bytes] = (),
        meta: bytes = b"",
        blocks: np.ndarray | Sequence[int] | None = None,
        timeout: float | None = None,
    ) -> PrefillRequest:
        """Ask ``link``'s decode side for the blocks of a ``tokens``-token request.

        ``prefix``: hashes of the prompt's leading full blocks
        (:func:`asyncfabric.kv.block_hashes`), for prefix-cache hits;
        ``meta``: bytes the decode side gets with the request (``DecodeRequest.meta``);
        ``blocks``: this side's blocks that hold the KV, when the caller manages its
        cache itself (default: taken from this side's pool, released with the request).
        """
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
            raise ValueError(f"tokens must be a positive int, got {tokens!r}")
        n = self.layout.blocks_for(tokens)
        key = (link.address, request)
        if key in self._requests or key in self._grants:
            raise ValueError(f"request id {request!r} is already in flight to this decode side")
        if blocks is None:
            blocks, _ = self.pool.acquire(n)  # OutOfBlocks on this side: nothing sent
        else:
            blocks = np.asarray(blocks, np.int64)
            if blocks.shape != (n,) or blocks.min() < 0 or blocks.max() >= self.layout.blocks:
                raise ValueError(
                    f"blocks: {tokens} tokens take {n} blocks, each from 0 to "
                    f"{self.layout.blocks - 1}; got {blocks.tolist()[:8]}..."
                )
            self.pool.acquire_exact(blocks)
        fut: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._grants[key] = fut
        try:
            await self.send(link.address, Msg(ALLOC, link=link.link, request=request, num=tokens,
                                              blocks=blocks, parts=[meta, *prefix]))  # fmt: skip
            m = await asyncio.wait_for(fut, timeout or self.engine.peer_timeout * 2)
        except BaseException:
            self.pool.release(blocks, keep=False)
            raise
        finally:
            self._grants.pop(key, None)
        if m.kind == DENY:
            self.pool.release(blocks, keep=False)
            if m.num == -2:
                raise MemberDraining(f"the decode side is draining before it leaves; request "
                                     f"{request!r} was not taken")  # fmt: skip
            if m.num < 0:
                raise KVError(f"the decode side refused request {request!r}: "
                              f"{m.parts[0].decode()}")  # fmt: skip
            raise OutOfBlocks(int(m.num), int(m.num2))
        r = PrefillRequest(self, link, request, tokens, blocks, m.blocks, int(m.num2), int(m.num))
        self._requests[key] = r
        return r

    # ------------------------------------------------------------ messages

    def _sender(self, m: Msg) -> bytes | None:
        for a, lk in self.links.items():
            if lk.link == m.link:
                return a
        return None

    def on_message(self, m: Msg) -> None:
        if m.kind in (WELCOME, REFUSE):
            f = self._hellos.get(m.request)
            if f is not None and not f.done():
                f.set_result(m)
            return
        addr = self._sender(m)
        if addr is None:
            return
        key = (addr, m.request)
        f = self._grants.get(key)
        if f is not None and m.kind in (GRANT, DENY):
            if not f.done():
                f.set_result(m)
            return
        r = self._requests.get(key)
        if r is None:
            return
        if m.kind == RESULT and not r._result.done():
            r._result.set_result(m.parts[0])
        elif m.kind == ABORT:
            self.spawn(self._peer_abort(r, m))

    async def _peer_abort(self, r: PrefillRequest, m: Msg) -> None:
        reason = m.parts[0].decode() if m.parts else "aborted by the decode side"
        r._aborted = reason
        await asyncio.gather(*r._posts, return_exceptions=True)
        try:
            await self.send(r.link.address, Msg(ABORTED, link=r.link.link, request=r.id,
                                                num=r.posted))  # fmt: skip
        except af.TransferError:
            pass
        r._fail(RequestAborted(r.id, reason))
        r._release()

    def _lost(self, link: DecodeLink, err: BaseException) -> None:
        """The decode side died: fail the requests it held."""
        self.links.pop(link.address, None)
        for (a, _), r in list(self._requests.items()):
            if a == link.address:
                r._fail(RequestFailed(r.id, f"the decode side died ({err})"))
