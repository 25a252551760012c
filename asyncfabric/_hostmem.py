"""Host memory for transfers, backed by transparent huge pages where the kernel allows.

On shm the bytes move by cross-memory attach (``process_vm_readv``/``writev``): the
kernel pins the pages of both sides for every copy, one folio at a time. Over 4 KiB
pages that pinning costs about a third of the copy itself; over 2 MiB pages it is
noise. torch's CPU allocator hands out 4 KiB pages unless ``THP_MEM_ALLOC_ENABLE=1``
is set, while numpy asks for huge pages for large arrays. So a buffer asyncfabric's
systems allocate for transfers comes from here: an anonymous mapping, aligned to
2 MiB and advised ``MADV_HUGEPAGE``. Its pages are zero and faulted on first touch.
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np

HUGE = 2 << 20  # the x86-64 and arm64 (4 KiB granule) transparent huge page
_SMALL = HUGE  # below one huge page an ordinary allocation is as good


def host_bytes(nbytes: int) -> np.ndarray:
    """``nbytes`` zeroed bytes of host memory (a uint8 array), 2 MiB aligned and
    advised for huge pages when at least 2 MiB."""
    if nbytes < 0:
        raise ValueError(f"host_bytes needs nbytes >= 0, got {nbytes}")
    if nbytes < _SMALL:
        return np.zeros(nbytes, np.uint8)
    m = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = np.frombuffer(m, np.uint8)  # the array keeps the mapping alive
    skip = -raw.ctypes.data % HUGE
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:  # advice only: a kernel without THP keeps 4 KiB pages
            m.madvise(mmap.MADV_HUGEPAGE, skip, nbytes)
        except OSError:
            pass
    return raw[skip : skip + nbytes]


def host_zeros(shape: int | tuple[int, ...], dtype: Any, device: Any = "cpu") -> Any:
    """A zeroed array for transfers; host memory on huge pages (the module's docstring).

    ``dtype`` a torch dtype gives a torch tensor; anything numpy takes gives a numpy
    array. ``device`` another than the CPU (torch dtypes only) gives ``torch.zeros``
    there: GPU memory has no page size to pick. Register it like any other buffer."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"host_zeros: negative dimension in shape {shape}")
    n = int(np.prod(shape, dtype=np.int64))
    if type(dtype).__module__ == "torch":
        import torch

        if torch.device(device).type != "cpu" or n == 0:
            return torch.zeros(shape, dtype=dtype, device=device)
        return torch.from_numpy(host_bytes(n * dtype.itemsize)).view(dtype).view(shape)
    if str(device) != "cpu":
        raise ValueError(f"host_zeros: a numpy dtype lives on the CPU, not {device!r}")
    dt = np.dtype(dtype)
    return host_bytes(n * dt.itemsize).view(dt).reshape(shape)
