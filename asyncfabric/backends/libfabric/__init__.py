"""libfabric backend: the native core (the *.c units here, built with cffi) behind the contract."""

from __future__ import annotations

import signal
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..._errors import BackendUnavailable, PeerUnreachable, RegionError, TransferError
from ...transport.contract import (
    Backend,
    NativeOps,
    PagedWrite,
    PolicyNs,
    Registration,
    Remote,
    Target,
    Transport,
    WriteBatch,
)
from ...transport.events import CounterReady, Event, Fatal, Message, OpDone
from ...transport.status import status_error

try:
    from ._afcore import ffi, lib
except ImportError as exc:  # pragma: no cover - only without a build
    ffi = lib = None
    _IMPORT_ERROR: str | None = (
        f"the libfabric native core is not built ({exc}); reinstall asyncfabric "
        "(`pip install -e .`) with libfabric-dev present"
    )
else:
    _IMPORT_ERROR = None

# af_event kinds (afcore.h), memory access bits and FI_HMEM interfaces
EV_OP, EV_COUNTER, EV_RECV, EV_FATAL = 1, 2, 3, 4
ACCESS_REMOTE_WRITE, ACCESS_REMOTE_READ = 1, 2
HMEM_SYSTEM, HMEM_CUDA = 0, 1
DRAIN_BATCH = 256
# af_bent (afcore.h): one entry of a native batch
BENT = np.dtype(
    [("src", "<u8"), ("roff", "<u8"), ("len", "<u8"), ("imm", "<i8"), ("mr", "<i4"),
     ("tgt", "<u4"), ("idx", "<u4"), ("pad", "<u4")]
)  # fmt: skip

_PROBE_ORDER = ("shm", "tcp", "verbs;ofi_rxm", "efa")
# Bare specs this backend claims: libfabric provider names ("verbs;ofi_rxm" and any
# other "core;utility" pair too).
SHORT_NAMES = frozenset(
    {"shm", "tcp", "efa", "verbs", "verbs;ofi_rxm", "tcp;ofi_rxm", "sockets", "udp;ofi_rxd"}
)
# "auto": efa, then verbs, then tcp between hosts; shm when every peer shares the host.
_AUTO_RANK = {"efa": 10, "verbs;ofi_rxm": 20, "tcp": 30}
_AUTO_LOCAL_RANK = {"shm": 10}


def wants_hmem(cuda: str, provider: str) -> bool:
    """Whether to ask the provider for FI_HMEM (registering GPU memory directly).

    libfabric's shm provider turns CMA (one process_vm_readv per transfer) off for an
    endpoint opened with FI_HMEM: every host-memory transfer then goes through its
    bounce buffers, copied on both sides (docs/design.md, "The FI_HMEM rule on shm").
    So on shm GPU tensors take the staged path unless ``cuda="direct"`` asks.
    """
    if cuda == "staged":
        return False
    return cuda == "direct" or provider.partition(";")[0] != "shm"


def _postable(reg: Registration | None, hmem: bool) -> bool:
    """Whether the native core may hand ``reg``'s memory to the provider: host memory,
    or CUDA memory registered directly (iface CUDA) on a transport opened with FI_HMEM.

    A staged registration never is: its ``ptr`` is the GPU tensor's, only its mirror's
    keys are host memory (backends/staged posts from the mirror itself). Nor is another
    transport's (cuda_ipc's GPU registration: a device pointer and a handle of its own,
    which may well be the index of a live host MR of the shm engine under it)."""
    return reg is None or (
        not reg.staged and (reg.device == "cpu" or (hmem and reg.device == "cuda"))
    )


