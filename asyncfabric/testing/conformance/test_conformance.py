"""The conformance suite: what every backend must do (see the package docstring for how to run it).

Writes, paged writes, counters, send/recv, bad input, peer loss, batches (write_many,
reposts, scatter, barrier, bad entries refused whole) and one-sided reads (required of
every backend); two OS processes where a peer matters (asyncfabric.testing.peer), real
transports only. Which specs
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


# ---------------------------------------------------------------- batches and one-sided reads


def _imms_of(desc: af.Descriptor, entries: list[tuple[int, int]]) -> dict[int, int]:
    """``{imm: immediates expected}`` for entries ``(nbytes, imm)`` written into ``desc``."""
    want: dict[int, int] = {}
    for n, imm in entries:
        want[imm] = want.get(imm, 0) + desc.expected_imms(n)
    return want


async def _counts_are(peer: PeerProcess, want: dict[int, int]) -> None:
    """The peer's counters reach ``want`` exactly: each wait ends, nothing is left over."""
    for imm, n in want.items():
        await peer.wait(imm, n)
    for imm in want:
        assert await peer.call("count", imm) == 0, f"imm {imm}: more immediates than expected"


async def test_write_many_verified(spec, kw):
    """One write_many: entries of 0 B to 3 MiB (some of several chunks), different immediates."""
    sizes = [1, 7, 4096, 65_537, (2 << 20) + 5, 0, 3 << 20, 513, 0]
    imms = [10, 11, 10, 12, 11, 13, 14, 10, 10]
    async with (
        PeerProcess(spec, chunk_bytes=1 << 20, **kw) as peer,
        af.Engine(spec, **kw) as eng,
    ):
        total = sum(sizes)
        src = random_bytes(total)
        rid, desc_b = await peer.alloc(total)
        desc = af.Descriptor.from_bytes(desc_b)
        soffs = np.cumsum([0, *sizes[:-1]]).tolist()
        doffs = (total - np.cumsum(sizes)).tolist()  # placed in reverse order over there
        with eng.register(src) as region:
            batch = af.Batch()
            for n, imm, so, do in zip(sizes, imms, soffs, doffs):
                if n:
                    batch.add(region[so : so + n], desc[do : do + n], imm=imm)
                else:
                    batch.add_imm(desc, imm)
            assert len(batch) == len(sizes)
            await eng.write_many(batch)
            want = _imms_of(desc, list(zip(sizes, imms)))
            assert want[14] == 3 and want[11] == 4  # several chunks per entry
            await _counts_are(peer, want)
            for n, so, do in zip(sizes, soffs, doffs):
                assert await peer.digest(rid, do, n) == sha256(src, so, n), f"{n} B entry"
            # as tuples, with a default immediate, to the same region from new data
            src[:] = random_bytes(total, seed=1)
            ops = [
                (region[0:4096], desc[8192:12288]),
                (region[4096:4096 + (1 << 20) + 1], desc[12288:12288 + (1 << 20) + 1], 16),
                (region[100:101], desc[0:1]),
            ]  # fmt: skip
            await eng.write_many(ops, imm=15)
            await _counts_are(peer, {15: 2, 16: 2})
            assert await peer.digest(rid, 8192, 4096) == sha256(src, 0, 4096)
            big = (1 << 20) + 1
            assert await peer.digest(rid, 12288, big) == sha256(src, 4096, big)
            assert await peer.digest(rid, 0, 1) == sha256(src, 100, 1)


