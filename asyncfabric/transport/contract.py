"""The contract between the engine and a backend: what a transport must do, typed.

The engine (``asyncfabric.engine``) talks to a :class:`Transport` only, and a
transport never calls into the engine: it reports through the typed events that
:meth:`Transport.drain` returns. A backend is found through the entry-point
group ``asyncfabric.backends`` (see :mod:`.registry`); its object is a
:class:`Backend`, which opens transports.

Rules every transport keeps:

* Every method is synchronous, runs on the engine's event-loop thread, and never
  blocks for the network.
* ``post_*`` start a transfer named by the engine's ``token``. They return True
  when it already finished inside the call (no event follows) and False when its
  end will come as an :class:`~.events.OpDone`; they raise on immediate failure.
* Immediates are counted inside the transport, whether or not anyone waits
  (:class:`~.counters.CounterTable` does it for transports written in Python).
  ``counter_arm`` takes ``want`` at once or arms the counter, and a
  :class:`~.events.CounterReady` follows once ``want`` have arrived.
* How many immediates a write delivers is the rule of :mod:`.counting`.
* ``notify_fd`` becomes readable when ``drain`` has something to return, with one
  exception: events a call made from the engine's own thread queues (a post, a
  spin) need not ring it, because the engine checks ``pending_events`` after
  every call, one that raises included. A wrapper that calls its inner transport from inside ``drain``
  drains again while ``pending_events`` says so (backends/staged does).
* A status is 0 or a negative errno; :func:`.status.status_error` turns it into
  the exception (``Transport.error`` defaults to it).
"""

from __future__ import annotations

import array
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .events import Event
from .status import status_error

# Bits of counter_take_spin's result.
TAKEN = 1
"""The arrivals were taken: the wait is over."""
EVENTS_READY = 2
"""Other events are ready to drain (the spin stopped for them)."""
NOT_POLLED = 4
"""This transport has no such fast path: nothing was polled or taken."""


@dataclass(frozen=True, slots=True)
class PolicyNs:
    """Progress policy in nanoseconds, as handed to a transport (see ProgressPolicy)."""

    spin_ns: int
    idle_block_ns: int
    busy_block_ns: int
    post_timeout_ns: int = 5_000_000_000
    py_hold_ns: int = 0
    workers: int = 1
    """Progress threads, each owning ``domains / workers`` domains (a transport may run one)."""
    cpus: tuple[int, ...] = ()
    """CPUs to pin progress thread ``i`` to (``cpus[i % len(cpus)]``); empty: not pinned."""


@dataclass(frozen=True, slots=True)
class Registration:
    """Memory registered with a transport.

    ``handle`` names it in later calls; ``keys`` and ``bases`` are, per domain,
    what a peer writes with (they travel in the region's descriptor); ``ext`` is
    backend bytes a peer needs beyond them (cuda_ipc: an IPC handle); ``staged``
    says writers must use the staged landing protocol (backends/staged).
    """

    handle: int
    keys: tuple[int, ...]
    bases: tuple[int, ...]
    ptr: int = 0
    nbytes: int = 0
    device: str = "cpu"
    device_index: int = -1
    ext: bytes = b""
    staged: bool = False


class NativeOps:
    """A transport's C table of hot operations (``transport/native_ops.h``).

    ``table``: the address of its ``af_native_ops``; ``ctx``: what every call
    takes; ``keep``: objects that must outlive the table's use. The gate is an
    int the engine reads before every native call: :meth:`close` clears it, for
    a wrapper that takes over the hot paths after the engine bound the table."""

    __slots__ = ("table", "ctx", "keep", "_gate")

    def __init__(self, table: int, ctx: int, keep: Any = None) -> None:
        self.table, self.ctx, self.keep = table, ctx, keep
        self._gate = array.array("i", [1])

    @property
    def gate(self) -> int:
        """The address of the gate (nonzero: the table may be used)."""
        addr: int = self._gate.buffer_info()[0]
        return addr

    @property
    def open(self) -> bool:
        return bool(self._gate[0])

    def close(self) -> None:
        """From now on every call goes through the transport's Python methods."""
        self._gate[0] = 0


@dataclass(frozen=True, slots=True)
class Target:
    """What a transport learns about a peer's region from its descriptor."""

    bases: tuple[int, ...]
    keys: tuple[int, ...]
    nbytes: int
    chunk_bytes: int
    ext: bytes = b""
    staged: bool = False