def _keep_python_sigint() -> None:
    """Give SIGINT back to Python once libfabric has loaded its providers.

    The first ``fi_getinfo`` loads every provider, and some install C-level SIGINT
    handlers (shm's; libinfinipath's under psm calls ``exit(1)``): Ctrl-C would
    then end the process at once, with no KeyboardInterrupt and no clean close.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        signal.signal(signal.SIGINT, handler)  # reinstalls Python's own C-level handler


def _require() -> None:
    if _IMPORT_ERROR:
        raise BackendUnavailable(_IMPORT_ERROR)


def strerror(status: int) -> str:
    _require()
    return ffi.string(lib.afe_strerror(status)).decode()


class LibfabricBackend(Backend):
    name = "libfabric"
    needs = "libfabric (Debian: libfabric1; building needs libfabric-dev)"

    def providers(self) -> list[str]:
        if _IMPORT_ERROR:
            return []
        err = ffi.new("char[256]")
        found = [p for p in _PROBE_ORDER if lib.afe_probe(p.encode(), ffi.NULL, err, 256) == 0]
        _keep_python_sigint()
        return found

    def accepts(self, spec: str) -> str | None:
        return spec if spec in SHORT_NAMES or ";" in spec else None

    def auto(self, *, local_only: bool, nvlink: bool) -> list[tuple[int, str]]:
        ranks = _AUTO_LOCAL_RANK if local_only else _AUTO_RANK
        return [(ranks[p], p) for p in self.providers() if p in ranks]

    def open(
        self, provider: str, *, domains: int, node: str | None, ctrl_max: int, cuda: str = "auto"
    ) -> Transport:
        _require()
        provider = provider or "tcp"
        return LibfabricTransport(
            provider,
            domains=domains,
            node=node,
            ctrl_max=ctrl_max,
            hmem=wants_hmem(cuda, provider),
        )


class LibfabricRemote(Remote):
    """A peer region: per-domain bases and keys as native arrays, ready to post with,
    and the whole of it as an ``af_btgt`` for the native table (``native``)."""

    __slots__ = ("bases_c", "keys_c", "_tgt")

    def __init__(self, peer: int, ndom: int, target: Target) -> None:
        super().__init__(peer, ndom, target)
        self.bases_c = ffi.new("uint64_t[]", list(target.bases))
        self.keys_c = ffi.new("uint64_t[]", list(target.keys))
        t = self._tgt = ffi.new("af_btgt *")
        t.peer, t.ndom, t.chunk = peer, ndom, self.chunk
        for d in range(ndom):
            t.base[d] = target.bases[d]
            t.key[d] = target.keys[d]
        self.native = int(ffi.cast("uintptr_t", t))


# The open transports of this process. A peer that is one of them never exits,
# so no pidfd reports it; closing it must tell the others first: on shm a post
# to a closed endpoint of this process touches unmapped memory (a segfault).
_OPEN_LOCK = threading.Lock()
_OPEN: weakref.WeakSet[LibfabricTransport] = weakref.WeakSet()


class LibfabricTransport(Transport):
    backend = "libfabric"

    def __init__(
        self, provider: str, *, domains: int, node: str | None, ctrl_max: int, hmem: bool
    ) -> None:
        err = ffi.new("char[512]")
        out = ffi.new("af_engine **")
        node_c = node.encode() if node else ffi.NULL
        rc = lib.afe_open(
            provider.encode(), node_c, domains, ctrl_max, 256, int(hmem), out, err, 512
        )
        if rc and hmem:
            # The provider does not advertise FI_HMEM: GPU memory goes the staged way.
            hmem = False
            rc = lib.afe_open(provider.encode(), node_c, domains, ctrl_max, 256, 0, out, err, 512)
        self.hmem = bool(hmem) and not rc
        _keep_python_sigint()
        if rc:
            msg = ffi.string(err).decode(errors="replace") or strerror(rc)
            raise BackendUnavailable(f"cannot open libfabric provider {provider!r}: {msg}")
        self._e = out[0]
        self._closed = False
        info = ffi.new("af_dominfo *")
        lib.afe_dominfo(self._e, 0, info)
        self.provider = ffi.string(info.provider).decode()
        self.ndomains = domains
        self.max_msg_size = int(info.max_msg_size)
        self.inject_size = int(info.inject_size)
        self.ctrl_max = ctrl_max
        self.info = [self._dominfo(i) for i in range(domains)]
        self._addresses = [self._getname(i) for i in range(domains)]
        self._evbuf = ffi.new("af_event[]", DRAIN_BATCH)
        self._u64 = ffi.new("uint64_t[]", 2 * domains)
        self._draining = False
        self._native: NativeOps | None = None
        self._peer_of: dict[bytes, list[int]] = {}  # domain-0 address -> peer indexes
        with _OPEN_LOCK:
            _OPEN.add(self)

    def _dominfo(self, i: int) -> dict[str, Any]:
        info = ffi.new("af_dominfo *")
        lib.afe_dominfo(self._e, i, info)
        return {
            "provider": ffi.string(info.provider).decode(),
            "fabric": ffi.string(info.fabric).decode(),
            "domain": ffi.string(info.domain).decode(),
            "max_msg_size": int(info.max_msg_size),
            "inject_size": int(info.inject_size),
            "cq_data_size": int(info.cq_data_size),
            "mr_mode": int(info.mr_mode),
            "tx_credits": int(info.tx_credits),
            "rx_slots": int(info.rx_slots),
            "wait_fd": int(info.wait_fd) >= 0,
            "rx_cq_data": bool(info.rx_cq_data),
        }

    def _getname(self, i: int) -> bytes:
        buf = ffi.new("char[1024]")
        ln = ffi.new("size_t *", 1024)
        rc = lib.afe_getname(self._e, i, buf, ln)
        if rc:
            raise TransferError(f"fi_getname failed: {strerror(rc)}", -rc)
        return bytes(ffi.buffer(buf, ln[0]))

    @property
    def addresses(self) -> list[bytes]:
        return list(self._addresses)

    @property
    def notify_fd(self) -> int:
        return int(lib.afe_notify_fd(self._e))

    def start(self, policy: PolicyNs) -> None:
        cpus = list(policy.cpus)[:16]
        p = ffi.new(
            "af_policy *",
            (
                policy.spin_ns,
                policy.idle_block_ns,
                policy.busy_block_ns,
                policy.post_timeout_ns,
                policy.py_hold_ns,
                policy.workers,
                len(cpus),
                cpus + [0] * (16 - len(cpus)),
            ),
        )
        rc = lib.afe_start(self._e, p)
        if rc:
            raise TransferError(f"cannot start the progress thread: {strerror(rc)}", -rc)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with _OPEN_LOCK:  # a transport in _OPEN has not begun to close
                _OPEN.discard(self)
                me = self._addresses[0]
                for t in list(_OPEN):
                    for peer in list(t._peer_of.get(me, ())):
                        lib.afe_peer_closed(t._e, peer)
            if self._native is not None:
                self._native.close()
            lib.afe_close(self._e)
            self._e = ffi.NULL

    def native_ops(self) -> NativeOps:
        if self._native is None:
            table = int(ffi.cast("uintptr_t", lib.afe_native_ops()))
            self._native = NativeOps(table, int(ffi.cast("uintptr_t", self._e)))
        return self._native

    def add_peer(self, addresses: Sequence[bytes]) -> int:
        keep = [ffi.from_buffer(a) for a in addresses]
        arr = ffi.new("void *[]", keep)
        out = ffi.new("int64_t *")
        rc = lib.afe_add_peer(self._e, len(addresses), arr, len(addresses[0]), out)
        if rc:
            raise PeerUnreachable(
                f"cannot add the peer's address to the address vector: {strerror(rc)} "
                "(is the peer's engine open, on the same provider, and reachable?)",
                -rc,
            )
        peer = int(out[0])
        self._peer_of.setdefault(bytes(addresses[0]), []).append(peer)
        return peer

    def watch_peer(self, peer: int, pid: int) -> None:
        lib.afe_peer_watch(self._e, peer, pid)

    def peer_dead(self, peer: int) -> bool:
        return bool(lib.afe_peer_dead(self._e, peer))

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
        access = (ACCESS_REMOTE_WRITE if remote_write else 0) | (
            ACCESS_REMOTE_READ if remote_read else 0
        )
        iface = HMEM_CUDA if device == "cuda" else HMEM_SYSTEM
        n = self.ndomains
        keys = ffi.new("uint64_t[]", n)
        bases = ffi.new("uint64_t[]", n)
        rc = lib.afe_mr_reg(
            self._e,
            ffi.cast("void *", ptr),
            nbytes,
            access,
            iface,
            max(device_index, 0),
            keys,
            bases,
        )
        if rc < 0:
            raise TransferError(
                f"memory registration of {nbytes} bytes failed: {strerror(rc)}", -rc
            )
        return Registration(
            rc,
            tuple(int(k) for k in keys),
            tuple(int(b) for b in bases),
            ptr,
            nbytes,
            device,
            device_index,
        )

    def deregister(self, reg: Registration) -> None:
        rc = lib.afe_mr_close(self._e, reg.handle)
        if rc:
            raise TransferError(f"deregistration failed: {strerror(rc)}", -rc)

    def remote(self, peer: int, ndom: int, target: Target) -> LibfabricRemote:
        return LibfabricRemote(peer, ndom, target)

    # The native paths below hand pointers to the provider as they are: shm opened
    # without FI_HMEM memcpy()s from and into them, and a device pointer there is a
    # SIGSEGV, not an error. So every post first checks what it was given (the kind is
    # known from the registration; a batch is checked once, when it is packed).

    def _refuse_local(self, reg: Registration, what: str, role: str) -> RegionError:
        kind = f"{'staged ' if reg.staged else ''}{reg.device}"
        if reg.staged:
            why = "its pointer is the GPU tensor's; only its host mirror may be posted"
        elif self.hmem:
            why = "the provider takes host and directly registered cuda memory only"
        else:
            why = (
                "this transport was opened without FI_HMEM, so the provider copies host memory only"
            )
        return RegionError(
            f"{what}: the {role} is {kind} memory, which libfabric:{self.provider} cannot "
            f"touch ({why}); post it through an engine whose transport stages GPU memory "
            "(Engine(cuda='auto') on a libfabric provider) or copies it itself (cuda_ipc), "
            "or copy it into a registered host buffer first"
        )

    def _refuse_remote(self, dst: Remote, what: str, role: str) -> RegionError:
        return RegionError(
            f"{what}: the {role} is a {type(dst).__name__} (a GPU or staged region that a "
            f"wrapper prepared), not a region libfabric:{self.provider} can address; post it "
            "through that wrapper (the engine does), never to the libfabric transport directly"
        )

    def _check_write(self, dst: Remote, src: Registration | None, what: str) -> None:
        if dst.__class__ is not LibfabricRemote:
            raise self._refuse_remote(dst, what, "destination")
        if src is not None and not _postable(src, self.hmem):
            raise self._refuse_local(src, what, "source")

    def _check_batch(self, batch: WriteBatch) -> None:
        """Refuse, naming the first entry, a batch with memory the provider cannot touch."""
        for k, r in enumerate(batch.srcs):
            if not _postable(r, self.hmem):
                i = int(np.flatnonzero(batch.src == k)[0])
                assert r is not None
                raise self._refuse_local(r, f"batch entry {i}", "source")
        for k, d in enumerate(batch.dsts):
            if d.__class__ is not LibfabricRemote:
                i = int(np.flatnonzero(batch.dst == k)[0])
                raise self._refuse_remote(d, f"batch entry {i}", "destination")

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
        if dst.__class__ is not LibfabricRemote or (
            src is not None and (src.staged or src.device != "cpu")
        ):
            self._check_write(dst, src, f"write of {nbytes} bytes")
        r: LibfabricRemote = dst  # type: ignore[assignment]
        if src is None:
            ptr, handle = ffi.NULL, -1
        else:
            ptr, handle = ffi.cast("void *", src.ptr + soff), src.handle
        rc = lib.afe_post_write(
            self._e,
            token,
            r.peer,
            r.ndom,
            ptr,
            handle,
            nbytes,
            r.chunk,
            r.bases_c,
            r.keys_c,
            roff,
            imm,
        )
        if rc < 0:
            raise self.error(rc, f"write of {nbytes} bytes")
        return rc == 1

    def post_paged(self, op: PagedWrite) -> bool:
        self._check_write(op.dst, op.src, f"paged write of {len(op.src_off)} pages")
        r: LibfabricRemote = op.dst  # type: ignore[assignment]
        rc = lib.afe_post_paged(
            self._e,
            op.token,
            r.peer,
            r.ndom,
            ffi.cast("void *", op.src.ptr),
            op.src.handle,
            ffi.from_buffer("uint64_t[]", op.src_off),
            ffi.from_buffer("uint64_t[]", op.dst_off),
            len(op.src_off),
            op.page,
            r.bases_c,
            r.keys_c,
            op.imm,
        )
        if rc < 0:
            raise self.error(rc, f"paged write of {len(op.src_off)} pages")
        return rc == 1

    def post_batch(self, batch: WriteBatch) -> bool:
        packed = batch.cache.get("libfabric")
        if packed is None:
            self._check_batch(batch)  # once per compiled batch: reposts reuse the packing
            packed = batch.cache["libfabric"] = _pack_batch(batch)
        tgts, ntgt, ents, n = packed
        rc = lib.afe_post_batch(
            self._e, batch.token, tgts, ntgt, ents, n, ffi.from_buffer("int32_t[]", batch.status)
        )
        if rc < 0:
            raise self.error(rc, f"batch of {n} writes")
        return rc > 0

    def post_read(
        self, token: int, src: Remote, roff: int, dst: Registration, doff: int, nbytes: int
    ) -> bool:
        if src.__class__ is not LibfabricRemote:
            raise self._refuse_remote(src, f"read of {nbytes} bytes", "source")
        if not _postable(dst, self.hmem):
            raise self._refuse_local(dst, f"read of {nbytes} bytes", "destination")
        r: LibfabricRemote = src  # type: ignore[assignment]
        rc = lib.afe_post_read(
            self._e,
            token,
            r.peer,
            r.ndom,
            ffi.cast("void *", dst.ptr + doff),
            dst.handle,
            nbytes,
            r.chunk,
            r.bases_c,
            r.keys_c,
            roff,
        )
        if rc < 0:
            raise self.error(rc, f"read of {nbytes} bytes")
        return rc == 1

    def post_send(self, token: int, peer: int, data: bytes) -> bool:
        rc = lib.afe_post_send(self._e, token, peer, data, len(data))
        if rc < 0:
            raise self.error(rc, f"send of {len(data)} bytes")
        return rc == 1

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
    ) -> None:
        for i, src in enumerate(batch.srcs):
            if src is not None and (src.device != "cpu" or src.staged):
                raise RegionError(
                    f"a triggered write posts from host memory only; source {i} is "
                    f"{'staged ' if src.staged else ''}{src.device} memory (copy it into a "
                    "registered host buffer on the stream before the trigger fires)"
                )
        for r in batch.dsts:
            if not isinstance(r, LibfabricRemote):
                raise RegionError(
                    "a triggered write goes into host memory only; a target is a GPU or "
                    "staged region (write into a host region and copy it on the peer's stream)"
                )
        packed = batch.cache.get("libfabric")
        if packed is None:
            packed = batch.cache["libfabric"] = _pack_batch(batch)
        tgts, ntgt, ents, n = packed
        rc = lib.afe_trig_arm(
            self._e, token, ffi.cast("uint32_t *", word), value, reset, int(repeat), tgts,
            ntgt, ents, n, ffi.from_buffer("int32_t[]", batch.status), spin_ns, nap_ns,
        )  # fmt: skip
        if rc < 0:
            raise self.error(rc, f"arming a trigger of {n} writes")

    def trigger_disarm(self, token: int) -> int:
        return int(lib.afe_trig_disarm(self._e, token))

    def release_arm(self, imm: int, n: int, word: int, value: int, repeat: bool) -> int:
        out = ffi.new("int64_t *")
        rc = lib.afe_rel_arm(self._e, imm, n, ffi.cast("uint32_t *", word), value, int(repeat), out)
        if rc < 0:
            raise self.error(rc, f"arming a release word on imm={imm}")
        return int(out[0])

    def release_fired(self, rid: int) -> int:
        return int(lib.afe_rel_fired(self._e, rid))

    def release_disarm(self, rid: int) -> int:
        return int(lib.afe_rel_disarm(self._e, rid))

    def counter_arm(self, imm: int, want: int) -> bool:
        return bool(lib.afe_counter_arm(self._e, imm, want))

    def counter_give(self, imm: int, n: int) -> None:
        lib.afe_counter_give(self._e, imm, n)

    def counter_disarm(self, imm: int) -> None:
        lib.afe_counter_disarm(self._e, imm)

    def counter_avail(self, imm: int) -> int:
        return int(lib.afe_counter_avail(self._e, imm))

    def counters_live(self) -> int:
        return int(lib.afe_counter_live(self._e))

    def pending_events(self) -> int:
        return lib.afe_nevents(self._e)

    def drain(self) -> list[Event]:
        out: list[Event] = []
        buf, e, add = self._evbuf, self._e, out.append
        while True:
            n = lib.afe_drain(e, buf, DRAIN_BATCH)
            for i in range(n):
                ev = buf[i]
                kind = ev.kind
                if kind == EV_OP:
                    # len 1: failed early; the provider still holds pieces of it
                    add(OpDone(ev.token, ev.status, bool(ev.len)))
                elif kind == EV_COUNTER:
                    add(CounterReady(ev.a))
                elif kind == EV_RECV:
                    data = bytearray(ev.len)
                    lib.afe_recv_take(e, ev.a, ffi.from_buffer(data), ev.len)
                    add(Message(bytes(data)))
                else:
                    err = self.error(
                        ev.status, f"the completion queue of domain {ev.a} (a fatal error)"
                    )
                    add(Fatal(err))
            if n < DRAIN_BATCH or not lib.afe_nevents(e):
                return out

    def spin(self, ns: int) -> bool:
        return bool(lib.afe_spin(self._e, ns))

    def counter_take_spin(self, imm: int, want: int, ns: int) -> int:
        return lib.afe_counter_take_spin(self._e, imm, want, ns)

    def release(self) -> None:
        lib.afe_release(self._e)

    def error(self, status: int, what: str) -> Exception:
        return status_error(status, what, f"{strerror(status)} (libfabric errno {-status})")

    def stats(self) -> dict[str, int]:
        st = ffi.new("af_stats *")
        lib.afe_stats(self._e, st)
        return {k: int(getattr(st, k)) for k, _ in ffi.typeof("af_stats").fields}


def _pack_batch(batch: WriteBatch) -> tuple[Any, int, Any, int]:
    """The native form of a batch (afcore.h): targets, and entries sorted by peer.

    Built once per compiled batch (it is cached in ``batch.cache``); the entries'
    ``idx`` keep each one's place, where the core writes its status."""
    dsts = batch.dsts
    tgts = ffi.new("af_btgt[]", len(dsts))
    for i, r in enumerate(dsts):
        t = tgts[i]
        t.peer, t.ndom, t.chunk = r.peer, r.ndom, r.chunk
        for d in range(r.ndom):
            t.base[d] = r.target.bases[d]
            t.key[d] = r.target.keys[d]
    ptr = np.array([0 if s is None else s.ptr for s in batch.srcs], np.uint64)
    mr = np.array([-1 if s is None else s.handle for s in batch.srcs], np.int32)
    peer = np.array([r.peer for r in dsts], np.uint32)[batch.dst]
    order = np.argsort(peer, kind="stable") if len(dsts) > 1 else np.arange(len(peer))
    n = len(order)
    ents = np.zeros(n, BENT)
    src = batch.src[order]
    ents["src"] = np.where(batch.nbytes[order] > 0, ptr[src] + batch.soff[order], 0)
    ents["roff"] = batch.doff[order]
    ents["len"] = batch.nbytes[order]
    ents["imm"] = batch.imm[order]
    ents["mr"] = mr[src]
    ents["tgt"] = batch.dst[order]
    ents["idx"] = order
    return tgts, len(dsts), ffi.from_buffer("af_bent[]", ents), n