async def test_write_many_arrays_reposted(spec, kw):
    """A Batch of arrays (add_many, add_pages) posted again and again: each post counts in full."""
    page, npages = 4096, 48
    async with (
        PeerProcess(spec, chunk_bytes=1 << 16, **kw) as peer,
        af.Engine(spec, **kw) as eng,
    ):
        nb = npages * page + (1 << 17)
        rid, desc_b = await peer.alloc(nb)
        desc = af.Descriptor.from_bytes(desc_b)
        src = random_bytes(nb, seed=2)
        rng = np.random.default_rng(9)
        perm = rng.permutation(npages)
        with eng.register(src) as region:
            batch = af.Batch()
            batch.add_pages(region, desc, np.arange(npages), perm, page_size=page, imm=20)
            sizes = np.array([1, 100, 4096, 1 << 16], np.uint64)  # 4 entries, imm per entry
            offs = npages * page + np.array([0, 1024, 8192, 1 << 16], np.uint64)
            batch.add_many(region, desc, offs, offs, sizes, imm=np.array([21, 22, 21, 22]))
            batch.add_imm(desc[0:0], 23)
            want = {20: npages, 21: 2, 22: 2, 23: 1}
            for rnd in range(3):  # new data each time: a repost writes what is there now
                src[:] = random_bytes(nb, seed=100 + rnd)
                await eng.write_many(batch)
                await _counts_are(peer, want)
                got = np.frombuffer(await peer.call("read", rid, 0, nb), np.uint8)
                for s, d in enumerate(perm.tolist()):
                    assert sha256(got, d * page, page) == sha256(src, s * page, page)
                for o, n in zip(offs.tolist(), sizes.tolist()):
                    assert sha256(got, o, n) == sha256(src, o, n)
            # three posts of one batch at once: the counts add up
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(eng.write_many, batch)
            await _counts_are(peer, {k: 3 * v for k, v in want.items()})


async def test_scatter_and_barrier_to_two_peers(spec, kw):
    """scatter: consecutive slices of one source to two peers' regions; barriers to both."""
    n1, n2, n3 = 4096, (1 << 20) + 17, 65_536
    async with (
        PeerProcess(spec, chunk_bytes=1 << 20, **kw) as p1,
        PeerProcess(spec, chunk_bytes=1 << 20, **kw) as p2,
        af.Engine(spec, **kw) as eng,
    ):
        r1, b1 = await p1.alloc(n1 + n3)
        r2, b2 = await p2.alloc(n2)
        d1, d2 = af.Descriptor.from_bytes(b1), af.Descriptor.from_bytes(b2)
        src = random_bytes(n1 + n2 + n3)
        with eng.register(src) as region:
            await eng.scatter(region, [d1[0:n1], d2[0:n2], d1[n1 : n1 + n3]], imm=31)
            await _counts_are(p1, {31: 2})
            await _counts_are(p2, {31: 2})  # n2 is two chunks
            assert await p1.digest(r1, 0, n1) == sha256(src, 0, n1)
            assert await p2.digest(r2, 0, n2) == sha256(src, n1, n2)
            assert await p1.digest(r1, n1, n3) == sha256(src, n1 + n2, n3)
            # (source offset, destination) pairs, from a slice of the region
            src[:] = random_bytes(n1 + n2 + n3, seed=4)
            sl = region[n1 : n1 + n2 + n3]
            await eng.scatter(sl, [(n2, d1[0:n3]), (0, d2[0:n2])], imm=32)
            await _counts_are(p1, {32: 1})
            await _counts_are(p2, {32: 2})
            assert await p1.digest(r1, 0, n3) == sha256(src, n1 + n2, n3)
            assert await p2.digest(r2, 0, n2) == sha256(src, n1, n2)
            await eng.barrier([d1, d2, d1[0:8]], 33)  # p1 is named twice
            await _counts_are(p1, {33: 2})
            await _counts_are(p2, {33: 1})
        # N descriptors, N immediates, no data: over both peers, in one call and in two
        more = [(p, *(await p.alloc(64))) for p in (p1, p1, p1, p2, p2)]
        descs = [af.Descriptor.from_bytes(b) for _, _, b in more]
        await eng.barrier(descs, 40)
        await _counts_are(p1, {40: 3})
        await _counts_are(p2, {40: 2})
        await eng.barrier(descs[:2], 41)
        await eng.barrier(descs[2:], 41)
        await _counts_are(p1, {41: 3})
        await _counts_are(p2, {41: 2})
        for p, rid, _ in more:
            assert not np.frombuffer(await p.call("read", rid, 0, 64), np.uint8).any()


