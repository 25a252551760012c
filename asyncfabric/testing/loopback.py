"""An in-memory transport: engines of one process, for unit tests of the engine's logic.

No provider, no second process, no thread: a write is a ``memmove`` into the
target's registered memory, its immediates are counted in the target's
:class:`~asyncfabric.transport.CounterTable`, and the target's notify fd rings.
It keeps every rule of the contract (chunking by the counting rule, keys and
bounds checked at the target, events through ``drain``), so tests of the engine,
counters and wire formats run against it in milliseconds. It is not a backend:
tests install it with :func:`installed` (tests/unit/conftest.py), and nothing
outside tests can open it.

Knobs for tests: ``complete`` (``"inline"``: writes finish inside the post;
``"event"``: their end comes as an OpDone from drain; ``"polled"``: the same, but
only ``drain`` finds it, as a transport that polls its CQ there, so
``pending_events`` does not count it), ``hold()``/``release_held()``
(keep completions back, to test in-flight states), ``fail_next(status)``,
``fatal(error)``, ``raise_next(error)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
from collections.abc import Iterator, Sequence
from typing import Any

from .. import _errors
from ..transport import registry
from ..transport.contract import (
    Backend,
    PagedWrite,
    PolicyNs,
    Registration,
    Remote,
    Target,
    Transport,
)
from ..transport.counting import NO_IMM, plan_chunks
from ..transport.events import Event, OpDone
from ..transport.pytransport import PythonTransport
from ..transport.status import ACCESS_DENIED, PEER_RESET

_FABRIC: dict[bytes, LoopbackTransport] = {}
_ids = itertools.count(1)


class LoopbackTransport(PythonTransport):
    backend = "loopback"
    provider = "mem"
    inject_size = 64

    def __init__(self, *, domains: int, ctrl_max: int, complete: str = "inline") -> None:
        super().__init__()
        self.ndomains = domains
        self.ctrl_max = ctrl_max
        self.max_msg_size = 1 << 30
        self.complete = complete
        self._addr = [f"lb{next(_ids)}/{d}".encode() for d in range(domains)]
        self._mrs: dict[int, tuple[int, int, int, bool]] = {}  # key -> (ptr, nbytes, handle, rw)
        self._handles = itertools.count(1)
        self._peers: list[LoopbackTransport | None] = []
        self._held: list[Event] = []
        # complete="polled": ends only drain() finds (as the pyverbs backend services
        # its CQs there); PythonTransport.pending_events counts the ring, not these
        self._cq: list[Event] = []
        self._holding = False
        self._fail: list[int] = []
        self._raise: list[Exception] = []
        self.posts = 0
        self.closed = False
        for a in self._addr:
            _FABRIC[a] = self

    # ------------------------------------------------------------ test knobs

    def hold(self) -> None:
        """Keep this transport's own completions back until :meth:`release_held`."""
        self._holding = True

    def release_held(self) -> None:
        self._unhold(ring=True)

    def _unhold(self, *, ring: bool) -> None:
        self._holding = False
        with self.lock:
            for ev in self._held:
                self.events.push(ev)
            self._held.clear()
            if ring:
                self.ring()

    def fail_next(self, status: int) -> None:
        """The next post completes (as an event) with ``status``."""
        self._fail.append(status)

    def raise_next(self, error: Exception) -> None:
        """The next post raises ``error``, having queued the held completions without
        a ring on the way: as a native transport whose in-call progress finds a peer
        dead, which the contract allows for calls from the engine's thread."""
        self._raise.append(error)

    def _raise_now(self) -> None:
        if not self._raise:
            return
        self._unhold(ring=False)
        raise self._raise.pop(0)

    def fatal(self, error: Exception) -> None:
        """The transport breaks: a Fatal event with ``error``."""
        with self.lock:
            self.events.fatal(error)
            self.ring()

    def kill_peer(self, peer: int) -> None:
        """The peer is gone: later posts to it fail with PEER_RESET."""
        self._peers[peer] = None

    # ------------------------------------------------------------ contract

    @property
    def addresses(self) -> list[bytes]:
        return list(self._addr)

    def start(self, policy: PolicyNs) -> None:
        self.policy = policy

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for a in self._addr:
                _FABRIC.pop(a, None)
            self.close_notify()

    def add_peer(self, addresses: Sequence[bytes]) -> int:
        t = _FABRIC.get(bytes(addresses[0]))
        if t is None:
            raise _errors.PeerUnreachable("no loopback engine has that address (closed?)")
        self._peers.append(t)
        return len(self._peers) - 1

    def register(
        self,
        ptr: int,
        nbytes: int,
        *,
        remote_write: bool,
        remote_read: bool,
        device: str = "cpu",
        device_index: int = -1,
        owner: Any = None,
    ) -> Registration:
        h = next(self._handles)
        key = int.from_bytes(os.urandom(8), "little")
        self._mrs[key] = (ptr, nbytes, h, remote_write)
        n = self.ndomains
        return Registration(h, (key,) * n, (ptr,) * n, ptr, nbytes, device, device_index)

    def deregister(self, reg: Registration) -> None:
        self._mrs.pop(reg.keys[0], None)

    def remote(self, peer: int, ndom: int, target: Target) -> Remote:
        return Remote(peer, ndom, target)

    def _land(self, t: LoopbackTransport, key: int, addr: int, src: int, n: int, imm: int) -> int:
        mr = t._mrs.get(key)
        if mr is None or not mr[3] or addr < mr[0] or addr + n > mr[0] + mr[1]:
            return ACCESS_DENIED
        if n:
            ctypes.memmove(addr, src, n)
        if imm != NO_IMM:
            with t.lock:
                t.arrive(imm)
        return 0

    def _finish(self, token: int, status: int) -> bool:
        if self._fail:
            status = self._fail.pop(0)
        if not status and self.complete == "inline" and not self._holding:
            return True
        if self._holding:
            self._held.append(OpDone(token, status))
        elif self.complete == "polled":
            with self.lock:
                self._cq.append(OpDone(token, status))
                self.ring()
        else:
            with self.lock:
                self.op_done(token, status)
        return False

    def drain(self) -> list[Event]:
        if self._cq:
            with self.lock:
                for ev in self._cq:
                    self.events.push(ev)
                self._cq.clear()
        return super().drain()

    def post_write(
        self,
        token: int,
        dst: Remote,
        roff: int,
        src: Registration | None,
        soff: int,
        nbytes: int,
        imm: int,
        stream: Any = None,
    ) -> bool:
        self.posts += 1
        self._raise_now()
        t = self._peers[dst.peer]
        if t is None or t.closed:
            return self._finish(token, PEER_RESET)
        tg = dst.target
        status = 0
        base = src.ptr + soff if src is not None else 0
        for off, n, d in plan_chunks(nbytes, dst.chunk, dst.ndom):
            status = status or self._land(
                t, tg.keys[d], tg.bases[d] + roff + off, base + off, n, imm
            )
        return self._finish(token, status)

    def post_paged(self, op: PagedWrite) -> bool:
        self.posts += 1
        self._raise_now()
        t = self._peers[op.dst.peer]
        if t is None or t.closed:
            return self._finish(op.token, PEER_RESET)
        tg, status = op.dst.target, 0
        for i, (s, d) in enumerate(zip(op.src_off.tolist(), op.dst_off.tolist())):
            dd = i % op.dst.ndom
            status = status or self._land(
                t, tg.keys[dd], tg.bases[dd] + d, op.src.ptr + s, op.page, op.imm
            )
        return self._finish(op.token, status)

    def post_send(self, token: int, peer: int, data: bytes) -> bool:
        self._raise_now()
        t = self._peers[peer]
        if t is None or t.closed:
            return self._finish(token, PEER_RESET)
        with t.lock:
            t.message(bytes(data))
        return self._finish(token, 0)

    def stats(self) -> dict[str, int]:
        return {"posts": self.posts}


class LoopbackBackend(Backend):
    name = "loopback"
    complete = "inline"

    def providers(self) -> list[str]:
        return ["mem"]

    def open(
        self, provider: str, *, domains: int, node: str | None, ctrl_max: int, cuda: str = "auto"
    ) -> Transport:
        return LoopbackTransport(domains=domains, ctrl_max=ctrl_max, complete=self.complete)


@contextlib.contextmanager
def installed(complete: str = "inline") -> Iterator[LoopbackBackend]:
    """Make ``Engine("loopback")`` open this transport while the block runs."""
    b = LoopbackBackend()
    b.complete = complete
    bs = registry.backends()
    old = bs.get("loopback")
    bs["loopback"] = b
    try:
        yield b
    finally:
        if old is None:
            bs.pop("loopback", None)
        else:
            bs["loopback"] = old
