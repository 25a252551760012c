"""cuda_ipc: GPU peers on one host, over NVLink (or PCIe) peer copies.

A forwarding transport (:class:`~asyncfabric.transport.ForwardingTransport`)
over a libfabric shm transport. A GPU region's descriptor carries a CUDA IPC
handle of its allocation; a writer opens it once (cached per descriptor) and
writes with copy-engine copies (cuMemcpyAsync) on a dedicated stream per device,
ordered after the caller's producer stream. The immediates are delivered only
after the copy completed, as zero-byte-chunk writes through shm into the peer's
doorbell, so the receiver counts them with the same native counters as over
RDMA: the counting rule (:func:`~asyncfabric.transport.expected_imms`), the
waits and the failure handling are identical. Control messages and host
regions go through the same shm transport, so an engine of this backend talks
to every peer on the host, GPU or not; peer watch and release are the shm
transport's own, forwarded by the base.

No thread waits for a large copy: the copy stream then writes a word on which
the write's immediates are armed, and the shm transport's trigger watcher posts
them (or, with every word lent or ``ASYNCFABRIC_CUDA_IPC_TRIGGERS=0``, a notify
stream runs a native CUDA host function that rings the engine's notify fd,
:class:`~asyncfabric.backends.staged.CopyWaiter`, cudanote.c, and the next drain
posts them). The copy stream itself never stalls on the host, so back-to-back
writes keep the copy engines busy. Copies of at most INLINE_SYNC_BYTES are
waited on inline, which saves the wake-up for small latency-bound writes. Small
copies that a stream makes without the host (a triggered batch's; a small write
ended by a trigger) go through the copy kernel (:mod:`._kernel`) instead of a
copy engine.

The doorbell posts are this transport's own (tokens from ``2**62`` up to the
fallback batches' sub-tokens at ``2**63``): :func:`drop_internal` keeps their
completions, held or final, from the engine.

Batches (``write_many``, ``scatter``, ``barrier``) with a GPU source or a GPU target
go entry by entry through :meth:`CudaIpcTransport.post_write` (the contract's
fallback); only all-host batches reach the shm transport's native batch path, which
copies host memory only (a GPU pointer there was a SIGSEGV, docs/weights.md "GPU").
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import os
import struct
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, ClassVar

import numpy as np

from ..._errors import (
    BackendUnavailable,
    DescriptorError,
    PeerUnreachable,
    RegionError,
    TransferError,
    Unsupported,
)
from ..._flag import U32_MAX, check_reset
from ...transport import (
    EVENTS_READY,
    NO_IMM,
    Backend,
    EventQueue,
    ForwardingTransport,
    OpDone,
    PagedWrite,
    Registration,
    Remote,
    Target,
    Transport,
    WriteBatch,
    expected_imms,
)
from ...transport.batching import SUB_BIT, post_batch_each
from ...transport.events import Event
from ...transport.status import IO_ERROR
from ..staged.copies import CopyWaiter, producer_stream
from ._kernel import CopyKernel

MAGIC = b"AFNV1"
INLINE_SYNC_BYTES = 1 << 20
KERNEL_BYTES = 1 << 16  # stream-made GPU copies up to this size go through the copy kernel
COPY_SPIN_NS, COPY_NAP_NS = 1_000_000, 20_000  # how the watcher polls a large copy's word
DOOR_BYTES = 1 << 16  # immediates posted per native call, at most
INTERNAL_TOKENS = 1 << 62  # tokens of the imm posts this transport makes itself
_ADDR = struct.Struct("<16sQQ")  # boot id, doorbell base, doorbell key; then the shm address
_GPU_EXT = struct.Struct("<iiQQ")  # device, owner pid, offset in allocation, nbytes; then handle
_HANDLE_BYTES = 64
_HOST, _GPU = b"H", b"C"  # first byte of a registration's ext


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
    try:
        return bool(torch.cuda.is_available())
    except Exception:
        return False


def drop_internal(events: list[Event]) -> tuple[list[Event], int]:
    """``events`` without the completions of our own doorbell posts (held or final),
    and how many of those finally failed. Every other event passes unchanged
    (an engine transfer's ``OpDone(token, status, held=True)`` included)."""
    keep: list[Event] | None = None
    failed = 0
    for i, ev in enumerate(events):
        # (a fallback batch's sub-tokens, SUB_BIT set, are the engine's)
        if ev.__class__ is OpDone and INTERNAL_TOKENS <= ev.token < SUB_BIT:  # type: ignore[union-attr]
            if ev.status and not ev.held:  # type: ignore[union-attr]
                failed += 1
            if keep is None:
                keep = events[:i]
        elif keep is not None:
            keep.append(ev)
    return (events if keep is None else keep), failed


class CudaIpcBackend(Backend):
    name = "cuda_ipc"
    needs = "torch with a CUDA device, and libfabric's shm"

    def providers(self) -> list[str]:
        from ..libfabric import LibfabricBackend

        if not cuda_available() or "shm" not in LibfabricBackend().providers():
            return []
        return ["nvlink"]

    def auto(self, *, local_only: bool, nvlink: bool) -> list[tuple[int, str]]:
        if local_only and nvlink and self.providers():
            return [(0, "nvlink")]
        return []

    def open(
        self, provider: str, *, domains: int, node: str | None, ctrl_max: int, cuda: str
    ) -> Transport:
        if provider not in ("", "nvlink"):
            raise BackendUnavailable(f"cuda_ipc has one provider, 'nvlink', not {provider!r}")
        if not cuda_available():
            raise BackendUnavailable(
                "cuda_ipc needs torch with a CUDA device; none is visible here "
                "(use a libfabric provider, which stages GPU memory through host memory)"
            )
        from ..libfabric import LibfabricTransport

        inner = LibfabricTransport("shm", domains=1, node=None, ctrl_max=ctrl_max, hmem=False)
        try:
            return CudaIpcTransport(inner)
        except BaseException:
            inner.close()
            raise


def _stream_handle(device: int, stream: Any) -> int:
    """The handle of the stream a CUDA source is read after (the caller's, else the
    device's current stream), without building a torch Stream object where torch
    can say it directly."""
    if stream is None:
        raw = _raw_current_stream()
        if raw is not None:
            return int(raw(device))
    return int(producer_stream(device, stream).cuda_stream)


def _raw_current_stream() -> Callable[[int], int] | None:
    import torch

    return getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _gpu_batch(batch: WriteBatch) -> bool:
    """Whether ``batch`` has a GPU side; raises, before anything is posted, naming the
    first entry that writes GPU memory into a host region (which post_write refuses)."""
    cuda_src = [r is not None and r.device == "cuda" for r in batch.srcs]
    gpu_dst = [d.__class__ is _GpuRemote for d in batch.dsts]
    if not any(cuda_src) and not any(gpu_dst):
        return False
    bad = (
        np.array(cuda_src, bool)[batch.src]
        & ~np.array(gpu_dst, bool)[batch.dst]
        & (batch.nbytes > 0)
    )
    if bad.any():
        raise RegionError(
            f"batch entry {int(np.argmax(bad))}: cuda_ipc cannot write GPU memory into a "
            "peer's host memory; register a CUDA tensor on the receiving side, or use a "
            "libfabric provider (staged path)"
        )
    return True


class _CopyWords:
    """One GPU's words that triggers fire on (a large copy's end, a GPU trigger's
    private word): pinned host memory mapped into the GPU, 64 bytes apart, each lent
    to one write in flight or one armed trigger. 64 KiB per transport and GPU, kept
    for the process's life (``host_words``)."""

    __slots__ = ("host", "dev", "free")

    STRIDE = 64
    WORDS = 1024

    def __init__(self, host: int, dev: int, n: int) -> None:
        self.host, self.dev = host, dev
        self.free = list(range(n - 1, -1, -1))

    @classmethod
    def allocate(cls, n: int = WORDS) -> _CopyWords:
        from . import _driver

        host, dev = _driver.host_words(n * cls.STRIDE)
        return cls(host, dev, n)

    def take(self) -> int:
        """A free word's index (its word is 0), or -1 when every word is lent."""
        return self.free.pop() if self.free else -1

    def give(self, i: int) -> None:
        ctypes.c_uint32.from_address(self.host + i * self.STRIDE).value = 0
        self.free.append(i)


class _StreamCopies:
    """A triggered GPU batch's stream work: its copies, queued on the firing stream
    (``cuMemcpyAsync`` into the peer's mapped memory), then the write of the private
    word its immediates are armed on. All captured into CUDA graphs.

    ``gate``: a repeating trigger's reset value. The stream first waits until the
    word holds it again, i.e. until the watcher took the previous fire. A stream that
    runs ahead of the host (signal words let it) would otherwise store the value
    again before the watcher saw it go back, and two fires would post once: the
    peer's counter would miss immediates, silently."""

    __slots__ = ("copies", "word", "gate", "kernels")

    def __init__(
        self,
        copies: list[tuple[int, int, int, int]],
        word: int,
        gate: int | None = None,
        kernels: dict[int, CopyKernel] | None = None,
    ) -> None:
        self.copies = copies  # (dst ptr, src ptr, nbytes, device)
        self.word = word  # the armed word, as the GPU addresses it
        self.gate = gate
        # index of a copy -> the copy kernel that makes it (small copies); the last
        # copy's kernel also stores the word when it runs on the word's device
        self.kernels = kernels or {}

    def __call__(self, stream: int, value: int) -> None:
        from . import _driver

        # The gate comes first: nothing of this fire reaches the peer's memory before
        # the watcher took the previous one.
        if self.gate is not None:
            _driver.wait_value32(stream, self.word, self.gate, _driver.WAIT_VALUE_EQ)
        current, last, stored = -1, len(self.copies) - 1, False
        for j, (dst, src, n, dev) in enumerate(self.copies):
            if dev != current:
                _driver.use_device(dev)
                current = dev
            k = self.kernels.get(j)
            if k is None:
                _driver.copy_async(dst, src, n, stream)
            elif j == last and dev == self.copies[0][3]:
                k.launch(stream, dst, src, n, self.word, value)
                stored = True
            else:
                k.launch(stream, dst, src, n)
        if not stored:
            _driver.write_value32(stream, self.word, value)


class _GpuRemote(Remote):
    """A peer's GPU region, mapped into this process (or our own)."""

    __slots__ = ("ptr", "nbytes")

    def __init__(self, peer: int, ndom: int, target: Target, ptr: int, nbytes: int) -> None:
        super().__init__(peer, ndom, target)
        self.ptr, self.nbytes = ptr, nbytes


class CudaIpcTransport(ForwardingTransport):
    """CUDA IPC copies for GPU regions; the inner shm transport for everything else."""

    cuda_native: ClassVar[bool] = True
    gpu_triggers: ClassVar[bool] = True
    devices: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda"})
    cuda_path = "ipc"

    def __init__(self, inner: Transport) -> None:
        super().__init__(inner)
        self.backend = "cuda_ipc"
        self.provider = "nvlink"
        self.ndomains = 1
        self.max_msg_size = 1 << 40
        self.inject_size = 0
        self.hmem = False
        self._boot = _boot_id()
        self._door_buf = np.zeros(DOOR_BYTES, np.uint8)
        door = inner.register(
            int(self._door_buf.ctypes.data),
            DOOR_BYTES,
            remote_write=True,
            remote_read=False,
            device="cpu",
            device_index=-1,
            owner=self._door_buf,
        )
        # Many immediates in one native call: a write of `count` bytes in 1-byte chunks
        # from this zeroed buffer into the peer's doorbell carries `count` immediates.
        self._zeros = np.zeros(DOOR_BYTES, np.uint8)
        self._zeros_reg = inner.register(
            int(self._zeros.ctypes.data),
            DOOR_BYTES,
            remote_write=False,
            remote_read=False,
            device="cpu",
            device_index=-1,
            owner=self._zeros,
        )
        self._addresses = [
            MAGIC + _ADDR.pack(self._boot, door.bases[0], door.keys[0]) + inner.addresses[0]
        ]
        self._doors: dict[int, Remote] = {}
        self._gpu_ids = itertools.count(1)
        self._opened: dict[bytes, int] = {}  # IPC handle -> mapped base
        self._streams: dict[int, Any] = {}
        self._waiter = CopyWaiter(inner.notify_fd)
        self._q = EventQueue()
        self._itokens = itertools.count(INTERNAL_TOKENS)
        self._imm_errors = 0
        self._copies = 0
        self._closed = False
        # A large copy's end: the copy stream writes a word the shm transport's
        # trigger watcher watches, which then posts the write's immediates itself;
        # without copy_triggers (or a free word), a host function (copy notice).
        self.copy_triggers = os.environ.get("ASYNCFABRIC_CUDA_IPC_TRIGGERS", "1") != "0"
        self._words: dict[int, _CopyWords] = {}
        # token -> the word lent to a trigger of ours (a large copy's end, a GPU
        # trigger), whether it repeats (kept until disarmed), and what must stay alive
        self._lent: dict[int, tuple[_CopyWords, int, bool, Any]] = {}
        self._door_cache: dict[tuple[int, int, int], WriteBatch] = {}
        # Small GPU-to-GPU copies made by the stream (a triggered batch's, a small
        # write ended by a trigger) by the copy kernel (_kernel.py) instead of the
        # copy engine: ASYNCFABRIC_CUDA_IPC_KERNEL_BYTES sets the largest (0: never).
        self.kernel_bytes = int(os.environ.get("ASYNCFABRIC_CUDA_IPC_KERNEL_BYTES", KERNEL_BYTES))
        self._kernels: dict[int, CopyKernel | None] = {}
        self.kernel_error = ""  # why the kernel could not load, if it could not
        # How a small write ends: by a trigger on the word the copy kernel stores
        # after its copy (ASYNCFABRIC_CUDA_IPC_SMALL=trigger), or by a stream sync
        # after a copy-engine copy and the immediates posted inline (=sync). Copies
        # up to sync_bytes (ASYNCFABRIC_CUDA_IPC_SYNC_BYTES) are waited on inline.
        self.small_triggers = os.environ.get("ASYNCFABRIC_CUDA_IPC_SMALL", "sync") == "trigger"
        self.sync_bytes = int(os.environ.get("ASYNCFABRIC_CUDA_IPC_SYNC_BYTES", INLINE_SYNC_BYTES))
        self._kernel_copies = 0

    # ------------------------------------------------------------ plumbing

    @property
    def addresses(self) -> list[bytes]:
        return list(self._addresses)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._waiter.close()
        for s in self._streams.values():
            try:
                s.synchronize()
            except Exception:
                pass
        if self._opened:
            from . import _driver

            for base in self._opened.values():
                _driver.ipc_close(base)
            self._opened.clear()
        self.inner.close()

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
        pid = self.inner.add_peer([a[len(MAGIC) + _ADDR.size :]])
        self._doors[pid] = self.inner.remote(
            pid, 1, Target((dbase,), (dkey,), DOOR_BYTES, chunk_bytes=1)
        )
        return pid

    def _stream(self, device: int) -> Any:
        s = self._streams.get(device)
        if s is None:
            import torch

            s = self._streams[device] = torch.cuda.Stream(device=device)
        return s

    # ------------------------------------------------------------ memory

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
        if device != "cuda":
            r = self.inner.register(
                ptr,
                nbytes,
                remote_write=remote_write,
                remote_read=remote_read,
                device=device,
                device_index=device_index,
                owner=owner,
            )
            return dataclasses.replace(r, ext=_HOST + r.ext)
        from . import _driver

        dev = max(device_index, 0)
        _driver.use_device(dev)
        base, size = _driver.allocation_of(ptr)
        if ptr + nbytes > base + size:
            raise RegionError("the CUDA buffer runs past its allocation")
        handle = _driver.ipc_handle(base)
        ext = _GPU + _GPU_EXT.pack(dev, os.getpid(), ptr - base, nbytes) + handle
        h = next(self._gpu_ids)
        return Registration(h, (h,), (ptr,), ptr, nbytes, "cuda", dev, ext)

    def deregister(self, reg: Registration) -> None:
        if reg.device != "cuda":
            self.inner.deregister(reg)

    def remote(self, peer: int, ndom: int, target: Target) -> Remote:
        ext = target.ext
        tag = ext[:1]
        if tag == _HOST:
            return self.inner.remote(peer, 1, dataclasses.replace(target, ext=ext[1:]))
        if tag != _GPU or len(ext) != 1 + _GPU_EXT.size + _HANDLE_BYTES or not target.bases:
            raise DescriptorError(
                "the descriptor is not a cuda_ipc region's (its extension is missing or "
                "malformed); open both engines on cuda_ipc"
            )
        dev, pid, off, nbytes = _GPU_EXT.unpack_from(ext, 1)
        if pid == os.getpid():  # our own memory: no mapping needed
            return _GpuRemote(peer, 1, target, int(target.bases[0]), nbytes)
        handle = ext[1 + _GPU_EXT.size :]
        base = self._opened.get(handle)
        if base is None:
            import torch

            from . import _driver

            _driver.use_device(torch.cuda.current_device())
            base = self._opened[handle] = _driver.ipc_open(handle)
        return _GpuRemote(peer, 1, target, base + off, nbytes)

    # ------------------------------------------------------------ transfers

    def _post_imms(self, peer: int, imm: int, count: int) -> None:
        door, zeros = self._doors[peer], self._zeros_reg
        while count > 0:
            n = min(count, DOOR_BYTES)
            self.inner.post_write(next(self._itokens), door, 0, zeros, 0, n, imm, None)
            count -= n

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
        if nbytes == 0:  # an immediate alone: straight into the peer's doorbell
            return self.inner.post_write(token, self._doors[dst.peer], 0, None, 0, 0, imm, None)
        assert src is not None
        if dst.__class__ is not _GpuRemote:
            if src.device == "cuda":
                raise RegionError(
                    "cuda_ipc cannot write GPU memory into a peer's host memory; register a "
                    "CUDA tensor on the receiving side, or use a libfabric provider (staged path)"
                )
            return self.inner.post_write(token, dst, roff, src, soff, nbytes, imm, stream)
        import torch

        from . import _driver

        on_gpu = src.device == "cuda"
        device = src.device_index if on_gpu else torch.cuda.current_device()
        _driver.use_device(device)
        count = 0 if imm == NO_IMM else expected_imms(nbytes, chunk_bytes=dst.chunk)
        dptr, sptr = dst.ptr + roff, src.ptr + soff  # type: ignore[attr-defined]
        # The copy kernel where a small write ends by a trigger; synced inline, the
        # copy engine (a kernel launch + sync measured 2.6 us slower, docs/gpu.md).
        small = on_gpu and nbytes <= self.kernel_bytes and self.small_triggers
        k = self._kernel(device) if small else None
        if k is not None:
            # A small write ended by a trigger: the kernel, queued on the producer's
            # stream (ordered after its work, no event), copies and then stores the
            # word on which the watcher posts the immediates: no host sync, no Python
            # after this call. Every word lent: the inline path below.
            handle = _stream_handle(device, stream)
            store = partial(k.launch, handle, dptr, sptr, nbytes)
            if self._fire_after(token, device, dst.peer, imm, count, store):
                self._kernel_copies += 1
                self._copies += 1
                return False
        if nbytes <= self.sync_bytes:
            # Waited on inline: the copy goes on the producer's stream itself, which
            # orders it after the producer's work with no event and no stream wait,
            # and the sync waits for nothing the copy did not wait for already.
            handle = (
                _stream_handle(device, stream) if on_gpu else int(self._stream(device).cuda_stream)
            )
            if k is not None:  # (every word lent: synced after all)
                k.launch(handle, dptr, sptr, nbytes)
                self._kernel_copies += 1
            else:
                _driver.copy_async(dptr, sptr, nbytes, handle)
            self._copies += 1
            _driver.stream_sync(handle)
            self._post_imms(dst.peer, imm, count)
            return True
        cs = self._stream(device)
        if on_gpu:  # read the source after the work its producer has queued so far
            cs.wait_stream(producer_stream(device, stream))
        handle = int(cs.cuda_stream)
        _driver.copy_async(dptr, sptr, nbytes, handle)
        self._copies += 1
        if self.copy_triggers and self._fire_after(
            token, device, dst.peer, imm, count, partial(_driver.write_value32, handle)
        ):
            return False
        self._waiter.after_stream(
            handle, device, partial(self._landed, token, dst.peer, imm, count)
        )
        return False

    def _kernel(self, device: int) -> CopyKernel | None:
        """The copy kernel on ``device``; None where it cannot load (the copy engine
        copies then; ``kernel_error`` says why)."""
        k = self._kernels.get(device, False)
        if k is False:
            from . import _kernel

            try:
                k = _kernel.kernel(device)
            except TransferError as exc:
                k, self.kernel_error = None, str(exc)
            self._kernels[device] = k
        return k  # type: ignore[return-value]

    def _door_batch(self, peer: int, imm: int, count: int) -> WriteBatch:
        """The immediates of one write as a batch into the peer's doorbell (one byte
        each, at most DOOR_BYTES an entry); none: one uncounted byte."""
        sizes = [DOOR_BYTES] * (count // DOOR_BYTES) + [count % DOOR_BYTES] * bool(
            count % DOOR_BYTES
        )
        n = len(sizes) or 1
        z = np.zeros(n, np.uint64)
        return WriteBatch(
            0, (self._zeros_reg,), (self._doors[peer],), np.zeros(n, np.uint32),
            np.zeros(n, np.uint32), z, z.copy(), np.array(sizes or [1], np.uint64),
            np.full(n, imm if count else NO_IMM, np.int64), np.zeros(n, np.int32), {}, {},
        )  # fmt: skip

    def _fire_after(
        self,
        token: int,
        device: int,
        peer: int,
        imm: int,
        count: int,
        store: Callable[[int, int], None],
    ) -> bool:
        """End the write with a trigger instead of a copy notice: arm its immediates on a
        word, then ``store(word, 1)`` queues the word's store after the copy (a stream
        write, or the copy kernel's own). False (nothing armed) when every word is
        lent: the caller ends the write another way."""
        words = self._word_pool(device)
        i = words.take()
        if i < 0:
            return False
        # One doorbell batch per (peer, imm, count), packed once (its cache is shared);
        # each write gets its own status array, which the native trigger writes.
        key = (peer, imm, count)
        door = self._door_cache.get(key)
        if door is None:
            if len(self._door_cache) >= 4096:
                self._door_cache.clear()  # (the writes in flight keep theirs in _lent)
            door = self._door_cache[key] = self._door_batch(peer, imm, count)
        wb = WriteBatch(
            door.token, door.srcs, door.dsts, door.src, door.dst, door.soff, door.doff,
            door.nbytes, door.imm, np.zeros(len(door.status), np.int32), door.cache, {},
        )  # fmt: skip
        try:
            self.inner.trigger_arm(
                token, wb, words.host + i * words.STRIDE, 1, -1, False, COPY_SPIN_NS, COPY_NAP_NS
            )
        except BaseException:
            words.give(i)
            raise
        self._lent[token] = (words, i, False, wb)
        try:
            store(words.dev + i * words.STRIDE, 1)
        except BaseException:
            self.trigger_disarm(token)  # (gives the word back)
            raise
        return True

    def _landed(self, token: int, peer: int, imm: int, count: int, err: Exception | None) -> None:
        if err is None:
            try:
                self._post_imms(peer, imm, count)
            except Exception as exc:
                err = exc
        self._q.push(OpDone(token, IO_ERROR if err else 0, False, err))

    def post_batch(self, batch: WriteBatch) -> bool:
        # The inner shm transport's native batch path hands every pointer to the
        # provider, which memcpy()s host memory only: any GPU entry makes the whole
        # batch go entry by entry through post_write (copy-engine copies, immediates
        # through the doorbell). Decided once per compiled batch.
        gpu = batch.cache.get("cuda_ipc")
        if gpu is None:
            gpu = batch.cache["cuda_ipc"] = _gpu_batch(batch)
        if gpu:
            return post_batch_each(self, batch)
        return self.inner.post_batch(batch)

    # ------------------------------------------------------------ triggers

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
        """Host entries are the shm transport's triggers as they are. A GPU entry is
        split: its copy becomes stream work (the firing stream queues it, then writes
        the private word the shm trigger watches, so the data is in the peer's GPU
        memory first), and that trigger posts only the immediates, into the peer's
        doorbell."""
        if not _gpu_batch(batch):  # (raises for a GPU source into a host region)
            return self.inner.trigger_arm(token, batch, word, value, reset, repeat, spin_ns, nap_ns)
        # The private word starts unfired, whatever the user's flag holds: only the
        # stream work may fire it (after its copies), and a repeating trigger's gate
        # waits for the reset value before the first store as before every other.
        check_reset(value, reset, repeat)  # (the gate below would never open otherwise)
        gate = reset if repeat and reset >= 0 else None
        start = gate if gate is not None else (value - 1) & U32_MAX
        inner, copies = self._split_triggered(batch)
        # The native trigger keeps pointers into the shm batch's packed form: it lives
        # as long as the engine keeps ``batch`` (and with it its cache).
        batch.cache["cuda_ipc_trigger"] = inner
        # The immediates are armed on a private word that only the stream work writes,
        # after the copies: a store into the user's flag alone (flag.set, a plain
        # stream_fire) cannot post immediates for data that was never copied.
        from . import _driver

        if copies:
            dev = copies[0][3]
        else:
            import torch

            dev = torch.cuda.current_device()
        _driver.use_device(dev)
        words = self._word_pool(dev)
        i = words.take()
        if i < 0:
            raise RegionError(
                f"every one of the {_CopyWords.WORDS} trigger words of GPU {dev} is in "
                "use by an armed GPU trigger or a copy in flight; disarm triggers no longer needed"
            )
        host = words.host + i * words.STRIDE
        ctypes.c_uint32.from_address(host).value = start
        try:
            self.inner.trigger_arm(token, inner, host, value, reset, repeat, spin_ns, nap_ns)
        except BaseException:
            words.give(i)
            raise
        self._lent[token] = (words, i, repeat, None)
        kernels = {}
        if self.kernel_bytes:
            for j, (_, _, n, d) in enumerate(copies):
                k = self._kernel(d) if n <= self.kernel_bytes else None
                if k is not None:
                    kernels[j] = k
        return _StreamCopies(copies, words.dev + i * words.STRIDE, gate, kernels)

    def device_pointer(self, remote: Remote, offset: int) -> int:
        if remote.__class__ is not _GpuRemote:
            raise Unsupported(
                "the descriptor is of a peer's host region; a stream writes peer words only "
                "in GPU memory: register a CUDA tensor on the peer for its signal words"
            )
        if not 0 <= offset <= remote.nbytes - 4:  # type: ignore[attr-defined]
            raise RegionError(
                f"offset {offset} leaves no 4-byte word inside the peer's region of "
                f"{remote.nbytes} bytes"  # type: ignore[attr-defined]
            )
        return int(remote.ptr) + offset  # type: ignore[attr-defined]

    def _word_pool(self, device: int) -> _CopyWords:
        words = self._words.get(device)
        if words is None:
            words = self._words[device] = _CopyWords.allocate()
        return words

    def trigger_disarm(self, token: int) -> int:
        rc = self.inner.trigger_disarm(token)
        t = self._lent.pop(token, None)
        if t is not None:  # no longer watched, whatever is still in flight
            t[0].give(t[1])
        return rc

    def _split_triggered(
        self, batch: WriteBatch
    ) -> tuple[WriteBatch, list[tuple[int, int, int, int]]]:
        """The shm batch of a triggered GPU batch (same entries, same status array: a
        GPU entry becomes its immediates into the peer's doorbell) and its copies."""
        n = len(batch.nbytes)
        srcs: list[Registration | None] = []
        dsts: list[Remote] = []
        sidx: dict[int, int] = {}
        didx: dict[tuple[str, int], int] = {}
        src = np.zeros(n, np.uint32)
        dst = np.zeros(n, np.uint32)
        soff, doff, nb = batch.soff.copy(), batch.doff.copy(), batch.nbytes.copy()
        copies: list[tuple[int, int, int, int]] = []
        gpu_dst = [d.__class__ is _GpuRemote for d in batch.dsts]
        zeros = -1
        for i in range(n):
            d, r = int(batch.dst[i]), batch.srcs[int(batch.src[i])]
            nbytes, imm = int(batch.nbytes[i]), int(batch.imm[i])
            if not gpu_dst[d]:  # (a GPU source here was refused by _gpu_batch)
                s = int(batch.src[i])
                if s not in sidx:
                    sidx[s] = len(srcs)
                    srcs.append(r)
                key = ("host", d)
                if key not in didx:
                    didx[key] = len(dsts)
                    dsts.append(batch.dsts[d])
                src[i], dst[i] = sidx[s], didx[key]
                continue
            g = batch.dsts[d]
            if nbytes:
                if r is None or r.device != "cuda":
                    raise RegionError(
                        f"batch entry {i}: a triggered write into a GPU region on cuda_ipc is "
                        "copied by the firing stream and must come from GPU memory; register "
                        "a CUDA tensor as its source"
                    )
                copies.append(
                    (g.ptr + int(batch.doff[i]), r.ptr + int(batch.soff[i]), nbytes,  # type: ignore[attr-defined]
                     r.device_index)
                )  # fmt: skip
            count = 0 if imm == NO_IMM else expected_imms(nbytes, chunk_bytes=g.chunk)
            if count > DOOR_BYTES:
                raise RegionError(
                    f"batch entry {i} carries {count} immediates, more than a triggered GPU "
                    f"entry can ({DOOR_BYTES}); register the target with larger chunks"
                )
            if zeros < 0:
                zeros = len(srcs)
                srcs.append(self._zeros_reg)
            key = ("door", g.peer)
            if key not in didx:
                didx[key] = len(dsts)
                dsts.append(self._doors[g.peer])
            # one byte per immediate from the zeros into the doorbell (1-byte chunks);
            # an entry without one writes a byte there, uncounted
            src[i], dst[i], soff[i], doff[i], nb[i] = zeros, didx[key], 0, 0, max(count, 1)
        inner = WriteBatch(
            batch.token, tuple(srcs), tuple(dsts), src, dst, soff, doff, nb, batch.imm,
            batch.status, {}, batch.errors,
        )  # fmt: skip
        return inner, copies

    def post_read(
        self, token: int, src: Remote, roff: int, dst: Registration, doff: int, nbytes: int
    ) -> bool:
        if src.__class__ is _GpuRemote or dst.device == "cuda":
            raise Unsupported(
                "cuda_ipc has no one-sided read of GPU memory (either side); have the peer "
                "write instead, or read between host regions"
            )
        return self.inner.post_read(token, src, roff, dst, doff, nbytes)

    def post_paged(self, op: PagedWrite) -> bool:
        if op.dst.__class__ is _GpuRemote or op.src.device == "cuda":
            raise RegionError(
                "write_paged between GPU regions is not implemented on cuda_ipc yet; "
                "use write() per contiguous run"
            )
        return self.inner.post_paged(op)

    # ------------------------------------------------------------ events

    def pending_events(self) -> int:
        return self.inner.pending_events() + len(self._q) + self._waiter.pending()

    def drain(self) -> list[Event]:
        self._waiter.run_done()  # finished large copies: post their immediates
        evs = self.inner.drain()
        if evs:
            evs, failed = drop_internal(evs)
            self._imm_errors += failed
            if self._lent:
                self._free_words(evs)
        if len(self._q):
            evs += self._q.take()
        return evs

    def _free_words(self, evs: list[Event]) -> None:
        """One-shot triggers of ours that ended (a large copy's, a GPU trigger's) give
        their words back; repeating ones keep theirs until disarmed."""
        lent = self._lent
        for ev in evs:
            if ev.__class__ is OpDone and not ev.held:
                t = lent.get(ev.token)
                if t is not None and not t[2]:
                    del lent[ev.token]
                    t[0].give(t[1])

    def spin(self, ns: int) -> bool:
        if len(self._q) or self._waiter.pending():
            return True
        return bool(self.inner.spin(ns)) or bool(self._waiter.pending())

    def counter_take_spin(self, imm: int, want: int, ns: int) -> int:
        # Immediates land in the inner shm engine; copy notices are ours to report.
        if len(self._q) or self._waiter.pending():
            return self.inner.counter_take_spin(imm, want, 0) | EVENTS_READY
        r = self.inner.counter_take_spin(imm, want, ns)
        if len(self._q) or self._waiter.pending():
            r |= EVENTS_READY
        return r

    def stats(self) -> dict[str, int]:
        st = self.inner.stats()
        st["cuda_copies"] = self._copies
        st["cuda_kernel_copies"] = self._kernel_copies
        st["imm_post_errors"] = self._imm_errors
        return st


__all__ = [
    "CudaIpcBackend",
    "CudaIpcTransport",
    "cuda_available",
    "drop_internal",
]
