"""cuda_ipc: GPU peers on one host, over NVLink (or PCIe) peer copies.

A GPU region's descriptor carries a CUDA IPC handle of its allocation; a writer
opens it once (cached per descriptor) and writes with copy-engine copies
(cuMemcpyAsync) on a dedicated stream per device. The immediates are delivered
only after the copy's event completed, as zero-byte writes through libfabric's
shm provider into the peer's doorbell, so the receiver counts them with the
same native ImmCounter machinery as over RDMA: the counting rule, the waits and
the failure handling are identical. Control messages and host regions go
through the same shm transport, so an engine of this backend talks to every
peer on the host, GPU or not.

No thread waits for a large copy: after it, a notify stream waits on an event
and runs a native CUDA host function that rings the engine's notify fd
(_staging.CopyWaiter, cudanote.c); the immediates are posted from the next
drain on the event-loop thread. The copy stream itself never stalls on the
host, so back-to-back writes keep the copy engines busy. Copies of at most
INLINE_SYNC_BYTES are waited on inline, which saves the wake-up for small
latency-bound writes.
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np

from ..._errors import BackendUnavailable, PeerUnreachable, TransferError
from ..._staging import CopyWaiter
from ...abc import Backend, EventSink, PolicyNs, RegHandle, Transport

MAGIC = b"AFNV1"
INLINE_SYNC_BYTES = 1 << 20
DOOR_BYTES = 1 << 16  # immediates posted per native call, at most
_INTERNAL = 1 << 62  # tokens of the imm posts this transport makes itself
_ADDR = struct.Struct("<16sQQ")  # boot id, doorbell base, doorbell key; then the shm address
_GPU_EXT = struct.Struct("<iiQQ")  # device, owner pid, offset in allocation, nbytes; then handle


def _boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return bytes.fromhex(f.read().strip().replace("-", ""))[:16].ljust(16, b"\0")
    except OSError:
        return b"\0" * 16


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class CudaIpcBackend(Backend):
    name = "cuda_ipc"

    def providers(self) -> list[str]:
        from ..libfabric import LibfabricBackend

        if not cuda_available() or "shm" not in LibfabricBackend().providers():
            return []
        return ["nvlink"]

    def open(
        self, provider: str, *, domains: int, node: str | None, ctrl_max: int, hmem: bool
    ) -> Transport:
        if provider not in ("", "nvlink"):
            raise BackendUnavailable(f"cuda_ipc has one provider, 'nvlink', not {provider!r}")
        if not cuda_available():
            raise BackendUnavailable(
                "cuda_ipc needs torch with a CUDA device; none is visible here "
                "(use a libfabric provider, which stages GPU memory through host memory)"
            )
        return CudaIpcTransport(ctrl_max=ctrl_max)


class _GpuRemote:
    __slots__ = ("ptr", "nbytes")

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.ptr, self.nbytes = ptr, nbytes


class _HostRemote:
    __slots__ = ("inner",)

    def __init__(self, inner: Any) -> None:
        self.inner = inner


class CudaIpcTransport(Transport):
    backend = "cuda_ipc"
    provider = "nvlink"
    cuda_native = True

    def __init__(self, *, ctrl_max: int) -> None:
        import torch

        from ..libfabric import LibfabricTransport

        self._torch = torch
        self._inner = LibfabricTransport("shm", domains=1, node=None, ctrl_max=ctrl_max, hmem=False)
        self.ndomains = 1
        self.max_msg_size = 1 << 40
        self.inject_size = 0
        self.ctrl_max = ctrl_max
        self._boot = _boot_id()
        self._door_buf = np.zeros(DOOR_BYTES, np.uint8)
        door = self._inner.register(
            int(self._door_buf.ctypes.data),
            DOOR_BYTES,
            remote_write=True,
            remote_read=False,
            device="cpu",
            device_index=-1,
        )
        self._door_handle = door.handle
        # Many immediates in one native call: a write of `count` bytes in 1-byte chunks
        # from this zeroed buffer into the peer's doorbell carries `count` immediates.
        self._zeros = np.zeros(DOOR_BYTES, np.uint8)
        self._zeros_reg = self._inner.register(
            int(self._zeros.ctypes.data),
            DOOR_BYTES,
            remote_write=False,
            remote_read=False,
            device="cpu",
            device_index=-1,
        )
        self._addresses = [
            MAGIC + _ADDR.pack(self._boot, door.bases[0], door.keys[0]) + self._inner.addresses[0]
        ]
        self._doors: dict[int, Any] = {}
        self._regs: dict[
            int, tuple[str, int, int]
        ] = {}  # handle -> (kind, inner handle|device, ptr)
        self._reg_ids = itertools.count(0)
        self._opened: dict[bytes, int] = {}  # IPC handle -> mapped base
        self._streams: dict[int, Any] = {}
        self._waiter = CopyWaiter(self._inner.notify_fd)
        self._done: list[tuple[int, int]] = []
        self._itokens = itertools.count(_INTERNAL)
        self._imm_errors = 0
        self._copies = 0
        self._closed = False

    # ------------------------------------------------------------ plumbing

    @property
    def addresses(self) -> list[bytes]:
        return list(self._addresses)

    @property
    def notify_fd(self) -> int:
        return self._inner.notify_fd

    def start(self, policy: PolicyNs) -> None:
        self._inner.start(policy)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._waiter.close()
        for s in self._streams.values():
            s.synchronize()
        from . import _driver

        for base in self._opened.values():
            _driver.ipc_close(base)
        self._opened.clear()
        self._inner.close()

    def add_peer(self, addresses: Sequence[bytes]) -> int:
        a = addresses[0]
        if not a.startswith(MAGIC) or len(a) <= len(MAGIC) + _ADDR.size:
            raise PeerUnreachable("not a cuda_ipc engine address; open both engines on cuda_ipc")
        boot, dbase, dkey = _ADDR.unpack_from(a, len(MAGIC))
        if boot != self._boot:
            raise PeerUnreachable(
                "the peer runs on another host (its boot id differs): cuda_ipc reaches GPUs of "
                "this host only; use an RDMA provider (efa, verbs) between hosts"
            )
        pid = self._inner.add_peer([a[len(MAGIC) + _ADDR.size :]])
        self._doors[pid] = self._inner.remote([dbase], [dkey])
        return pid

    def _stream(self, device: int) -> Any:
        s = self._streams.get(device)
        if s is None:
            s = self._streams[device] = self._torch.cuda.Stream(device=device)
        return s

    def cuda_order_after(self, producer: Any) -> None:
        """Copies issued from now on start after the work queued on ``producer``."""
        self._stream(producer.device.index).wait_stream(producer)

    # ------------------------------------------------------------ memory

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
        h = next(self._reg_ids)
        if device != "cuda":
            r = self._inner.register(
                ptr,
                nbytes,
                remote_write=remote_write,
                remote_read=remote_read,
                device=device,
                device_index=device_index,
            )
            self._regs[h] = ("host", r.handle, ptr)
            return RegHandle(h, r.keys, r.bases, b"H")
        from . import _driver

        dev = max(device_index, 0)
        _driver.use_device(dev)
        base, size = _driver.allocation_of(ptr)
        if ptr + nbytes > base + size:
            raise TransferError("the CUDA buffer runs past its allocation")
        handle = _driver.ipc_handle(base)
        ext = b"C" + _GPU_EXT.pack(dev, os.getpid(), ptr - base, nbytes) + handle
        self._regs[h] = ("cuda", dev, ptr)
        return RegHandle(h, (h,), (ptr,), ext)

    def deregister(self, handle: int) -> None:
        kind, inner, _ = self._regs.pop(handle, ("", -1, 0))
        if kind == "host":
            self._inner.deregister(inner)

    def remote(self, bases: Sequence[int], keys: Sequence[int], ext: bytes = b"") -> Any:
        if ext[:1] != b"C":
            return _HostRemote(self._inner.remote(bases, keys))
        from . import _driver

        dev, pid, off, nbytes = _GPU_EXT.unpack_from(ext, 1)
        handle = ext[1 + _GPU_EXT.size :]
        if pid == os.getpid():
            return _GpuRemote(int(bases[0]), nbytes)  # our own memory: no mapping needed
        base = self._opened.get(handle)
        if base is None:
            _driver.use_device(self._torch.cuda.current_device())
            base = self._opened[handle] = _driver.ipc_open(handle)
        return _GpuRemote(base + off, nbytes)

    # ------------------------------------------------------------ transfers

    def _post_imms(self, peer: int, imm: int, count: int) -> None:
        door, zp, zh = self._doors[peer], int(self._zeros.ctypes.data), self._zeros_reg.handle
        while count > 0:
            n = min(count, DOOR_BYTES)
            try:
                self._inner.post_write(next(self._itokens), peer, 1, zp, zh, n, 1, door, 0, imm)
            except Exception:
                self._imm_errors += 1
            count -= n

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
        if nbytes == 0:  # an immediate alone: straight into the peer's doorbell
            return self._inner.post_write(
                token, peer, 1, 0, -1, 0, chunk, self._doors[peer], 0, imm
            )
        kind, dev, _ = self._regs.get(handle, ("", -1, 0))
        if isinstance(remote, _HostRemote):
            if kind != "host":
                raise TransferError(
                    "cuda_ipc cannot write GPU memory into a peer's host memory; register a "
                    "CUDA tensor on the receiving side, or use a libfabric provider (staged path)"
                )
            return self._inner.post_write(
                token, peer, 1, ptr, dev, nbytes, chunk, remote.inner, roff, imm
            )
        from . import _driver

        device = dev if kind == "cuda" else self._torch.cuda.current_device()
        _driver.use_device(device)
        cs = self._stream(device).cuda_stream
        _driver.copy_async(remote.ptr + roff, ptr, nbytes, cs)
        self._copies += 1
        count = 0 if imm < 0 else max(1, -(-nbytes // chunk))
        if nbytes <= INLINE_SYNC_BYTES:
            _driver.stream_sync(cs)
            self._post_imms(peer, imm, count)
            return 1
        self._waiter.after_stream(cs, device, partial(self._landed, token, peer, imm, count))
        return 0

    def _landed(
        self, token: int, peer: int, imm: int, count: int, err: BaseException | None
    ) -> None:
        if err is None:
            self._post_imms(peer, imm, count)
        self._done.append((token, 0 if err is None else -5))

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
        kind, inner, _ = self._regs.get(handle, ("", -1, 0))
        if isinstance(remote, _HostRemote) and kind == "host":
            return self._inner.post_paged(
                token, peer, 1, ptr, inner, src_off, dst_off, page, remote.inner, imm
            )
        raise TransferError(
            "write_paged between GPU regions is not implemented on cuda_ipc yet; "
            "use write() per contiguous run"
        )

    def post_send(self, token: int, peer: int, data: bytes) -> int:
        return self._inner.post_send(token, peer, data)

    # ------------------------------------------------------------ counters and events

    def counter_arm(self, imm: int, want: int) -> bool:
        return self._inner.counter_arm(imm, want)

    def counter_give(self, imm: int, n: int) -> None:
        self._inner.counter_give(imm, n)

    def counter_disarm(self, imm: int) -> None:
        self._inner.counter_disarm(imm)

    def counter_avail(self, imm: int) -> int:
        return self._inner.counter_avail(imm)

    def counters_live(self) -> int:
        return self._inner.counters_live()

    def pending_events(self) -> int:
        return self._inner.pending_events() + len(self._done) + self._waiter.pending()

    def drain(self, sink: EventSink) -> int:
        self._waiter.run_done()
        n = 0
        if self._done:
            done, self._done = self._done, []
            for token, status in done:
                sink._on_op(token, status)
            n += len(done)
        return n + self._inner.drain(_Filter(sink, self))

    def spin(self, ns: int) -> int:
        return self._inner.spin(ns) or self.pending_events()

    def counter_take_spin(self, imm: int, want: int, ns: int) -> int:
        # Immediates land in the inner shm engine; copy notices are ours to report.
        r = self._inner.counter_take_spin(imm, want, ns)
        return r | 2 if self._done or self._waiter.pending() else r

    def error(self, status: int, what: str) -> Exception:
        return self._inner.error(status, what)

    def stats(self) -> dict[str, int]:
        st = self._inner.stats()
        st["cuda_copies"] = self._copies
        st["imm_post_errors"] = self._imm_errors
        return st


class _Filter:
    """Passes the inner transport's events on, keeping those of our own imm posts."""

    __slots__ = ("_sink", "_t")

    def __init__(self, sink: EventSink, t: CudaIpcTransport) -> None:
        self._sink, self._t = sink, t

    def _on_op(self, token: int, status: int) -> None:
        if token >= _INTERNAL:
            if status:
                self._t._imm_errors += 1
            return
        self._sink._on_op(token, status)

    def _on_counter(self, imm: int) -> None:
        self._sink._on_counter(imm)

    def _on_message(self, data: bytes) -> None:
        self._sink._on_message(data)

    def _on_fatal(self, domain: int, status: int) -> None:
        self._sink._on_fatal(domain, status)
