"""af.host_zeros: zeroed host memory on 2 MiB-aligned mappings advised for huge pages."""

from __future__ import annotations

import re

import numpy as np
import pytest

import asyncfabric as af
from asyncfabric._hostmem import HUGE


def _vmflags(ptr: int) -> list[str]:
    """The VmFlags of the mapping holding ``ptr`` (``hg``: advised MADV_HUGEPAGE)."""
    cur = None
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                cur = (int(m.group(1), 16), int(m.group(2), 16))
            elif line.startswith("VmFlags:") and cur and cur[0] <= ptr < cur[1]:
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {ptr:#x}")


def test_numpy_buffer_is_zero_aligned_and_advised():
    a = af.host_zeros((4, 1 << 20), "float32")  # 16 MiB
    assert a.shape == (4, 1 << 20) and a.dtype == np.float32 and a.flags.c_contiguous
    assert a.ctypes.data % HUGE == 0
    assert not a.any()
    a[:] = 1  # writable, and every page faults in
    assert a.sum() == a.size
    assert "hg" in _vmflags(a.ctypes.data)


@pytest.mark.asyncio
async def test_torch_tensor_is_zero_aligned_advised_and_moves():
    torch = pytest.importorskip("torch")
    t = af.host_zeros((3, 2 << 20), torch.bfloat16)  # 12 MiB
    assert t.shape == (3, 2 << 20) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % HUGE == 0 and not t.any()
    assert "hg" in _vmflags(t.data_ptr())
    dst = af.host_zeros(t.shape, torch.bfloat16)
    t.fill_(3)
    async with af.Engine("shm") as a, af.Engine("shm") as b:
        with a.register(t) as rs, b.register(dst) as rd:
            await a.write(rs, rd.descriptor(), imm=1)
            await b.counter(1).wait(1)
    assert torch.equal(dst, t)


def test_small_and_empty_and_bad_shapes():
    torch = pytest.importorskip("torch")
    assert af.host_zeros(16, np.uint8).shape == (16,)
    assert af.host_zeros((0, 4), torch.float16).shape == (0, 4)
    with pytest.raises(ValueError, match="negative dimension"):
        af.host_zeros((2, -1), np.float32)


def test_other_devices_get_torch_zeros_and_numpy_refuses_them():
    torch = pytest.importorskip("torch")
    t = af.host_zeros((4, 8), torch.float16, "meta")  # any non-CPU device: torch.zeros there
    assert t.device.type == "meta" and t.shape == (4, 8)
    assert af.host_zeros((2, 2 << 20), torch.float32, torch.device("cpu")).data_ptr() % HUGE == 0
    with pytest.raises(ValueError, match="numpy dtype lives on the CPU"):
        af.host_zeros(4, np.float32, "cuda")