class Remote:
    """A transport's prepared view of one peer region (from :meth:`Transport.remote`).

    The engine caches it per descriptor and engine and hands it back to every
    post into that region. Transports subclass it to keep what they post with.
    """

    __slots__ = ("peer", "ndom", "chunk", "target", "native")

    def __init__(self, peer: int, ndom: int, target: Target) -> None:
        self.peer = peer
        self.ndom = ndom
        self.chunk = target.chunk_bytes
        self.target = target
        # The address of the transport's native form of this target, for its
        # native_ops().post_write; 0: none (every post goes through post_write).
        self.native = 0


@dataclass(slots=True)
class PagedWrite:
    """Page ``i``: ``page`` bytes from ``src.ptr + src_off[i]`` to ``dst``'s byte ``dst_off[i]``.

    One immediate per page when ``imm`` is not :data:`~.counting.NO_IMM`. The
    offsets are contiguous ``uint64`` arrays, already bounds-checked.
    """

    token: int
    dst: Remote
    src: Registration
    src_off: np.ndarray
    dst_off: np.ndarray
    page: int
    imm: int


@dataclass(slots=True)
class WriteBatch:
    """Many writes in one post. Entry ``i`` writes ``nbytes[i]`` bytes from
    ``srcs[src[i]]`` at ``soff[i]`` to ``dsts[dst[i]]`` at ``doff[i]``, carrying
    ``imm[i]`` (or none: NO_IMM), chunked and counted by the rule of :mod:`.counting`
    like a single write. A zero-byte entry (its source None) is one immediate alone.

    The arrays (``uint32`` indexes, ``uint64`` offsets and sizes, ``int64``
    immediates) are contiguous and already checked. The engine keeps them, and
    ``status``, alive until the batch's end. The transport writes ``status[i]``:
    0, or the negative errno entry ``i`` failed with. ``errors`` holds an
    exception for an entry where the transport has one to give. ``cache`` is
    shared by every post of the same compiled batch: a transport keeps its packed
    form there, under its own key, so reposting a batch costs O(1) Python.
    ``subops`` is the contract fallback's count of entries still in flight.
    """

    token: int
    srcs: tuple[Registration | None, ...]
    dsts: tuple[Remote, ...]
    src: np.ndarray
    dst: np.ndarray
    soff: np.ndarray
    doff: np.ndarray
    nbytes: np.ndarray
    imm: np.ndarray
    status: np.ndarray
    cache: dict[str, Any]
    errors: dict[int, Exception]
    subops: int = 0


