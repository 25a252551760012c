"""CUDA tensors on every path, two processes with one GPU each, byte-for-byte.

Paths: the libfabric shm provider (direct registration where the provider takes
CUDA memory, else the staged path through pinned host memory) and the cuda_ipc
backend (NVLink peer copies). Skipped, with the reason, where there is no CUDA.
"""

from __future__ import annotations

import random

import pytest

import asyncfabric as af
from asyncfabric.testing.peer import PeerProcess, sha256

torch = pytest.importorskip("torch", reason="GPU tests need torch")

_NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.anyio,
    pytest.mark.skipif(
        _NGPU == 0, reason="no CUDA device visible (torch.cuda.is_available() is False)"
    ),
]

SIZES = [1, 8, 4096, 65_537, 1 << 20, (5 << 20) + 3, (64 << 20) + 5]


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _peer_dev() -> int:
    return 1 if _NGPU > 1 else 0


PATHS = [
    # (provider, local source kind, remote target kind)
    ("shm", "cuda", "cuda"),
    ("shm", "cuda", "cpu"),
    ("shm", "cpu", "cuda"),
    ("cuda_ipc", "cuda", "cuda"),
    ("cuda_ipc", "cpu", "cuda"),
    ("cuda_ipc", "cpu", "cpu"),
]


@pytest.mark.parametrize("provider,src_kind,dst_kind", PATHS)
async def test_write_sizes_verified(provider, src_kind, dst_kind):
    torch.cuda.set_device(0)
    async with (
        PeerProcess(provider, _cuda_device=_peer_dev()) as peer,
        af.Engine(provider) as eng,
    ):
        top = max(SIZES)
        dst_dev = f"cuda:{_peer_dev()}" if dst_kind == "cuda" else "cpu"
        rid, desc_b = await peer.alloc_tensor(top, None, dst_dev, False)
        desc = af.Descriptor.from_bytes(desc_b)
        src = torch.randint(0, 256, (top,), dtype=torch.uint8, device=src_kind)
        host = src.cpu().numpy()
        with eng.register(src) as region:
            if provider == "shm" and src_kind == "cuda":
                assert eng.transport.cuda_path in ("staged", "direct")
            if provider == "cuda_ipc":
                assert eng.transport.cuda_path == "ipc"
            for i, n in enumerate(SIZES):
                off = random.randrange(0, top - n + 1)
                roff = random.randrange(0, top - n + 1)
                await eng.write(region[off : off + n], desc[roff : roff + n], imm=500 + i)
                await peer.wait(500 + i, desc.expected_imms(n), timeout=60)
                assert await peer.call("count", 500 + i) == 0
                assert await peer.digest(rid, roff, n) == sha256(host, off, n), (provider, n)


@pytest.mark.parametrize(
    "provider,n", [("shm", 32 << 20), ("cuda_ipc", 32 << 20), ("cuda_ipc", 4096)]
)
async def test_write_after_producer_stream(provider, n):
    """A tensor filled by a kernel on a side stream is written only after that kernel
    (on cuda_ipc at 4 KiB, by the copy kernel queued on that stream)."""
    torch.cuda.set_device(0)
    async with (
        PeerProcess(provider, _cuda_device=_peer_dev()) as peer,
        af.Engine(provider) as eng,
    ):
        rid, desc_b = await peer.alloc_tensor(n, None, f"cuda:{_peer_dev()}", False)
        desc = af.Descriptor.from_bytes(desc_b)
        src = torch.zeros(n, dtype=torch.uint8, device="cuda:0")
        with eng.register(src) as region:
            side = torch.cuda.Stream()
            with torch.cuda.stream(side):
                torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time before the fill
                src.fill_(0xAB)
            await eng.write(region, desc, imm=7, stream=side)
            await peer.wait(7, desc.expected_imms(), timeout=60)
            side.synchronize()
            assert await peer.digest(rid, 0, n) == sha256(src.cpu().numpy())


@pytest.mark.parametrize("small_triggers", [False, True], ids=["sync", "trigger"])
async def test_cuda_ipc_small_writes_both_ways(small_triggers):
    """Writes up to the kernel's size, at odd sizes and alignments, ended by a stream
    sync (copy engine) or by a trigger on the word the copy kernel stores after its
    copy (counted in stats); the bytes and the counts are checked."""
    torch.cuda.set_device(0)
    async with (
        PeerProcess("cuda_ipc", _cuda_device=_peer_dev()) as peer,
        af.Engine("cuda_ipc") as eng,
    ):
        t = eng.transport
        t.small_triggers = small_triggers
        top = 1 << 17
        rid, desc_b = await peer.alloc_tensor(top, None, f"cuda:{_peer_dev()}", False)
        desc = af.Descriptor.from_bytes(desc_b)
        src = torch.randint(0, 256, (top,), dtype=torch.uint8, device="cuda:0")
        host = src.cpu().numpy()
        before = t.stats()["cuda_kernel_copies"]
        sizes = [1, 3, 8, 13, 16, 100, 4096, 4099, t.kernel_bytes]
        with eng.register(src) as region:
            for i, n in enumerate(sizes * 3):
                off = random.randrange(0, top - n + 1)
                roff = random.randrange(0, top - n + 1)
                await eng.write(region[off : off + n], desc[roff : roff + n], imm=600 + i)
                await peer.wait(600 + i, desc.expected_imms(n), timeout=60)
                assert await peer.digest(rid, roff, n) == sha256(host, off, n), (n, off, roff)
        assert t.kernel_error == ""
        kernel = t.stats()["cuda_kernel_copies"] - before
        assert kernel == (3 * len(sizes) if small_triggers else 0)


async def test_cuda_ipc_imm_only_and_counter_rule():
    torch.cuda.set_device(0)
    async with (
        PeerProcess("cuda_ipc", _cuda_device=_peer_dev()) as peer,
        af.Engine("cuda_ipc") as eng,
    ):
        rid, desc_b = await peer.alloc_tensor(4 << 20, None, f"cuda:{_peer_dev()}", False)
        desc = af.Descriptor.from_bytes(desc_b)
        for _ in range(5):
            await eng.write_imm(desc, 42)
        await peer.wait(42, 5)
        assert await peer.call("count", 42) == 0
        src = torch.ones(4 << 20, dtype=torch.uint8, device="cuda:0")
        with eng.register(src) as region:
            await eng.write(region, desc, imm=43)  # 4 chunks of 1 MiB: 4 immediates
        await peer.wait(43, 4)
        assert await peer.call("count", 43) == 0


async def test_cuda_direct_refused_when_not_offered():
    """cuda='direct' on a provider that cannot register CUDA memory says so."""
    torch.cuda.set_device(0)
    async with af.Engine("shm", cuda="direct") as eng:
        t = torch.zeros(4096, dtype=torch.uint8, device="cuda:0")
        try:
            r = eng.register(t)
        except af.RegionError as exc:
            assert "CUDA" in str(exc)
        else:  # this libfabric registers CUDA memory directly: that is fine too
            assert eng.transport.cuda_path == "direct"
            r.close()
