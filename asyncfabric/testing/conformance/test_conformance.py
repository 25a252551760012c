"""The conformance suite: what every backend must do (see the package docstring for how to run it).

Writes, paged writes, counters, send/recv, bad input, peer loss; two OS processes
where a peer matters (asyncfabric.testing.peer), real transports only. Which specs
run is chosen in :func:`pytest_generate_tests` (asyncfabric.testing.conformance.select).
"""

from __future__ import annotations

import random
import time

import anyio
import numpy as np
import pytest

import asyncfabric as af
from asyncfabric.testing.conformance import engine_kwargs, select
from asyncfabric.testing.peer import PeerProcess, random_bytes, sha256

# No __all__: a module running the suite takes everything with `import *`, so a test added
# here can never be left out of it.

pytestmark = pytest.mark.anyio


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "spec" not in metafunc.fixturenames:
        return
    required = tuple(getattr(metafunc.module, "CONFORMANCE_REQUIRED", ()))
    chosen, _ = select(metafunc.config.getoption("af_conformance", None), required)
    metafunc.parametrize(
        "spec", [pytest.param(c, id=c[0]) for c in chosen], indirect=True, scope="function"
    )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def spec(request: pytest.FixtureRequest) -> str:
    """The engine spec under test; an unusable one fails the test (never a skip)."""
    name, why = request.param
    if why is not None:
        pytest.fail(f"conformance: {why}", pytrace=False)
    if not request.config.pluginmanager.has_plugin("anyio"):
        pytest.fail(
            "conformance: the anyio pytest plugin is not loaded, so these async tests would "
            "not run; add `-p anyio`",
            pytrace=False,
        )
    return name


@pytest.fixture
def kw(spec: str) -> dict:
    return engine_kwargs(spec)


async def test_writes_verified(spec, kw):
    sizes = [1, 7, 4096, 65_537, (3 << 20) + 3]
    async with (
        PeerProcess(spec, chunk_bytes=1 << 20, **kw) as peer,
        af.Engine(spec, **kw) as eng,
    ):
        top = max(sizes)
        src = random_bytes(top)
        rid, desc_b = await peer.alloc(top)
        desc = af.Descriptor.from_bytes(desc_b)
        with eng.register(src) as region:
            for i, n in enumerate(sizes):
                off = random.randrange(0, top - n + 1)
                roff = random.randrange(0, top - n + 1)
                await eng.write(region[off : off + n], desc[roff : roff + n], imm=100 + i)
                await peer.wait(100 + i, desc.expected_imms(n))
                assert await peer.digest(rid, roff, n) == sha256(src, off, n)
            assert desc.expected_imms(top) == 4
            # many in flight at once, one counter
            size, count = 16384, 64

            async def one(i: int) -> None:
                sl = slice(i * size, (i + 1) * size)
                await eng.write(region[sl], desc[sl], imm=7)

            async with anyio.create_task_group() as tg:
                for i in range(count):
                    tg.start_soon(one, i)
            await peer.wait(7, count)
            assert await peer.digest(rid, 0, size * count) == sha256(src, 0, size * count)
            # a zero-byte write carries only its immediate
            await eng.write_imm(desc, 0xFFFFFFFF)
            await peer.wait(0xFFFFFFFF, 1)


async def test_paged_writes(spec, kw):
    page, stride, npages = 4096, 5000, 300
    async with PeerProcess(spec, **kw) as peer, af.Engine(spec, **kw) as eng:
        src = random_bytes(npages * page, seed=11)
        rid, desc_b = await peer.alloc(npages * stride + 64)
        desc = af.Descriptor.from_bytes(desc_b)
        rng = np.random.default_rng(5)
        sp, dp = rng.permutation(npages), rng.permutation(npages)
        with eng.register(src) as region:
            n = await eng.write_paged(
                region, desc, sp, dp, page_size=page, dst_stride=stride, dst_offset=64, imm=77
            )
        assert n == npages
        await peer.wait(77, npages)
        got = np.frombuffer(await peer.call("read", rid, 0, npages * stride + 64), np.uint8)
        want = np.zeros_like(got)
        for s, d in zip(sp, dp):
            want[64 + d * stride : 64 + d * stride + page] = src[s * page : (s + 1) * page]
        assert sha256(got) == sha256(want)


async def test_counters_out_of_order(spec, kw):
    async with PeerProcess(spec, **kw) as peer, af.Engine(spec, **kw) as eng:
        dst = np.zeros(64, np.uint8)
        with eng.register(dst) as region:
            imms = [v for v in range(1000, 1010) for _ in range(10)]
            random.shuffle(imms)
            src_id, _ = await peer.alloc(64, seed=3)
            await peer.call("write_imms", src_id, bytes(region.descriptor()), imms)
            order = list(range(1000, 1010))
            random.shuffle(order)
            for v in order:
                await eng.counter(v).wait(10, timeout=30)
                assert eng.counter(v).count == 0
            assert eng.stats()["live_counters"] == 0


