"""cuda_ipc's copy kernel (copy_kernel.cu), loaded from its PTX and launched through
the driver (ctypes on libcuda.so.1).

Small copies go through the SMs instead of a copy engine: a copy engine's copy of
a few bytes costs microseconds of GPU time before it moves anything, which a
small latency-bound write pays in full (docs/gpu.md, "Small writes"). The
kernel can also store a word after the copy behind a system-scope fence, so a
triggered write's stream work is one launch.

One loaded module per device's primary context, kept for the process's life. A
driver that cannot load the PTX (older than CUDA 11.0) makes :func:`kernel`
raise; cuda_ipc then copies with the copy engine, as before.
"""

from __future__ import annotations

import ctypes
import threading

from ..staged._cuda import check, lib, use_device

THREADS = 256
MAX_BLOCKS = 64
WORD_THREADS = 1024  # one block when a word is stored: its barrier covers every copy


class _Args(threading.local):
    """The launch's five arguments and the array of pointers to them that
    cuLaunchKernel reads (it copies the values at launch: reused per thread)."""

    def __init__(self) -> None:
        self.dst, self.src, self.n, self.word = (ctypes.c_uint64() for _ in range(4))
        self.value = ctypes.c_uint32()
        vals = (self.dst, self.src, self.n, self.word, self.value)
        self.ptrs = (ctypes.c_void_p * 5)(*(ctypes.addressof(v) for v in vals))


class CopyKernel:
    """``af_copy`` in one device's primary context."""

    __slots__ = ("fn", "device")

    def __init__(self, device: int) -> None:
        from ._copy_ptx import PTX

        d = lib()
        vp = ctypes.c_void_p
        d.cuModuleLoadData.argtypes = [ctypes.POINTER(vp), ctypes.c_char_p]
        d.cuModuleGetFunction.argtypes = [ctypes.POINTER(vp), vp, ctypes.c_char_p]
        u = ctypes.c_uint
        d.cuLaunchKernel.argtypes = [vp, u, u, u, u, u, u, u, vp, vp, vp]
        use_device(device)
        mod, fn = vp(), vp()
        check(d.cuModuleLoadData(ctypes.byref(mod), PTX.encode() + b"\0"), "cuModuleLoadData")
        check(d.cuModuleGetFunction(ctypes.byref(fn), mod, b"af_copy"), "cuModuleGetFunction")
        self.fn, self.device = fn, device

    def launch(
        self, stream: int, dst: int, src: int, n: int, word: int = 0, value: int = 0
    ) -> None:
        """Queue ``n`` bytes from ``src`` to ``dst`` (device pointers, this device or a
        peer's mapped memory) on ``stream``; with ``word``, then store ``value`` there,
        after every byte of the copy is visible. The caller makes the device current."""
        a = _ARGS
        a.dst.value, a.src.value, a.n.value = dst, src, n
        a.word.value, a.value.value = word, value
        if word:
            blocks, threads = 1, min(WORD_THREADS, max(32, -(-(n >> 4) // 32) * 32))
        else:
            threads = THREADS
            blocks = max(1, min(MAX_BLOCKS, -(-n // (16 * THREADS))))
        check(
            lib().cuLaunchKernel(self.fn, blocks, 1, 1, threads, 1, 1, 0, stream, a.ptrs, None),
            f"cuLaunchKernel (af_copy of {n} bytes)",
        )


_ARGS = _Args()
_kernels: dict[int, CopyKernel] = {}
_lock = threading.Lock()


def kernel(device: int) -> CopyKernel:
    """The copy kernel loaded on ``device`` (loaded on first use; raises TransferError
    when the driver cannot load it)."""
    k = _kernels.get(device)
    if k is None:
        with _lock:
            k = _kernels.get(device)
            if k is None:
                k = _kernels[device] = CopyKernel(device)
    return k
