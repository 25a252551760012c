"""The Engine: where transfers are submitted and their completions awaited.

The path of one transfer (docs/design.md has the full picture)::

    await write()  --validate, O(1)-->  Transport.post_write (native: chunk, stripe, post)
        transport progress: completions -> count immediates / retire chunks
        -> one event per finished transfer or satisfied counter -> notify fd
    event loop: notify fd readable -> Engine._drain -> resolve the waiting future

The engine knows transports only through ``asyncfabric.transport``: it imports
no backend, and memory kinds (host, GPU) are the transport's business.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from .._buffers import buffer_info
from .._errors import (
    BatchError,
    EngineClosed,
    ImmTimeout,
    PeerUnreachable,
    RegionError,
    TransferError,
)
from .._flag import DeviceWord, Flag, check_reset, check_u32
from ..transport import registry
from ..transport.batching import SUB_BIT, split_sub
from ..transport.contract import PagedWrite, Remote, Target, Transport, WriteBatch
from ..transport.counting import NO_IMM, check_imm
from ..transport.events import CounterReady, Fatal, Message, OpDone
from . import fastpath
from .address import EngineAddress, host_id
from .batch import Batch, Compiled
from .counter import ImmCounter
from .descriptor import FLAG_STAGED, Descriptor, RemoteSlice
from .fastpath import DONE, DONE_EVENTS, FAILED, LAST_CODE
from .loop import LoopAdapter, current_adapter
from .policy import ProgressPolicy
from .region import Region, RegionSlice, flags_for
from .trigger import Release, Trigger, _TrigHold

DEFAULT_CHUNK = 1 << 20
# uids of engines closed in this process: a descriptor naming one is refused up
# front (libfabric's shm crashes inserting the address of a closed endpoint of
# its own process).
_CLOSED_UIDS: set[bytes] = set()
DEFAULT_CTRL_MAX = 8192


class Peer:
    """Another engine as this one reaches it: ``id`` is the transport's peer index."""

    __slots__ = ("id", "ndom", "address")

    def __init__(self, pid: int, ndom: int, address: EngineAddress) -> None:
        self.id, self.ndom, self.address = pid, ndom, address


class _Route:
    """What one engine needs to post into a descriptor's region, checked once.

    Cached in the descriptor under the engine's uid, so a stream of writes to the
    same destination pays for validation, the peer lookup and the transport's
    view of bases and keys on the first write only. A target in this very engine
    is checked on every write: its region may be unregistered in between."""

    __slots__ = ("remote", "self_target")

    def __init__(self, remote: Remote, self_target: bool) -> None:
        self.remote, self.self_target = remote, self_target