async def test_counter_semantics_one_process(spec, kw):
    async with af.Engine(spec, **kw) as a, af.Engine(spec, **kw) as b:
        with b.register(np.zeros(4096, np.uint8)) as region:
            desc = region.descriptor()
            for _ in range(7):
                await a.write_imm(desc, 2)
            with anyio.fail_after(30):  # arrivals before any wait are counted
                while b.counter(2).count < 7:
                    await anyio.sleep(0.001)
            await b.counter(2).wait(3, timeout=5)  # the surplus carries over
            await b.counter(2).wait(4, timeout=5)
            assert b.counter(2).count == 0
            with pytest.raises(af.ImmTimeout):
                await b.counter(3).wait(1, timeout=0.2)
            assert b.stats()["live_counters"] == 0


async def test_send_recv_both_ways(spec, kw):
    async with PeerProcess(spec, **kw) as peer, af.Engine(spec, **kw) as eng:
        await eng.send(peer.address, b"ping")
        assert await peer.call("recv", 30) == b"ping"
        await peer.call("send", eng.address, b"pong" * 100)
        assert await eng.recv(timeout=30) == b"pong" * 100
        big = bytes(range(256)) * (eng.ctrl_max // 256)
        await eng.send(peer.address, big)
        assert await peer.call("recv", 30) == big


async def test_bad_input(spec, kw):
    async with af.Engine(spec, **kw) as a, af.Engine(spec, **kw) as b:
        src = a.register(np.ones(1024, np.uint8))
        dst = b.register(np.zeros(1024, np.uint8))
        ro = b.register(np.zeros(64, np.uint8), remote_write=False)
        desc = dst.descriptor()
        with pytest.raises(ValueError, match="bytes"):
            await a.write(src[0:16], desc[0:32])
        with pytest.raises(ValueError):
            await a.write(src[0:16], desc[0:16], imm=1 << 32)
        with pytest.raises(af.RegionError, match="remote_write=False"):
            await a.write(src[0:64], ro.descriptor())
        with pytest.raises(TypeError, match="register the buffer first"):
            await a.write(bytearray(16), desc[0:16])
        with pytest.raises(ValueError, match="ctrl_max"):
            await a.send(b.address, b"x" * (a.ctrl_max + 1))
        with pytest.raises(af.RegionError, match="past"):
            await a.write_paged(src, desc, [0], [1], page_size=1024)
        with pytest.raises(af.DescriptorError):
            af.Descriptor.from_bytes(bytes(desc)[:-3])
        # the engine still works after all that
        await a.write(src[0:16], desc[0:16], imm=4)
        await b.counter(4).wait(1, timeout=30)


async def test_peer_never_answers(spec, kw):
    """The peer's engine is gone before we ever talk to it: a clear error in bounded time."""
    async with PeerProcess(spec, **kw) as peer:
        _, desc_b = await peer.alloc(4096)
        peer.kill()
        await anyio.to_thread.run_sync(peer.proc.join, 10)
    async with af.Engine(spec, peer_timeout=2.0, **kw) as eng:
        with eng.register(np.ones(4096, np.uint8)) as region:
            t0 = time.monotonic()
            with pytest.raises(af.PeerUnreachable):
                for _ in range(50):  # some providers accept a few before noticing
                    await eng.write(region, af.Descriptor.from_bytes(desc_b), imm=1, timeout=30)
            assert time.monotonic() - t0 < 30


async def test_peer_dies_mid_transfer(spec, kw):
    """Writes in flight when the peer dies all finish or fail within bounded time."""
    n, size = 400, 65536
    async with af.Engine(spec, peer_timeout=3.0, **kw) as eng:
        peer = PeerProcess(spec, **kw)
        async with peer:
            _, desc_b = await peer.alloc(n * size)
            desc = af.Descriptor.from_bytes(desc_b)
            with eng.register(random_bytes(n * size)) as region:
                await eng.write(region[0:size], desc[0:size], imm=1)  # connected
                results: list[BaseException | None] = [None] * n

                async def one(i: int) -> None:
                    sl = slice(i * size, (i + 1) * size)
                    try:
                        await eng.write(region[sl], desc[sl], imm=2, timeout=60)
                    except BaseException as exc:  # noqa: BLE001 - collected and judged below
                        results[i] = exc

                t0 = time.monotonic()
                with anyio.fail_after(60):
                    async with anyio.create_task_group() as tg:
                        for i in range(n):
                            tg.start_soon(one, i)
                        await anyio.sleep(0.05)
                        peer.kill()
                # after the peer is gone, new writes fail too
                with pytest.raises(af.TransferError):
                    with anyio.fail_after(60):
                        for _ in range(200):
                            await eng.write(region[0:size], desc[0:size], imm=3, timeout=30)
                elapsed = time.monotonic() - t0
        errs = [r for r in results if r is not None]
        assert all(isinstance(r, af.TransferError) for r in errs), errs[:3]
        assert elapsed < 60
