"""ForwardingTransport: the one base for transports that wrap another.

It forwards every method and attribute of :class:`~.contract.Transport` to the
inner transport, optional hooks included, so a wrapper overrides only what it
changes and can never drop a hook by omission (tests/unit/test_contract.py
checks that every member of the contract is forwarded here).

A wrapper pays only for what it overrides: every method it leaves alone is the
inner transport's own bound method, set on the instance, so a call through the
wrapper costs what a call to the inner transport costs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .contract import (
    NativeOps,
    PagedWrite,
    PolicyNs,
    Registration,
    Remote,
    Target,
    Transport,
    WriteBatch,
)
from .events import Event


class ForwardingTransport(Transport):
    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        cls = type(self)
        for name in _METHODS:
            if getattr(cls, name) is getattr(ForwardingTransport, name):
                setattr(self, name, getattr(inner, name))
        self.backend = inner.backend
        self.provider = inner.provider
        self.ndomains = inner.ndomains
        self.max_msg_size = inner.max_msg_size
        self.inject_size = inner.inject_size
        self.ctrl_max = inner.ctrl_max
        self.hmem = inner.hmem

    def __getattr__(self, name: str) -> Any:
        # Backend-specific extras (libfabric's per-domain ``info``, say) stay reachable.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def addresses(self) -> list[bytes]:
        return self.inner.addresses

    @property
    def notify_fd(self) -> int:
        return self.inner.notify_fd

    def start(self, policy: PolicyNs) -> None:
        self.inner.start(policy)

    def close(self) -> None:
        self.inner.close()

    def add_peer(self, addresses: Sequence[bytes]) -> int:
        return self.inner.add_peer(addresses)

    def watch_peer(self, peer: int, pid: int) -> None:
        self.inner.watch_peer(peer, pid)

    def peer_dead(self, peer: int) -> bool:
        return self.inner.peer_dead(peer)

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
        return self.inner.register(
            ptr,
            nbytes,
            remote_write=remote_write,
            remote_read=remote_read,
            device=device,
            device_index=device_index,
            owner=owner,
        )

    def deregister(self, reg: Registration) -> None:
        self.inner.deregister(reg)

    def remote(self, peer: int, ndom: int, target: Target) -> Remote:
        return self.inner.remote(peer, ndom, target)

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
        return self.inner.post_write(token, dst, roff, src, soff, nbytes, imm, stream)

    def post_paged(self, op: PagedWrite) -> bool:
        return self.inner.post_paged(op)

    def post_batch(self, batch: WriteBatch) -> bool:
        return self.inner.post_batch(batch)

    def post_read(
        self, token: int, src: Remote, roff: int, dst: Registration, doff: int, nbytes: int
    ) -> bool:
        return self.inner.post_read(token, src, roff, dst, doff, nbytes)

    def post_send(self, token: int, peer: int, data: bytes) -> bool:
        return self.inner.post_send(token, peer, data)

    def counter_arm(self, imm: int, want: int) -> bool:
        return self.inner.counter_arm(imm, want)

    def counter_give(self, imm: int, n: int) -> None:
        self.inner.counter_give(imm, n)

    def counter_disarm(self, imm: int) -> None:
        self.inner.counter_disarm(imm)

    def counter_avail(self, imm: int) -> int:
        return self.inner.counter_avail(imm)

    def counters_live(self) -> int:
        return self.inner.counters_live()

    def trigger_arm(
        self,
        token: int,
        batch: WriteBatch,
        word: int,
        value: int,
        reset: int,
        repeat: bool,
        spin_ns: int,
        nap_ns: int,
    ) -> Callable[[int, int], None] | None:
        return self.inner.trigger_arm(token, batch, word, value, reset, repeat, spin_ns, nap_ns)

    def trigger_disarm(self, token: int) -> int:
        return self.inner.trigger_disarm(token)

    def device_pointer(self, remote: Remote, offset: int) -> int:
        return self.inner.device_pointer(remote, offset)

    def release_arm(self, imm: int, n: int, word: int, value: int, repeat: bool) -> int:
        return self.inner.release_arm(imm, n, word, value, repeat)

    def release_fired(self, rid: int) -> int:
        return self.inner.release_fired(rid)

    def release_disarm(self, rid: int) -> int:
        return self.inner.release_disarm(rid)

    def pending_events(self) -> int:
        return self.inner.pending_events()

    def drain(self) -> list[Event]:
        return self.inner.drain()

    def spin(self, ns: int) -> bool:
        return self.inner.spin(ns)

    def counter_take_spin(self, imm: int, want: int, ns: int) -> int:
        return self.inner.counter_take_spin(imm, want, ns)

    def release(self) -> None:
        self.inner.release()

    def native_ops(self) -> NativeOps | None:
        # Not forwarded: the native table posts and polls on the inner transport
        # directly, past whatever this wrapper does on those paths. A wrapper
        # that adds nothing to them opts in by returning the inner one's (and
        # closes it if it starts to: see backends/staged).
        return None

    def error(self, status: int, what: str) -> Exception:
        return self.inner.error(status, what)

    def stats(self) -> dict[str, int]:
        return self.inner.stats()


# Every plain method of the contract (properties cannot be bound per instance), but
# native_ops: a wrapper hands out the inner table only by saying so.
_METHODS = tuple(
    name
    for name, v in vars(ForwardingTransport).items()
    if not name.startswith("_")
    and callable(v)
    and name not in ("addresses", "notify_fd", "native_ops")
)