async def test_bad_batch_refused_whole(spec, kw):
    """A bad entry refuses the whole batch, naming its index, before anything is posted."""
    async with PeerProcess(spec, **kw) as peer, af.Engine(spec, **kw) as eng:
        rid, b = await peer.alloc(1024)
        _, ro_b = await peer.alloc(1024, remote_write=False)
        desc, ro = af.Descriptor.from_bytes(b), af.Descriptor.from_bytes(ro_b)
        a = eng.register(random_bytes(1024))
        gone = eng.register(random_bytes(1024))
        good = [(a[i * 64 : (i + 1) * 64], desc[i * 64 : (i + 1) * 64]) for i in range(3)]
        with pytest.raises(ValueError, match="entry 3"):  # sizes differ
            await eng.write_many([*good, (a[0:16], desc[512:544])], imm=50)
        with pytest.raises(ValueError, match="entry 3"):  # the immediate is not 32 bits
            await eng.write_many([*good, (a[0:16], desc[512:528], 1 << 32)], imm=50)
        with pytest.raises(af.RegionError, match="entry 3"):  # past the destination
            af.Batch.of(good, imm=50).add_many(a, desc, [0, 64], [1000, 0], 64, imm=50)
        batch = af.Batch.of(good, imm=50).add(a[0:64], ro[0:64], imm=50)
        with pytest.raises(af.RegionError, match="entry 3.*remote_write=False"):
            await eng.write_many(batch)  # found when the batch is checked for this engine
        batch = af.Batch.of(good, imm=50).add(gone[0:64], desc[512:576], imm=50)
        gone.close()
        with pytest.raises(af.RegionError, match="entry 3.*unregistered"):
            await eng.write_many(batch)
        with pytest.raises(af.RegionError, match="target 3"):
            await eng.scatter(a, [desc[0:256], desc[256:512], desc[512:768], desc[0:512]], imm=50)
        await anyio.sleep(0.2)  # give a (wrongly) posted entry time to land
        assert await peer.call("count", 50) == 0, "an entry of a refused batch was posted"
        assert not np.frombuffer(await peer.call("read", rid, 0, 1024), np.uint8).any()
        await eng.write_many(good, imm=51)  # the engine still works after all that
        await _counts_are(peer, {51: 3})
        assert await peer.digest(rid, 0, 192) == sha256(a.buffer, 0, 192)


async def test_read_verified(spec, kw):
    """One-sided read of a peer's region, byte for byte (required of every backend); a region
    registered with remote_read=False is refused."""
    sizes = [1, 7, 4096, 65_537, (3 << 20) + 3]
    top = max(sizes)
    async with (
        PeerProcess(spec, chunk_bytes=1 << 20, **kw) as peer,
        af.Engine(spec, **kw) as eng,
    ):
        rid, b = await peer.alloc(top, seed=21)
        desc = af.Descriptor.from_bytes(b)
        dst = np.zeros(top, np.uint8)
        with eng.register(dst) as region:
            try:
                await eng.read(region[0:1], desc[0:1])
            except af.Unsupported as exc:
                pytest.fail(
                    f"conformance: {spec} has no one-sided read ({exc}); reading is required "
                    "of every backend: implement Transport.post_read",
                    pytrace=False,
                )
            for n in sizes:
                off = random.randrange(0, top - n + 1)
                roff = random.randrange(0, top - n + 1)
                await eng.read(region[off : off + n], desc[roff : roff + n])
                assert sha256(dst, off, n) == await peer.digest(rid, roff, n), f"{n} B"
            # many in flight at once
            size, count = 16384, 32

            async def one(i: int) -> None:
                sl = slice(i * size, (i + 1) * size)
                await eng.read(region[sl], desc[sl])

            dst[:] = 0
            async with anyio.create_task_group() as tg:
                for i in range(count):
                    tg.start_soon(one, i)
            assert sha256(dst, 0, size * count) == await peer.digest(rid, 0, size * count)
        # a region registered with remote_read=False cannot be read
        _, no_b = await peer.alloc(4096, seed=5, remote_read=False)
        no = af.Descriptor.from_bytes(no_b)
        assert not no.remote_read and no.remote_write
        with eng.register(np.zeros(4096, np.uint8)) as region:
            with pytest.raises(af.RegionError, match="remote_read=False"):
                await eng.read(region, no)
            with pytest.raises(ValueError, match="bytes"):
                await eng.read(region[0:16], desc[0:32])
            assert not region.buffer.any()
            await eng.read(region, desc[4096:8192])  # the engine reads on
            assert sha256(region.buffer) == await peer.digest(rid, 4096, 4096)