class Engine:
    """An endpoint on one or more domains (NICs). Open it with ``async with``.

    ``provider``: ``"auto"`` (efa, then verbs, then tcp; shm with
    ``local_only=True``; cuda_ipc with ``local_only=True, nvlink=True`` when CUDA
    is here), a libfabric provider (``"shm"``, ``"tcp"``, ``"efa"``,
    ``"verbs;ofi_rxm"``), ``"BACKEND:PROVIDER"``, or a backend's name.
    ``domains``: how many domains to stripe over (several NICs; on loopback
    several instances stand in). ``node``: the local address to bind (tcp,
    verbs). ``chunk_bytes``: the largest single write; a longer write is split,
    one immediate per chunk. ``peer_timeout``: a transfer the peer does not take
    within this many seconds fails with :class:`PeerUnreachable`. ``cuda``: how
    GPU tensors travel, handed to the transport (docs/gpu.md): ``"auto"``,
    ``"direct"`` or ``"staged"``. ``workers``: progress threads, each owning
    ``domains / workers`` of the domains (several NICs on a machine with cores to
    spare; docs/progress.md); ``cpus``: CPUs to pin them to (a list, or ``"auto"``
    for this process's CPUs in order); default: one thread, not pinned.
    """

    def __init__(
        self,
        provider: str = "auto",
        *,
        domains: int = 1,
        node: str | None = None,
        chunk_bytes: int | None = None,
        progress: ProgressPolicy | None = None,
        ctrl_max: int = DEFAULT_CTRL_MAX,
        local_only: bool = False,
        peer_timeout: float = 5.0,
        cuda: str = "auto",
        nvlink: bool = False,
        workers: int = 1,
        cpus: Any = None,
    ) -> None:
        if isinstance(domains, bool) or not isinstance(domains, int) or not 1 <= domains <= 16:
            raise ValueError(f"domains must be an int from 1 to 16, got {domains!r}")
        if chunk_bytes is not None and (
            isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0
        ):
            raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        if (
            isinstance(peer_timeout, bool)
            or not isinstance(peer_timeout, (int, float))
            or not peer_timeout > 0
        ):
            raise ValueError(f"peer_timeout must be > 0 seconds, got {peer_timeout!r}")
        self.peer_timeout = float(peer_timeout)
        if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= domains:
            raise ValueError(
                f"workers must be an int from 1 to domains ({domains}), got {workers!r}: each "
                "progress worker owns at least one domain"
            )
        self._workers = workers
        self._cpus = _check_cpus(cpus)
        if (
            isinstance(ctrl_max, bool)
            or not isinstance(ctrl_max, int)
            or not 64 <= ctrl_max <= 1 << 20
        ):
            raise ValueError(f"ctrl_max must be an int from 64 to 1 MiB, got {ctrl_max!r}")
        if cuda not in ("auto", "direct", "staged"):
            raise ValueError(f"cuda must be 'auto', 'direct' or 'staged', got {cuda!r}")
        self._cuda = cuda
        self._backend, self._provider_req = registry.resolve(
            provider, local_only=local_only, nvlink=nvlink
        )
        self._spec = provider
        self._domains = domains
        self._node = node
        self._chunk_req = chunk_bytes
        self.policy = progress or ProgressPolicy()
        self._ctrl_max = ctrl_max
        self._t: Transport = None  # type: ignore[assignment]
        self._opened = False
        self._closed = False
        self._fatal: BaseException | None = None

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    async def open(cls, provider: str = "auto", **kwargs: Any) -> Engine:
        """Open an engine without ``async with`` (for notebooks); close it with ``await aclose()``."""
        eng = cls(provider, **kwargs)
        await eng._open()
        return eng

    async def _open(self) -> None:
        if self._opened:
            raise RuntimeError("engine is already open")
        self._loop: LoopAdapter = current_adapter()
        t = self._t = registry.open_resolved(
            self._backend,
            self._provider_req,
            domains=self._domains,
            node=self._node,
            ctrl_max=self._ctrl_max,
            cuda=self._cuda,
        )
        self._opened = True
        self.chunk_bytes = min(self._chunk_req or DEFAULT_CHUNK, t.max_msg_size)
        self._addr = EngineAddress(
            os.urandom(8), t.backend, t.provider, tuple(t.addresses), host_id(), os.getpid()
        )
        self._addr_bytes = self._addr.to_bytes()
        # the native fast path (fastpath.py) or its stand-in; tokens come from it
        self._fp: Any = fastpath.NoFastPath()
        self._next_token = self._fp.next_token
        # token -> (waiter, what it holds: its source Region, a _BatchHold, or None)
        self._ops: dict[int, tuple[Any, Any]] = {}
        self._counters: dict[int, ImmCounter] = {}
        self._peers: dict[bytes, Peer] = {}
        self._regions: dict[int, Region] = {}
        self._region_ids = itertools.count(1)
        self._inbox: deque[bytes] = deque()
        self._recv_waiters: deque[Any] = deque()
        self._wait_spin_ns = int(self.policy.wait_spin_us * 1e3)
        self._draining = False
        self._left: list[int] = []  # tokens the fast path's complete() hands back
        try:
            t.start(
                dataclasses.replace(
                    self.policy.to_ns(),
                    post_timeout_ns=int(self.peer_timeout * 1e9),
                    workers=self._workers,
                    cpus=self._cpus,
                )
            )
            self._loop.watch(t.notify_fd, self._drain)
            self._fp = fastpath.make(
                self, self._addr.uid, t, getattr(self._loop, "_ready", None),
                RegionSlice, RemoteSlice, Region, Descriptor, _Route,
            )  # fmt: skip
            self._next_token = self._fp.next_token
            if self._fp.on:
                self._fp.new_waiter = self._loop.new_waiter
                self._fp.waiters = fastpath.waiters(self._loop.waiter_loop)
        except BaseException:
            self._closed = True
            t.close()
            raise

    async def __aenter__(self) -> Engine:
        await self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close: pending transfers and waits fail with EngineClosed; registrations are released."""
        self.close()

    def close(self) -> None:
        """Synchronous :meth:`aclose` (for ``finally`` blocks and ``__del__``-free cleanup)."""
        if self._closed or not self._opened:
            self._closed = True
            return
        self._closed = True
        self._fp.on = 0  # before the transport closes: its native table goes with it
        self._loop.unwatch()
        self._fail_all(EngineClosed("the engine was closed while this was pending"))
        # What the transport may still write (a batch's status array) stays alive
        # until it is closed.
        ops, self._ops = self._ops, {}
        regions = list(self._regions.values())
        for r in regions:
            r._closed = True
        self._regions.clear()
        self._t.close()
        del ops
        for r in regions:
            r._run_close_cbs()
        _CLOSED_UIDS.add(self._addr.uid)

    def _fail_all(self, exc: BaseException) -> None:
        """Fail every pending transfer, counter wait and recv with ``exc``."""
        for w, h in self._ops.values():
            if isinstance(h, _TrigHold):
                h.fail(exc)
            elif not w.done():
                w.set_exception(exc)
        for c in self._counters.values():
            c._fail_all(exc)
        while self._recv_waiters:
            w = self._recv_waiters.popleft()
            if not w.done():
                w.set_exception(exc)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosed("the engine is closed; open a new Engine")
        if not self._opened:
            raise EngineClosed(
                "the engine is not open yet: use `async with Engine(...)` or `await Engine.open(...)`"
            )
        if self._fatal is not None:
            raise TransferError(
                f"the engine's transport failed earlier ({self._fatal}); nothing more can be "
                "sent or received on it: close it and open a new Engine"
            ) from self._fatal

    # ---------------------------------------------------------------- properties

    @property
    def address(self) -> bytes:
        """This engine's address: give these bytes to peers (out of band)."""
        self._check_open()
        return self._addr_bytes

    @property
    def provider(self) -> str:
        """The provider in use (``"shm"``, ``"tcp"``, ``"efa"``...), resolved from ``"auto"``."""
        self._check_open()
        return self._t.provider

    @property
    def backend(self) -> str:
        """The backend's name (``"libfabric"``, ``"pyverbs"``, ``"cuda_ipc"``)."""
        return self._backend.name

    @property
    def domains(self) -> int:
        """How many domains (NICs) this engine stripes over."""
        return self._domains

    @property
    def max_msg_size(self) -> int:
        """The provider's largest single message; ``chunk_bytes`` never exceeds it."""
        self._check_open()
        return self._t.max_msg_size

    @property
    def ctrl_max(self) -> int:
        """Largest message send() takes."""
        return self._ctrl_max

    @property
    def transport(self) -> Transport:
        """The transport under this engine (the contract of ``asyncfabric.transport``)."""
        if self._closed:
            raise EngineClosed("the engine is closed; open a new Engine")
        if not self._opened:
            raise EngineClosed("the engine is not open yet")
        return self._t

    def stats(self) -> dict[str, int]:
        """Native counters: completions, immediates, posts, EAGAINs, live registrations..."""
        self._check_open()
        st = self._t.stats()
        st["live_counters"] = self._t.counters_live()
        st["live_regions"] = len(self._regions)
        st["pending_ops"] = len(self._ops)
        return st

    # ---------------------------------------------------------------- memory

    def register(self, buf: Any, *, remote_write: bool = True, remote_read: bool = True) -> Region:
        """Register a bytes-like object, numpy array or contiguous torch tensor.

        Which memory kinds work is the transport's to say (``transport.devices``):
        host memory everywhere, GPU tensors where a transport takes them (directly,
        staged through host memory, or over CUDA IPC; docs/gpu.md).
        """
        self._check_open()
        info = buffer_info(buf)
        t = self._t
        if info.device not in t.devices:
            raise RegionError(
                f"{info.device} memory cannot be registered on {t.backend}:{t.provider} "
                f"(it takes {', '.join(sorted(t.devices))} memory); register host memory, "
                "or install what the transport needs for this kind (docs/gpu.md)"
            )
        if info.readonly and remote_write:
            raise RegionError(
                "buffer is read-only; register it with remote_write=False to use it only as a source"
            )
        reg = t.register(
            info.ptr,
            info.nbytes,
            remote_write=remote_write,
            remote_read=remote_read,
            device=info.device,
            device_index=info.device_index,
            owner=info.owner,
        )
        rid = next(self._region_ids) & 0xFFFFFFFF
        flags = flags_for(remote_write, remote_read) | (FLAG_STAGED if reg.staged else 0)
        region = Region(self, info, reg, rid, flags)
        self._regions[rid] = region
        return region

    def region_of(self, desc: Descriptor) -> Region | None:
        """The live region of this engine that ``desc`` describes, or None (another
        engine's descriptor, or a region since closed)."""
        if not isinstance(desc, Descriptor):
            raise TypeError(f"region_of takes a Descriptor, got {type(desc).__name__}")
        self._check_open()
        if desc.address.uid != self._addr.uid:
            return None
        return self._regions.get(desc.region_id)

    def _deregister(self, region: Region) -> None:
        if not self._closed:
            self._t.deregister(region._reg)

    # ---------------------------------------------------------------- peers

    def connect(self, address: bytes | Descriptor | EngineAddress) -> Peer:
        """Make a peer reachable (idempotent); writes and sends do this on their own."""
        self._check_open()
        if isinstance(address, Descriptor):
            ea = address.address
        elif isinstance(address, EngineAddress):
            ea = address
        elif isinstance(address, (bytes, bytearray, memoryview)):
            ea = EngineAddress.from_bytes(address)
        else:
            raise TypeError(
                f"expected a peer's address bytes or a Descriptor, got {type(address).__name__}"
            )
        return self._peer(ea)

    def _peer(self, ea: EngineAddress) -> Peer:
        key = ea.uid
        p = self._peers.get(key)
        if p is not None:
            return p
        if key in _CLOSED_UIDS:
            raise PeerUnreachable("the engine this address or descriptor belongs to was closed")
        if ea.backend != self._t.backend or ea.provider != self._t.provider:
            raise TransferError(
                f"the peer speaks {ea.backend}:{ea.provider}, this engine speaks "
                f"{self._t.backend}:{self._t.provider}; open both engines on the same provider"
            )
        watch = ea.same_host and ea.pid > 0 and ea.pid != os.getpid()
        if watch and not _pid_alive(ea.pid):
            # never hand a dead process's address to the provider (shm would map its
            # stale shared memory and "deliver" into it)
            raise PeerUnreachable(
                f"the process (pid {ea.pid}) that owns this address or descriptor has exited; "
                "get a fresh address from a live engine"
            )
        ndom = min(len(ea.domains), self._t.ndomains)
        pid = self._t.add_peer(ea.domains[:ndom])
        if watch:
            self._t.watch_peer(pid, ea.pid)
        p = Peer(pid, ndom, ea)
        self._peers[key] = p
        return p

    def _route(self, desc: Descriptor, read: bool = False) -> _Route:
        """Check ``desc`` as a destination (a source, ``read``) of this engine; the
        result is cached in it."""
        key = self._addr.uid  # unique per engine, unlike id(self) after a close
        ckey = key + b"r" if read else key
        r = desc._cache.get(ckey)
        if r is None:
            self._check_target(desc, read)
            peer = self._peer(desc.address)
            target = Target(
                desc.bases, desc.keys, desc.nbytes, desc.chunk_bytes, desc.ext, desc.staged
            )
            r = _Route(self._t.remote(peer.id, peer.ndom, target), desc.address.uid == key)
            desc._cache[ckey] = r
        elif r.self_target:
            self._check_target(desc, read)
        return r

    # ---------------------------------------------------------------- transfers

    def _local(self, src: Any) -> RegionSlice:
        if isinstance(src, Region):
            src = src[:]
        if not isinstance(src, RegionSlice):
            raise TypeError(
                f"the source must be a Region or region[a:b] of this engine, got {type(src).__name__}"
                " (register the buffer first: engine.register(buf))"
            )
        region = src.region
        if region._engine is not self:
            raise RegionError("the source region is registered with another engine")
        if region._closed:
            raise RegionError("the source region was unregistered; register the buffer again")
        return src

    @staticmethod
    def _remote_slice(dst: Any) -> RemoteSlice:
        if isinstance(dst, Descriptor):
            return dst[:]
        if isinstance(dst, RemoteSlice):
            return dst
        if isinstance(dst, (Region, RegionSlice)):
            raise TypeError(
                "the destination must be a peer's Descriptor (or desc[a:b]), not a local Region; "
                "use region.descriptor() on the receiving side and send its bytes"
            )
        raise TypeError(
            f"the destination must be a Descriptor or desc[a:b], got {type(dst).__name__}"
        )

    def _check_target(self, desc: Descriptor, read: bool = False) -> None:
        if desc.address.uid == self._addr.uid:
            r = self._regions.get(desc.region_id)
            if r is None or r._reg.keys != desc.keys:
                raise RegionError(
                    "the destination descriptor is for a region this engine has unregistered"
                )
        if read:
            if not desc.remote_read:
                raise RegionError(
                    "the peer's region was registered with remote_read=False; register it "
                    "with remote_read=True to read from it"
                )
        elif not desc.remote_write:
            raise RegionError("the destination region was registered with remote_write=False")
        if desc.chunk_bytes > self._t.max_msg_size:
            raise TransferError(
                f"the peer's chunk_bytes ({desc.chunk_bytes}) exceeds this provider's max message "
                f"size ({self._t.max_msg_size})"
            )

    async def write(
        self,
        src: Region | RegionSlice,
        dst: Descriptor | RemoteSlice,
        *,
        imm: int | None = None,
        timeout: float | None = None,
        stream: Any = None,
    ) -> None:
        """One-sided write of ``src`` into ``dst``; done when the source buffer may be reused.

        With ``imm``, each chunk carries it: the receiver's counter for ``imm``
        grows by ``dst.descriptor.expected_imms(nbytes)``. A GPU source is read
        only after the work already queued on ``stream`` (default: the current
        stream of its device) at the time of the call (docs/gpu.md).
        """
        if stream is None:
            # The native fast path (fastpath.py): the same checks, then the post, in
            # one call; anything it does not take goes the Python way below.
            # A transfer that ends by an event comes back as its registered waiter.
            r = self._fp.write_wait(src, dst, imm, self._ops, self._left)
            if r.__class__ is not int:
                # write_wait ended what it could of the events its post queued and
                # left the rest to us (act: 1 drain, 2 the loop is idle: spin)
                act = self._fp.act
                if act:
                    if act & 1:
                        self._drain()
                    if act & 2:  # _spin_for looks at done() itself
                        self._spin_for(r)
                if timeout is None:  # the hot path: await the future itself
                    await r
                else:
                    await self._wait_op(r, timeout)
                return
            if r == DONE:
                return
            if r > LAST_CODE:
                w = self._waiter(r, src if isinstance(src, Region) else src.region)
                await self._wait_op(w, timeout)
                return
            if r == DONE_EVENTS:
                self._drain()
                return
            if r == FAILED:
                self._after_call()  # what the call queued on the way (_post says why)
                raise self._t.error(self._fp.status, "write")
        self._check_open()
        s = self._local(src)
        d = self._remote_slice(dst)
        n = s.nbytes
        if n != d.nbytes:
            raise ValueError(f"source has {n} bytes but destination has {d.nbytes}")
        imm_v = NO_IMM if imm is None else check_imm(imm)
        route = self._route(d.descriptor)
        region = s.region
        token = self._next_token()
        if stream is None:
            done = self._post(
                self._t.post_write, token, route.remote, d.offset, region._reg, s.offset, n, imm_v
            )
        else:
            done = self._post(
                self._t.post_write,
                token, route.remote, d.offset, region._reg, s.offset, n, imm_v, stream,
            )  # fmt: skip
        if done:  # finished inside the call (injected): no waiter, no event
            self._after_call()
        else:
            await self._await_op(token, region, timeout)

    async def write_imm(
        self, dst: Descriptor | RemoteSlice, imm: int, *, timeout: float | None = None
    ) -> None:
        """A zero-byte write that only delivers ``imm`` (one immediate) to ``dst``'s engine."""
        r = self._fp.write_imm(dst, imm)
        if r == DONE:
            return
        if r > LAST_CODE:
            await self._await_op(r, None, timeout)
            return
        if r == DONE_EVENTS:
            self._drain()
            return
        if r == FAILED:
            self._after_call()
            raise self._t.error(self._fp.status, "write of an immediate")
        self._check_open()
        d = self._remote_slice(dst)
        imm_v = check_imm(imm)
        route = self._route(d.descriptor)
        token = self._next_token()
        if self._post(self._t.post_write, token, route.remote, d.offset, None, 0, 0, imm_v):
            self._after_call()
        else:
            await self._await_op(token, None, timeout)

    async def write_paged(
        self,
        src: Region,
        dst: Descriptor,
        src_pages: Any,
        dst_pages: Any,
        *,
        page_size: int,
        src_stride: int | None = None,
        dst_stride: int | None = None,
        src_offset: int = 0,
        dst_offset: int = 0,
        imm: int | None = None,
        timeout: float | None = None,
    ) -> int:
        """Write pages: page ``i`` goes from ``src_offset + src_pages[i] * src_stride``
        to ``dst_offset + dst_pages[i] * dst_stride``, ``page_size`` bytes each.

        One immediate per page (when ``imm`` is given). Returns the page count.
        """
        self._check_open()
        s = self._local(src)
        if s.offset or s.nbytes != s.region.nbytes:
            raise TypeError(
                "write_paged takes a whole Region as the source; use src_offset to shift"
            )
        if not isinstance(dst, Descriptor):
            raise TypeError(
                "write_paged takes a whole Descriptor as the destination; use dst_offset to shift"
            )
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        if page_size > dst.chunk_bytes:
            raise ValueError(
                f"page_size {page_size} exceeds the target's chunk_bytes {dst.chunk_bytes}"
            )
        ss = page_size if src_stride is None else src_stride
        ds = page_size if dst_stride is None else dst_stride
        for name, v in (
            ("src_stride", ss),
            ("dst_stride", ds),
            ("src_offset", src_offset),
            ("dst_offset", dst_offset),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        sp = _page_array(src_pages, "src_pages")
        dp = _page_array(dst_pages, "dst_pages")
        if sp.shape != dp.shape:
            raise ValueError(f"src_pages has {sp.size} entries but dst_pages has {dp.size}")
        n = int(sp.size)
        imm_v = NO_IMM if imm is None else check_imm(imm)
        route = self._route(dst)
        if not n:
            return 0
        src_off = np.ascontiguousarray(src_offset + sp * np.uint64(ss), np.uint64)
        dst_off = np.ascontiguousarray(dst_offset + dp * np.uint64(ds), np.uint64)
        if int(src_off.max()) + page_size > s.region.nbytes:
            raise RegionError(
                f"a source page reaches byte {int(src_off.max()) + page_size}, past the "
                f"{s.region.nbytes}-byte source region"
            )
        if int(dst_off.max()) + page_size > dst.nbytes:
            raise RegionError(
                f"a destination page reaches byte {int(dst_off.max()) + page_size}, past the "
                f"{dst.nbytes}-byte destination region"
            )
        region = s.region
        token = self._next_token()
        op = PagedWrite(token, route.remote, region._reg, src_off, dst_off, page_size, imm_v)
        if self._post(self._t.post_paged, op):
            self._after_call()
        else:
            await self._await_op(token, region, timeout)
        return n

    async def write_many(
        self, ops: Batch | Any, *, imm: int | None = None, timeout: float | None = None
    ) -> None:
        """Post many writes in one call and wait for all of them.

        ``ops``: a :class:`Batch` (build it once, post it again and again: O(1)
        Python per post), or ``(src, dst)`` / ``(src, dst, imm)`` tuples, ``imm``
        being the default immediate. The writes may go to many peers; each is
        chunked and counted like :meth:`write`. Every entry is checked before
        anything is posted (the error names the first bad one). When some fail,
        :class:`BatchError` says which (``failures``: index to exception); the
        others landed.
        """
        self._check_open()
        batch = ops if isinstance(ops, Batch) else Batch.of(ops, imm=imm)
        await self._post_batch(batch.compile(self), timeout)

    async def scatter(
        self,
        src: Region | RegionSlice,
        targets: Any,
        *,
        imm: int | None = None,
        timeout: float | None = None,
    ) -> None:
        """Slices of one source to many peers' descriptors, in one call.

        ``targets``: destinations (``Descriptor`` or ``desc[a:b]``), filled from
        consecutive slices of ``src`` in order; or ``(src_offset, dst)`` pairs,
        each slice starting at its offset into ``src``."""
        self._check_open()
        s = self._local(src)
        b = Batch()
        pos = 0
        for i, t in enumerate(targets):
            if isinstance(t, tuple):
                if len(t) != 2 or isinstance(t[0], bool) or not isinstance(t[0], int):
                    raise TypeError(f"scatter target {i}: expected (src_offset, dst), got {t!r}")
                pos, t = t
            d = self._remote_slice(t)
            if pos < 0 or pos + d.nbytes > s.nbytes:
                raise RegionError(
                    f"scatter target {i}: {d.nbytes} bytes at offset {pos} reach past the "
                    f"{s.nbytes}-byte source"
                )
            b.add(s.region[s.offset + pos : s.offset + pos + d.nbytes], d, imm=imm)
            pos += d.nbytes
        if not len(b):
            raise ValueError("scatter needs at least one target")
        await self._post_batch(b.compile(self), timeout)

    async def barrier(self, targets: Any, imm: int, *, timeout: float | None = None) -> None:
        """One immediate ``imm`` to each target's engine (a zero-byte write per
        descriptor), in one call. Each receiver's counter for ``imm`` grows by one
        per target naming it."""
        self._check_open()
        b = Batch()
        for t in targets:
            b.add_imm(t, imm)
        if not len(b):
            raise ValueError("barrier needs at least one target")
        await self._post_batch(b.compile(self), timeout)

    async def read(
        self,
        dst: Region | RegionSlice,
        src: Descriptor | RemoteSlice,
        *,
        timeout: float | None = None,
    ) -> None:
        """One-sided read (pull): ``src``, a slice of a peer's region, into local ``dst``.

        The peer's region must be registered with ``remote_read=True`` (the
        default). No immediate reaches the peer: it does not learn of the read.
        Transports without one-sided reads raise :class:`Unsupported`."""
        self._check_open()
        s = self._local(dst)
        d = self._remote_slice(src)
        if s.nbytes != d.nbytes:
            raise ValueError(f"the local slice has {s.nbytes} bytes but the remote {d.nbytes}")
        if not s.nbytes:
            raise ValueError("a read of zero bytes reads nothing; give a non-empty slice")
        route = self._route(d.descriptor, read=True)
        region = s.region
        token = self._next_token()
        if self._post(
            self._t.post_read, token, route.remote, d.offset, region._reg, s.offset, s.nbytes
        ):
            self._after_call()
        else:
            await self._await_op(token, region, timeout)

    async def _post_batch(self, c: Compiled, timeout: float | None) -> None:
        token = self._next_token()
        wb = WriteBatch(
            token, c.srcs, c.dsts, c.src, c.dst, c.soff, c.doff, c.nbytes, c.imm,
            np.zeros(c.n, np.int32), c.cache, {},
        )  # fmt: skip
        if self._post(self._t.post_batch, wb):
            self._after_call()
            self._batch_raise(wb)
            return
        hold = _BatchHold(wb, c.regions)
        await self._await_op(token, hold, timeout)

    def _batch_raise(self, wb: WriteBatch) -> None:
        if not wb.errors and not wb.status.any():
            return
        bad = np.flatnonzero(wb.status)
        idx = sorted(set(bad.tolist()) | set(wb.errors))
        failures = {
            i: wb.errors.get(i) or self._t.error(int(wb.status[i]), f"batch entry {i}") for i in idx
        }
        shown = "; ".join(f"entry {i}: {failures[i]}" for i in idx[:3])
        more = f" (and {len(idx) - 3} more)" if len(idx) > 3 else ""
        first = failures[idx[0]]
        landed = "; the others landed" if len(idx) < len(wb.status) else ""
        raise BatchError(
            f"{len(idx)} of {len(wb.status)} writes of the batch failed{landed}: "
            f"{shown}{more}; see .failures for each",
            failures,
            getattr(first, "errno", 0),
        )

    # ---------------------------------------------------------------- triggers

    def arm(
        self,
        ops: Batch | Any,
        flag: Flag,
        value: int,
        *,
        reset: int | None = None,
        repeat: bool = False,
        imm: int | None = None,
    ) -> Trigger:
        """Arm a batch to be posted when ``flag``'s word reaches ``value``.

        ``ops``: a :class:`Batch` or ``(src, dst[, imm])`` tuples, as ``write_many``
        takes them (host memory on both sides). The transport's watcher posts it the
        moment the word reaches ``value`` (cyclic >=: ``(int32)(word - value) >= 0``, as
        ``cuStreamWaitValue32``'s GEQ), whoever writes the word: a CUDA stream
        (``asyncfabric.cuda_memops.stream_fire``), another thread or process, or
        ``flag.set``. ``reset``: stored into the word just before the post (a
        repeating trigger fired by a stream writing the same value each time resets it
        to 0). ``repeat``: stay armed after a fire. Returns a :class:`Trigger`: await
        it for the transfer's end. Every entry is checked now; nothing is posted
        until the word is reached. docs/gpu.md, "Triggers"."""
        self._check_open()
        if not isinstance(flag, Flag):
            raise TypeError(
                f"flag must be an asyncfabric Flag (af.Flag(), or cuda_memops.cuda_flag() for a "
                f"CUDA stream), got {type(flag).__name__}"
            )
        value = check_u32(value, "value")
        rs = -1 if reset is None else check_u32(reset, "reset")
        if not isinstance(repeat, bool):
            raise TypeError(f"repeat must be a bool, got {type(repeat).__name__}")
        check_reset(value, rs, repeat)
        batch = ops if isinstance(ops, Batch) else Batch.of(ops, imm=imm)
        c = batch.compile(self)
        gpu = self._t.gpu_triggers  # cuda_ipc: the firing stream copies GPU entries itself
        for i, reg in enumerate(c.srcs):
            if reg is not None and (reg.staged or (reg.device != "cpu" and not gpu)):
                raise RegionError(
                    f"a triggered write posts from host memory, but source {i} of the batch is "
                    f"{'staged ' if reg.staged else ''}{reg.device} memory; register a host "
                    "(pinned) buffer and copy into it on the stream before the trigger fires "
                    "(or, between GPUs of one host, open the engines on cuda_ipc)"
                )
        token = self._next_token()
        wb = WriteBatch(
            token, c.srcs, c.dsts, c.src, c.dst, c.soff, c.doff, c.nbytes, c.imm,
            np.zeros(c.n, np.int32), c.cache, {},
        )  # fmt: skip
        p = self.policy
        work = self._t.trigger_arm(
            token, wb, flag.ptr, value, rs, repeat,
            _ns(p.trigger_spin_us), _ns(p.trigger_nap_us),
        )  # fmt: skip
        hold = _TrigHold(wb, c.regions, flag, repeat)
        hold.stream_work = work
        self._ops[token] = (None, hold)
        for r in c.regions:
            r._inflight += 1
        self._after_call()
        return Trigger(self, token, value, hold)

    def arm_write(
        self,
        src: Region | RegionSlice,
        dst: Descriptor | RemoteSlice,
        flag: Flag,
        value: int,
        *,
        imm: int | None = None,
        reset: int | None = None,
        repeat: bool = False,
    ) -> Trigger:
        """Arm one write (as :meth:`write` takes it) to be posted when ``flag``'s word
        reaches ``value``: :meth:`arm` with a batch of one."""
        self._check_open()
        return self.arm(Batch().add(src, dst, imm=imm), flag, value, reset=reset, repeat=repeat)

    def counter_flag(
        self, imm: int, n: int, flag: Flag, value: int, *, repeat: bool = False
    ) -> Release:
        """``self.counter(imm).release_word(n, flag, value, repeat=repeat)``."""
        return self.counter(imm).release_word(n, flag, value, repeat=repeat)

    def peer_word(self, dst: Descriptor | RemoteSlice) -> DeviceWord:
        """The first 32-bit word of ``dst`` (a peer's GPU region, or a slice of it) as
        a CUDA stream of this process addresses it: a *signal word*. After
        ``cuda_memops.stream_fire(trigger)``, ``stream_fire(word, v)`` on the same
        stream stores ``v`` there behind a memory fence, so the peer's stream, waiting
        on its own tensor with ``cuda_memops.stream_wait``, starts with the data in
        place and no host on either side. cuda_ipc only (the peer's memory is mapped
        here); other transports raise ``Unsupported``. docs/gpu.md, "Signal words"."""
        self._check_open()
        rs = self._remote_slice(dst)
        if rs.offset % 4:
            raise RegionError(
                f"a signal word must be 4-byte aligned; the slice starts at byte {rs.offset}"
            )
        if rs.nbytes < 4:
            raise RegionError(f"a signal word needs 4 bytes; the slice has {rs.nbytes}")
        r = self._route(rs.descriptor)
        ptr = self._t.device_pointer(r.remote, rs.offset)
        return DeviceWord(ptr, keep=rs.descriptor)

    def _disarm(self, token: int, h: _TrigHold) -> bool:
        if not h.armed or self._closed:
            return False
        rc = self._t.trigger_disarm(token)
        h.armed = False
        if rc == 0:
            self._trigger_over(token, h)
            return True
        h.final_due = True  # a fire in flight (1), or a one-shot that fired (< 0)
        return h.repeat

    def _on_trigger(self, ev: OpDone, h: _TrigHold) -> None:
        """A fire of trigger ``ev.token`` ended (or failed early: ``held``)."""
        err: BaseException | None = ev.error
        wb = h.wb
        if ev.status and not wb.status.any():
            wb.status[:] = ev.status  # no entry named: none is known to have landed
        if err is None and (ev.status or wb.status.any()):
            try:
                self._batch_raise(wb)
            except BatchError as exc:
                # one write (arm_write) fails as write() would: with the entry's error
                err = exc.failures.get(0, exc) if len(wb.status) == 1 else exc
            if err is None:
                err = self._t.error(ev.status, "triggered batch")
        if err is not None:
            h.fail(err)
            if h.armed and h.repeat:
                h.armed = False
                if self._t.trigger_disarm(ev.token) == 1:
                    h.final_due = True
        if ev.held:
            return  # failed early: the final event follows
        if err is None:
            h.done += 1
        if not h.repeat:
            h.armed = False
        h.final_due = False
        h.serve()
        if h.over:
            self._trigger_over(ev.token, h)

    def _trigger_over(self, token: int, h: _TrigHold) -> None:
        h.serve()
        self._ops.pop(token, None)
        for r in h.regions:
            r._inflight -= 1
            if r._closed and r._inflight == 0:
                self._deregister(r)

    async def send(
        self,
        to: bytes | Descriptor | Peer,
        data: bytes | bytearray | memoryview,
        *,
        timeout: float | None = None,
    ) -> None:
        """Two-sided send of a small control message (at most ``ctrl_max`` bytes)."""
        self._check_open()
        peer = to if isinstance(to, Peer) else self.connect(to)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"send takes bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) > self._ctrl_max:
            raise ValueError(
                f"message of {len(data)} bytes exceeds ctrl_max={self._ctrl_max}; "
                "use write() for bulk data or open the engines with a larger ctrl_max"
            )
        token = self._next_token()
        if self._post(self._t.post_send, token, peer.id, data):
            self._after_call()
        else:
            await self._await_op(token, None, timeout)

    async def recv(self, *, timeout: float | None = None) -> bytes:
        """Receive the next control message sent to this engine."""
        self._check_open()
        self._after_call()
        if self._inbox:
            return self._inbox.popleft()
        w = self._loop.new_waiter()
        self._recv_waiters.append(w)
        self._spin_for(w)
        try:
            data: bytes = await self._loop.wait(w, timeout)
            return data
        except BaseException as exc:
            if w.done() and not w.cancelled() and w.exception() is None:
                self._inbox.appendleft(w.result())  # delivered but not taken: keep it
            elif w in self._recv_waiters:
                self._recv_waiters.remove(w)
            if isinstance(exc, TimeoutError) and not isinstance(exc, ImmTimeout):
                raise ImmTimeout(f"no message arrived within {timeout} s") from None
            raise

    def counter(self, imm: int) -> ImmCounter:
        """The counter of immediates carrying ``imm`` (one object per value)."""
        self._check_open()
        imm = check_imm(imm)
        c = self._counters.get(imm)
        if c is None:
            c = self._counters[imm] = ImmCounter(self, imm)
        return c

    def poll(self) -> int:
        """Act now on every event the transport has ready (completions, counters, messages).

        The event loop does this on its own whenever the transport signals; call it
        after driving the transport directly (a native benchmark loop, say).
        Returns how many events were handled."""
        self._check_open()
        return self._drain()

    # ---------------------------------------------------------------- completion plumbing

    async def _await_op(self, token: int, region: Any, timeout: float | None) -> None:
        """Wait for the end of posted transfer ``token``."""
        await self._wait_op(self._waiter(token, region), timeout)

    def _waiter(self, token: int, region: Any) -> Any:
        """Register the waiter of posted transfer ``token``; poll a moment if idle.

        The waiter is registered after the post: its completion can only reach
        Python through a drain on this thread, and none runs in between, even
        when the progress thread finished the transfer before the post returned.
        """
        w = self._loop.new_waiter()
        self._ops[token] = (w, region)
        if isinstance(region, _BatchHold):
            for r in region.regions:
                r._inflight += 1
        elif region is not None:
            region._inflight += 1
        self._after_call()
        if not w.done():
            self._spin_for(w)
        return w

    async def _wait_op(self, w: Any, timeout: float | None) -> None:
        try:
            await self._loop.wait(w, timeout)
        except TimeoutError:
            raise ImmTimeout(
                f"transfer not complete within {timeout} s; it stays in flight and its region "
                "stays registered until the transport finishes or fails it"
            ) from None

    def _spin_for(self, w: Any) -> None:
        # Spin only when the loop has nothing else ready: with other tasks
        # runnable (several writes in flight), spinning would serialize them
        # and the loop's own wake-up costs nothing extra.
        if w.done() or self._loop.has_ready():
            return
        if self._wait_spin_ns and self._t.spin(self._wait_spin_ns):
            self._drain()
        if not w.done():
            self._t.release()  # the loop is about to sleep: the progress thread takes over

    def _post(self, post: Callable[..., bool], *args: Any) -> bool:
        """Call the transport's ``post``: True when the transfer ended inside the call.

        The contract lets a call from this thread queue events without ringing the
        notify fd, because the engine checks ``pending_events`` after every call. A
        call that raises is a call too: a peer found dead inside it (the transport
        progresses on the way out) has the failures of other transfers queued, and
        with nothing ringing their waiters would sleep until their timeouts."""
        try:
            return post(*args)
        except BaseException:
            self._after_call()
            raise

    def _after_call(self) -> None:
        if self._t.pending_events():
            self._drain()

    def _drain(self) -> int:
        """Handle the transport's ready events (event-loop thread; never re-entered).

        A handler's own calls into the transport may queue events without a ring
        (the contract allows it on this thread), and the re-entered ``_drain`` of
        their ``_after_call`` returns at once: so look again before leaving."""
        if self._closed or self._draining:
            return 0
        self._draining = True
        total = 0
        ops, left, pending = self._ops, self._left, self._t.pending_events
        try:
            while True:
                # The plain ends of transfers, resolved natively (fastpath.py); what
                # it leaves (holds, batch entries, closed regions) comes back here.
                took: int = self._fp.complete(ops, left)
                total += took
                if left:
                    total += len(left)
                    for tok in left:
                        if tok & SUB_BIT:
                            self._on_sub(OpDone(tok))
                        else:
                            self._on_op(OpDone(tok))
                        if self._closed:
                            break
                    left.clear()
                    if self._closed:
                        return total
                # Only a native table's event count is exact: a Python transport's
                # drain() may poll for more (the pyverbs backend services its CQs
                # there), so it is always called unless the fast path just ended all.
                if took and not pending():
                    return total
                evs = self._t.drain()
                for ev in evs:
                    if isinstance(ev, OpDone):
                        if ev.token & SUB_BIT:
                            self._on_sub(ev)
                        else:
                            self._on_op(ev)
                    elif isinstance(ev, CounterReady):
                        c = self._counters.get(ev.imm)
                        if c is not None:
                            c._serve()
                    elif isinstance(ev, Message):
                        self._on_message(ev.data)
                    elif isinstance(ev, Fatal):
                        self._on_fatal(ev.error)
                    if self._closed:
                        return total + len(evs)
                total += len(evs)
                if not evs or not self._t.pending_events():
                    return total
        finally:
            self._draining = False

    def _on_op(self, ev: OpDone) -> None:
        entry = self._ops.get(ev.token)
        if entry is not None and isinstance(entry[1], _TrigHold):
            self._on_trigger(ev, entry[1])
            return
        if entry is not None and isinstance(entry[1], _BatchHold):
            hold = entry[1]
            if ev.status and not hold.wb.status.any():
                hold.wb.status[:] = ev.status  # no entry named: none is known to have landed
            reported = -1 in hold.early  # a native batch reports early once, as entry -1
            if ev.held:
                hold.early.add(-1)
            self._on_batch(ev.token, entry, not ev.held, not reported)
            return
        if ev.held:
            # Failed early (peer lost): fail the caller now, but keep the source region
            # registered until the transport lets go of the transfer (a final event).
            entry = self._ops.get(ev.token)
            if entry is not None and not entry[0].done():
                entry[0].set_exception(ev.error or self._t.error(ev.status, "transfer"))
            return
        entry = self._ops.pop(ev.token, None)
        if entry is None:
            return
        w, region = entry
        if region is not None:
            region._inflight -= 1
            if region._closed and region._inflight == 0:
                self._deregister(region)
        if w.done():
            return
        if ev.status or ev.error is not None:
            w.set_exception(ev.error or self._t.error(ev.status, "transfer"))
        else:
            w.set_result(None)

    def _on_sub(self, ev: OpDone) -> None:
        """The end of one entry of a batch posted by the contract's fallback."""
        token, i = split_sub(ev.token)
        entry = self._ops.get(token)
        if entry is None:
            return
        hold: _BatchHold = entry[1]
        if ev.status or ev.error is not None:
            if not hold.wb.status[i]:
                hold.wb.status[i] = ev.status or -5  # EIO
            if ev.error is not None:
                hold.wb.errors.setdefault(i, ev.error)
        reported = ev.held or i in hold.early
        if ev.held:
            hold.early.add(i)
        self._on_batch(token, entry, not ev.held, not reported)

    def _on_batch(self, token: int, entry: tuple[Any, Any], final: bool, report: bool) -> None:
        """Count a batch's ends down: resolve its waiter once every entry reported,
        release its regions once the transport let go of every entry."""
        w, hold = entry
        if report:
            hold.unrep -= 1
        if final:
            hold.left -= 1
        if hold.unrep <= 0 and not w.done():
            try:
                self._batch_raise(hold.wb)
            except BatchError as exc:
                w.set_exception(exc)
            else:
                if hold.left <= 0:
                    w.set_result(None)
        if hold.left <= 0:
            self._ops.pop(token, None)
            for r in hold.regions:
                r._inflight -= 1
                if r._closed and r._inflight == 0:
                    self._deregister(r)
            if not w.done():
                w.set_result(None)

    def _on_message(self, data: bytes) -> None:
        while self._recv_waiters:
            w = self._recv_waiters.popleft()
            if not w.done():
                w.set_result(data)
                return
        self._inbox.append(data)

    def _on_fatal(self, error: Exception) -> None:
        # The transport broke: nothing pending will complete. Fail it all now, with
        # the cause, rather than let waiters time out; later calls raise too.
        if self._fatal is None:
            self._fatal = error
        self._fp.on = 0  # every call takes the Python path, which raises
        self._fail_all(error)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._opened else "not open")
        prov = self._t.provider if self._opened else self._spec
        return f"<Engine {self._backend.name}:{prov} domains={self._domains} {state}>"


