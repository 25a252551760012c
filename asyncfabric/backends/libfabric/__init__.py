"""libfabric backend: the native core (afcore.c, built with cffi) behind the Transport interface."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..._errors import BackendUnavailable, PeerUnreachable, RemoteAccessError, TransferError
from ...abc import Backend, EventSink, PolicyNs, RegHandle, Transport


def _rxe_universe_size() -> None:
    """SoftRoCE (rxe) allows at most 32767 CQ entries, and verbs;ofi_rxm sizes its MSG CQ from
    FI_UNIVERSE_SIZE (default 256), so fi_enable fails with EINVAL there. libfabric reads the
    variable once, at its first fi_getinfo, so it is set here, before any, when an rxe device
    exists and the user has not set it. Hardware HCAs (mlx5: millions of CQEs) are unaffected.
    """
    if "FI_UNIVERSE_SIZE" in os.environ:
        return
    try:
        devs = os.listdir("/sys/class/infiniband")
    except OSError:
        return
    for dev in devs:
        try:
            drv = os.path.basename(os.readlink(f"/sys/class/infiniband/{dev}/device/driver"))
        except OSError:
            drv = ""
        if dev.startswith("rxe") or drv == "rdma_rxe":
            os.environ["FI_UNIVERSE_SIZE"] = "8"
            return


_rxe_universe_size()

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

EV_OP, EV_COUNTER, EV_RECV, EV_FATAL = 1, 2, 3, 4
ACCESS_REMOTE_WRITE, ACCESS_REMOTE_READ = 1, 2
HMEM_SYSTEM, HMEM_CUDA = 0, 1
DRAIN_BATCH = 256

# libfabric errno values (fi_errno.h): peer loss versus access faults. ECANCELED (125)
# comes from rxm cancelling what was queued to a connection that broke.
_PEER_ERRNOS = {3, 103, 104, 107, 110, 111, 112, 113, 32, 5, 265, 125}
_ACCESS_ERRNOS = {13, 1, 129, 257}
_PROBE_ORDER = ("shm", "tcp", "verbs;ofi_rxm", "efa")


def _require() -> None:
    if _IMPORT_ERROR:
        raise BackendUnavailable(_IMPORT_ERROR)


def strerror(status: int) -> str:
    _require()
    return ffi.string(lib.afe_strerror(status)).decode()


class LibfabricBackend(Backend):
    name = "libfabric"

    def providers(self) -> list[str]:
        if _IMPORT_ERROR:
            return []
        err = ffi.new("char[256]")
        return [p for p in _PROBE_ORDER if lib.afe_probe(p.encode(), ffi.NULL, err, 256) == 0]

    def open(
        self, provider: str, *, domains: int, node: str | None, ctrl_max: int, hmem: bool
    ) -> Transport:
        _require()
        return LibfabricTransport(
            provider or "tcp", domains=domains, node=node, ctrl_max=ctrl_max, hmem=hmem
        )


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
        p = ffi.new(
            "af_policy *",
            (
                policy.spin_ns,
                policy.idle_block_ns,
                policy.busy_block_ns,
                policy.post_timeout_ns,
                policy.py_hold_ns,
            ),
        )
        rc = lib.afe_start(self._e, p)
        if rc:
            raise TransferError(f"cannot start the progress thread: {strerror(rc)}", -rc)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            lib.afe_close(self._e)
            self._e = ffi.NULL

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
        return int(out[0])

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
        device: str,
        device_index: int,
    ) -> RegHandle:
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
        return RegHandle(rc, tuple(int(k) for k in keys), tuple(int(b) for b in bases))

    def deregister(self, handle: int) -> None:
        rc = lib.afe_mr_close(self._e, handle)
        if rc:
            raise TransferError(f"deregistration failed: {strerror(rc)}", -rc)

    def remote(self, bases: Sequence[int], keys: Sequence[int], ext: bytes = b"") -> Any:
        return (ffi.new("uint64_t[]", list(bases)), ffi.new("uint64_t[]", list(keys)))

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
    ) -> int:
        rc = lib.afe_post_write(
            self._e,
            token,
            peer,
            ndom,
            ffi.cast("void *", ptr),
            handle,
            nbytes,
            chunk,
            remote[0],
            remote[1],
            roff,
            imm,
        )
        if rc < 0:
            raise self.error(rc, f"write of {nbytes} bytes")
        return rc

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
    ) -> int:
        rc = lib.afe_post_paged(
            self._e,
            token,
            peer,
            ndom,
            ffi.cast("void *", ptr),
            handle,
            ffi.from_buffer("uint64_t[]", src_off),
            ffi.from_buffer("uint64_t[]", dst_off),
            len(src_off),
            page,
            remote[0],
            remote[1],
            imm,
        )
        if rc < 0:
            raise self.error(rc, f"paged write of {len(src_off)} pages")
        return rc

    def post_send(self, token: int, peer: int, data: bytes) -> int:
        rc = lib.afe_post_send(self._e, token, peer, data, len(data))
        if rc < 0:
            raise self.error(rc, f"send of {len(data)} bytes")
        return rc

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

    def drain(self, sink: EventSink) -> int:
        if self._draining:  # the outer drain picks up whatever arrives meanwhile
            return 0
        self._draining = True
        total = 0
        try:
            buf, e = self._evbuf, self._e
            while True:
                n = lib.afe_drain(e, buf, DRAIN_BATCH)
                for i in range(n):
                    ev = buf[i]
                    kind = ev.kind
                    if kind == EV_OP:
                        if ev.len:  # failed early; the provider still holds pieces of it
                            sink._on_op(ev.token, ev.status, True)
                        else:
                            sink._on_op(ev.token, ev.status)
                    elif kind == EV_COUNTER:
                        sink._on_counter(ev.a)
                    elif kind == EV_RECV:
                        data = bytearray(ev.len)
                        lib.afe_recv_take(e, ev.a, ffi.from_buffer(data), ev.len)
                        sink._on_message(bytes(data))
                    else:
                        sink._on_fatal(ev.a, ev.status)
                total += n
                if n < DRAIN_BATCH and not lib.afe_nevents(e):
                    return total
        finally:
            self._draining = False

    def spin(self, ns: int) -> int:
        return lib.afe_spin(self._e, ns)

    def counter_take_spin(self, imm: int, want: int, ns: int) -> int:
        return lib.afe_counter_take_spin(self._e, imm, want, ns)

    def release(self) -> None:
        lib.afe_release(self._e)

    def error(self, status: int, what: str) -> Exception:
        errno = -status
        text = strerror(status)
        if errno in _ACCESS_ERRNOS:
            return RemoteAccessError(f"{what} was refused by the target: {text}", errno)
        if errno == 3:  # ESRCH, from the peer watch (afpeer.c)
            return PeerUnreachable(
                f"{what} failed: the peer's process has exited; its pending transfers failed "
                "and new ones are refused (connect to a live engine)",
                errno,
            )
        if errno == 110:
            return PeerUnreachable(
                f"{what} failed: the peer took or completed nothing within the engine's "
                "peer_timeout (is the peer's engine still open, is the link up?); a later "
                "transfer may succeed once it is reachable again",
                errno,
            )
        if errno in _PEER_ERRNOS:
            return PeerUnreachable(f"{what} failed, the peer is unreachable: {text}", errno)
        return TransferError(f"{what} failed: {text} (libfabric errno {errno})", errno)

    def stats(self) -> dict[str, int]:
        st = ffi.new("af_stats *")
        lib.afe_stats(self._e, st)
        return {k: int(getattr(st, k)) for k, _ in ffi.typeof("af_stats").fields}