class Transport(ABC):
    """One engine's connection to the fabric: its domains, registrations, counters, progress."""

    backend: str
    provider: str
    ndomains: int
    max_msg_size: int
    inject_size: int
    ctrl_max: int
    devices: ClassVar[frozenset[str]] = frozenset({"cpu"})
    """Memory kinds :meth:`register` takes (``"cpu"``; wrappers add ``"cuda"``)."""
    cuda_native: ClassVar[bool] = False
    """The transport moves CUDA memory itself (cuda_ipc): nothing stages it."""
    gpu_triggers: ClassVar[bool] = False
    """:meth:`trigger_arm` takes GPU sources: the firing stream moves their data
    (the work :meth:`trigger_arm` returns) and the watcher posts the rest."""
    hmem: bool = False
    """The transport was opened asking its provider for device-memory registration."""

    # ------------------------------------------------------------ lifecycle

    @property
    @abstractmethod
    def addresses(self) -> list[bytes]:
        """Each domain's transport address, in domain order."""

    @property
    @abstractmethod
    def notify_fd(self) -> int:
        """A file descriptor that becomes readable when :meth:`drain` has events."""

    @abstractmethod
    def start(self, policy: PolicyNs) -> None:
        """Start progress (a native thread, a ticker, ...) under ``policy``."""

    @abstractmethod
    def close(self) -> None:
        """Release everything; later calls need not work."""

    # ------------------------------------------------------------ peers

    @abstractmethod
    def add_peer(self, addresses: Sequence[bytes]) -> int:
        """Make a peer reachable by its domains' addresses; returns its peer index."""

    def watch_peer(self, peer: int, pid: int) -> None:  # noqa: B027 (optional hook)
        """Watch a same-host peer's process; transfers to it fail once it exits (optional)."""

    def peer_dead(self, peer: int) -> bool:
        """Whether the peer's process is known to be gone (optional)."""
        return False

    # ------------------------------------------------------------ memory

    @abstractmethod
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
        """Register ``nbytes`` at ``ptr`` with every domain. ``owner`` is the object
        holding the memory (a torch tensor, say), for transports that need it."""

    @abstractmethod
    def deregister(self, reg: Registration) -> None: ...

    @abstractmethod
    def remote(self, peer: int, ndom: int, target: Target) -> Remote:
        """Prepare a peer region for posting (called once per descriptor and engine)."""

    # ------------------------------------------------------------ transfers

    @abstractmethod
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
        """Write ``nbytes`` from ``src`` at ``soff`` to ``dst`` at ``roff``, in chunks of
        ``dst.chunk`` striped over ``dst.ndom`` domains, each carrying ``imm`` (unless
        it is NO_IMM). ``nbytes == 0`` (``src`` None): one immediate alone. ``stream``:
        the producer a device source must be read after (None: its current stream)."""

    @abstractmethod
    def post_paged(self, op: PagedWrite) -> bool: ...

    def post_batch(self, batch: WriteBatch) -> bool:
        """Post every entry of ``batch``; True when all finished inside the call.

        Its end is one ``OpDone(batch.token)``, and failed entries have their
        ``status`` set (the OpDone's status is then nonzero). Raises, posting
        nothing, when the batch cannot be taken at all. The default is the
        contract's fallback (:func:`.batching.post_batch_each`): every entry
        through :meth:`post_write`, each ending in its own OpDone under a
        sub-token that the engine folds back into the batch."""
        from .batching import post_batch_each

        return post_batch_each(self, batch)

    def post_read(
        self, token: int, src: Remote, roff: int, dst: Registration, doff: int, nbytes: int
    ) -> bool:
        """One-sided read: ``nbytes`` of the peer's region at ``roff`` into ``dst`` at
        ``doff``, chunked and striped like a write (no immediates). The default
        refuses: a transport without one-sided reads says so."""
        from .._errors import Unsupported

        raise Unsupported(
            f"{self.backend}:{self.provider} has no one-sided read; write from the peer "
            "instead (the push model), or use a provider with FI_READ (shm, tcp, verbs, efa)"
        )

    @abstractmethod
    def post_send(self, token: int, peer: int, data: bytes) -> bool:
        """A two-sided control message of at most ``ctrl_max`` bytes."""

    # ------------------------------------------------------------ counters

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

    # ------------------------------------------------------------ triggers (optional)

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
        """Arm ``batch`` to be posted, with no Python in between, when the 32-bit word
        at host address ``word`` reaches ``value`` (cyclic >=: ``(int32)(w - value) >=
        0``, as ``cuStreamWaitValue32``'s GEQ). ``reset`` >= 0 is stored into the word
        just before the post (-1: none). Each fire ends in one ``OpDone(token)``, as
        :meth:`post_batch`. ``repeat``: stays armed, one fire in flight at a time.
        ``spin_ns``/``nap_ns``: how the watcher polls (docs/gpu.md, "Triggers"). Raises,
        arming nothing, for a batch it cannot post. The default has no triggers.

        Returns None, or (a transport with :attr:`gpu_triggers`) the stream work of
        the batch: called with a raw CUDA stream handle and the value, it queues there
        the moves of the GPU entries' data and then the fire itself (cuda_ipc: of a
        private word, so that only the stream work fires what was armed); the watcher
        posts what is left (cuda_ipc: the entries' immediates)."""
        from .._errors import Unsupported

        raise Unsupported(
            f"{self.backend}:{self.provider} has no triggered writes; use a libfabric "
            "provider (shm, tcp, verbs, efa) or cuda_ipc's host regions"
        )

    def device_pointer(self, remote: Remote, offset: int) -> int:
        """The address, in this process's GPU address space, of byte ``offset`` of the
        peer's region ``remote``: a stream of ours can write it (a signal word a peer's
        stream waits on). Only where a peer's GPU memory is mapped here (cuda_ipc); the
        default refuses."""
        from .._errors import Unsupported

        raise Unsupported(
            f"{self.backend}:{self.provider} cannot address a peer's memory from a CUDA "
            "stream; peer words need cuda_ipc (GPUs of one host) and a GPU region on the peer"
        )

    def trigger_disarm(self, token: int) -> int:
        """Disarm trigger ``token``: 0 when nothing of it is in flight (no event
        follows), 1 when a fire is in flight (its ``OpDone`` follows), negative when it
        is not armed (a one-shot trigger that fired)."""
        return -2  # ENOENT: nothing was armed here

    def release_arm(self, imm: int, n: int, word: int, value: int, repeat: bool) -> int:
        """Arm a release word: once ``n`` arrivals of ``imm`` are counted, take them and
        store ``value`` into the 32-bit word at ``word`` (a release store); ``repeat``:
        again for every further ``n``. Returns its id. The default has none."""
        from .._errors import Unsupported

        raise Unsupported(
            f"{self.backend}:{self.provider} has no counter release words; use a libfabric "
            "provider (shm, tcp, verbs, efa) or cuda_ipc"
        )

    def release_fired(self, rid: int) -> int:
        """Stores release word ``rid`` made so far (negative: not known)."""
        return -2

    def release_disarm(self, rid: int) -> int:
        """Disarm release word ``rid``; returns the stores it made (negative: not known)."""
        return -2

    # ------------------------------------------------------------ progress and events

    @abstractmethod
    def pending_events(self) -> int:
        """How many events :meth:`drain` would return now (a cheap check)."""

    @abstractmethod
    def drain(self) -> list[Event]:
        """Every event ready now, oldest first."""

    @abstractmethod
    def spin(self, ns: int) -> bool:
        """Poll from the calling thread until an event is ready (True) or ``ns`` pass."""

    def counter_take_spin(self, imm: int, want: int, ns: int) -> int:
        """Take ``want`` arrivals of ``imm`` now or within ``ns`` of polling, arming nothing.

        Returns bits: TAKEN, EVENTS_READY, NOT_POLLED (the default: no such path;
        the wait then arms, spins with :meth:`spin` and awaits as usual)."""
        return NOT_POLLED

    def native_ops(self) -> NativeOps | None:
        """The native hot path (``native_ops.h``), or None: the engine then makes
        every post and poll through the Python methods, which are the contract.

        With it, the engine posts writes from host registrations (``device``
        "cpu", not ``staged``) into targets whose ``Remote.native`` is set, and
        takes counters, without a Python call into the transport."""
        return None

    def release(self) -> None:  # noqa: B027 (optional hook)
        """The calling thread goes idle: progress is the transport's own job again."""

    def error(self, status: int, what: str) -> Exception:
        """The exception for a negative status from this transport."""
        return status_error(status, what)

    @abstractmethod
    def stats(self) -> dict[str, int]: ...