class _BatchHold:
    """A batch in flight: what it holds, and how many of its ends are still to come.

    A native batch ends once (``left`` = 1); the fallback's, once per entry in
    flight. ``unrep``: ends not yet reported (an early report of a lost peer
    counts); ``early``: the fallback's entries reported early."""

    __slots__ = ("wb", "regions", "left", "unrep", "early")

    def __init__(self, wb: WriteBatch, regions: tuple[Region, ...]) -> None:
        self.wb, self.regions = wb, regions
        self.left = self.unrep = wb.subops or 1
        self.early: set[int] = set()


def _check_cpus(cpus: Any) -> tuple[int, ...]:
    if cpus is None:
        return ()
    allowed = os.sched_getaffinity(0)
    if cpus == "auto":  # spread over the CPUs this process may use, in order
        return tuple(sorted(allowed))[:16]
    try:
        out = tuple(cpus)
    except TypeError:
        raise TypeError(f"cpus must be a list of CPU numbers or 'auto', got {cpus!r}") from None
    bad = [c for c in out if isinstance(c, bool) or not isinstance(c, int) or c not in allowed]
    if bad or not out:
        raise ValueError(
            f"cpus {list(out)!r}: each must be a CPU this process may run on "
            f"({sorted(allowed)}); give at least one, or leave cpus out (not pinned)"
        )
    return out[:16]


def _ns(us: float) -> int:
    """Microseconds as nanoseconds for the native side (inf: about 146 years)."""
    return int(min(us * 1e3, float(1 << 62)))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, but not ours to signal
    return True


def _page_array(pages: Any, name: str) -> np.ndarray:
    arr = np.asarray(pages)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.uint64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise ValueError(f"{name} has a negative page index ({int(arr.min())})")
    return arr.astype(np.uint64, copy=False)
