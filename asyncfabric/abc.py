"""The interface between the engine and a backend. Backends implement these two classes.

The engine (``asyncfabric._engine``) never imports a backend's internals: it
talks to a :class:`Transport` only. A backend is found through the entry-point
group ``asyncfabric.backends``, whose objects are :class:`Backend` subclasses.

Contract, in one paragraph: every method is synchronous and never blocks for
the network. ``post_*`` start a transfer identified by the engine's ``token``
and return 1 when it already finished (nothing will be reported), 0 when its
end will be reported by :meth:`Transport.drain`, and raise on immediate
failure. Immediates are counted inside the transport; ``counter_arm`` either
takes ``want`` of them at once (True) or arms the counter so that ``drain``
reports it once ``want`` have arrived. ``notify_fd`` becomes readable when
``drain`` has something to report and the engine is not already draining.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True, slots=True)
class RegHandle:
    """A registration: the transport's handle plus, per domain, the key and base peers use."""

    handle: int
    keys: tuple[int, ...]
    bases: tuple[int, ...]
    # backend-specific bytes a peer needs beyond base and key (cuda_ipc: the IPC handle)
    ext: bytes = b""


@dataclass(frozen=True, slots=True)
class PolicyNs:
    """Progress policy in nanoseconds, as handed to a transport (see ProgressPolicy)."""

    spin_ns: int
    idle_block_ns: int
    busy_block_ns: int
    post_timeout_ns: int = 5_000_000_000
    py_hold_ns: int = 0


class EventSink(Protocol):
    """What a transport reports to while draining."""

    def _on_op(self, token: int, status: int, held: bool = False) -> None:
        """``held``: the transfer failed early (peer lost) but the transport still holds
        pieces of it; a second call with ``held=False`` follows when it lets go."""

    def _on_counter(self, imm: int) -> None: ...
    def _on_message(self, data: bytes) -> None: ...
    def _on_fatal(self, domain: int, status: int) -> None: ...


class Transport(ABC):
    """One engine's connection to the fabric: its domains, registrations, counters and progress."""

    backend: str
    provider: str
    ndomains: int
    max_msg_size: int
    inject_size: int
    ctrl_max: int
    # GPU memory (docs/gpu.md): cuda_native transports take CUDA pointers in every
    # call and order their copies after a producer stream themselves; hmem says the
    # transport was opened asking the provider for FI_HMEM (direct registration).
    cuda_native: bool = False
    hmem: bool = False

    @property
    @abstractmethod
    def addresses(self) -> list[bytes]:
        """Each domain's transport address, in domain order."""

    @property
    @abstractmethod
    def notify_fd(self) -> int:
        """A file descriptor that becomes readable when drain() has events."""

    @abstractmethod
    def start(self, policy: PolicyNs) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def add_peer(self, addresses: Sequence[bytes]) -> int: ...

    def watch_peer(self, peer: int, pid: int) -> None:  # noqa: B027 - optional hook
        """Watch a same-host peer's process; transfers to it fail when it exits (optional)."""

    def peer_dead(self, peer: int) -> bool:
        """Whether the peer's process is known to be gone (optional)."""
        return False

    @abstractmethod
    def register(
        self,
        ptr: int,
        nbytes: int,
        *,
        remote_write: bool,
        remote_read: bool,
        device: str,
        device_index: int,
    ) -> RegHandle: ...

    @abstractmethod
    def deregister(self, handle: int) -> None: ...

    @abstractmethod
    def remote(self, bases: Sequence[int], keys: Sequence[int], ext: bytes = b"") -> Any:
        """Prepare a peer region's bases, keys (and extension bytes) for fast reuse by post_*."""

    @abstractmethod
    def post_write(
        self,
        token: int,
        peer: int,
        ndom: int,
        ptr: int,
        handle: int,
        nbytes: int,
        chunk: int,
        remote: Any,
        roff: int,
        imm: int,
    ) -> int: ...

    @abstractmethod
    def post_paged(
        self,
        token: int,
        peer: int,
        ndom: int,
        ptr: int,
        handle: int,
        src_off: np.ndarray,
        dst_off: np.ndarray,
        page: int,
        remote: Any,
        imm: int,
    ) -> int: ...

    @abstractmethod
    def post_send(self, token: int, peer: int, data: bytes) -> int: ...

    @abstractmethod
    def counter_arm(self, imm: int, want: int) -> bool: ...

    @abstractmethod
    def counter_give(self, imm: int, n: int) -> None: ...

    @abstractmethod
    def counter_disarm(self, imm: int) -> None: ...

    @abstractmethod
    def counter_avail(self, imm: int) -> int: ...

    @abstractmethod
    def counters_live(self) -> int: ...

    @abstractmethod
    def pending_events(self) -> int: ...

    @abstractmethod
    def drain(self, sink: EventSink) -> int: ...

    @abstractmethod
    def spin(self, ns: int) -> int:
        """Poll the fabric from the calling thread until an event is ready or ns pass."""

    def counter_take_spin(self, imm: int, want: int, ns: int) -> int:
        """Take ``want`` arrivals of ``imm`` now or within ``ns`` of polling, arming nothing.

        Bit 0 of the result: taken; bit 1: events are ready to drain; bit 2: nothing
        was polled (the default: this transport has no such path, and the wait
        arms, spins with :meth:`spin` and awaits as usual)."""
        return 4

    def release(self) -> None:  # noqa: B027 (optional hook, a no-op by default)
        """The calling thread goes idle: progress is the transport's own job again."""

    @abstractmethod
    def error(self, status: int, what: str) -> Exception:
        """The exception for a negative status from this transport."""

    @abstractmethod
    def stats(self) -> dict[str, int]: ...


class Backend(ABC):
    """A family of transports (libfabric, verbs, ...), registered as an entry point."""

    name: str

    @abstractmethod
    def providers(self) -> list[str]:
        """The providers usable on this machine now."""

    @abstractmethod
    def open(
        self, provider: str, *, domains: int, node: str | None, ctrl_max: int, hmem: bool
    ) -> Transport: ...