class Backend(ABC):
    """A family of transports (libfabric, pyverbs, ...), registered as an entry point.

    ``"NAME"`` and ``"NAME:PROVIDER"`` select it by name; :meth:`accepts` claims
    bare specs (``"shm"``); :meth:`auto` offers candidates for ``"auto"``.
    """

    name: ClassVar[str]
    needs: ClassVar[str] = ""
    """What it needs to work, for the error naming what is installed."""

    def accepts(self, spec: str) -> str | None:
        """The provider a bare spec (no ``NAME:``) means for this backend, or None."""
        return None

    def auto(self, *, local_only: bool, nvlink: bool) -> list[tuple[int, str]]:
        """Candidates for ``"auto"``: ``(rank, provider)``, lower ranks first; only
        providers that work here."""
        return []

    @abstractmethod
    def providers(self) -> list[str]:
        """The providers usable on this machine now."""

    @abstractmethod
    def open(
        self, provider: str, *, domains: int, node: str | None, ctrl_max: int, cuda: str
    ) -> Transport:
        """Open a transport. ``cuda`` is the engine's wish for CUDA memory
        (``"auto"``, ``"direct"``, ``"staged"``): whether to ask the provider for
        device-memory registration is the backend's call."""


class Wrapper(ABC):
    """Wraps every transport an engine opens (entry-point group ``asyncfabric.wrappers``).

    The staged GPU path is one: it returns a forwarding transport (see
    :mod:`.forwarding`) or the transport itself when it has nothing to add.
    """

    name: ClassVar[str]
    ctrl_overhead: ClassVar[int] = 0
    """Bytes of framing the wrapper adds to each control message."""

    @abstractmethod
    def wrap(self, transport: Transport, *, cuda: str) -> Transport: ...
