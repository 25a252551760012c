"""cuda_ipc's event filter and forwarded hooks, with no CUDA: over the loopback transport.

Regression tests for issue 11: the old filter's ``_on_op(token, status)`` lacked
``held``, so a stalled peer's ``held`` completion raised TypeError inside drain;
and the old transport forwarded neither ``watch_peer`` nor ``release``.
"""

from __future__ import annotations

from functools import partial

import pytest

from asyncfabric.backends.cuda_ipc import (
    INTERNAL_TOKENS,
    KERNEL_BYTES,
    CudaIpcBackend,
    CudaIpcTransport,
    drop_internal,
)
from asyncfabric.testing.loopback import LoopbackTransport
from asyncfabric.transport import CounterReady, Fatal, Message, OpDone, PolicyNs, Target
from asyncfabric.transport.status import IO_ERROR, PEER_STALLED


def test_drop_internal_passes_held_completions_and_drops_internal_tokens():
    err = RuntimeError("x")
    evs = [
        OpDone(5, PEER_STALLED, held=True),
        OpDone(INTERNAL_TOKENS + 1, IO_ERROR, held=True),
        Message(b"m"),
        OpDone(INTERNAL_TOKENS + 1, IO_ERROR),
        OpDone(INTERNAL_TOKENS + 2, 0),
        CounterReady(3),
        OpDone(5, PEER_STALLED),
        Fatal(err),
    ]
    kept, failed = drop_internal(evs)
    assert kept == [
        OpDone(5, PEER_STALLED, held=True),
        Message(b"m"),
        CounterReady(3),
        OpDone(5, PEER_STALLED),
        Fatal(err),
    ]
    assert failed == 1  # the internal post's final failure, counted once
    same = [OpDone(1), Message(b"")]
    assert drop_internal(same)[0] is same  # nothing to drop: no copy


@pytest.fixture
def pair():
    a = CudaIpcTransport(LoopbackTransport(domains=1, ctrl_max=64, complete="event"))
    b = CudaIpcTransport(LoopbackTransport(domains=1, ctrl_max=64, complete="event"))
    pb = a.add_peer(b.addresses)
    b.add_peer(a.addresses)
    yield a, b, pb
    a.close()
    b.close()


def test_drain_passes_held_and_keeps_its_own_posts(pair):
    a, b, pb = pair
    a._post_imms(pb, 42, 3)  # the doorbell writes a large copy ends with
    # ...and what the shm transport reports when a peer stalls with writes outstanding
    stalled = [
        OpDone(7, PEER_STALLED, held=True),
        OpDone(INTERNAL_TOKENS + 99, PEER_STALLED, held=True),
    ]
    inner_drain = a.inner.drain
    a.inner.drain = lambda: inner_drain() + [stalled.pop(0) for _ in list(stalled)]
    evs = a.drain()  # (raised TypeError before)
    assert evs == [OpDone(7, PEER_STALLED, held=True)]
    assert b.counter_avail(42) == 3
    assert a.stats()["imm_post_errors"] == 0


def test_immediate_alone_goes_to_the_doorbell(pair):
    a, b, pb = pair
    host = b.inner.register(0, 0, remote_write=True, remote_read=False)
    remote = a.remote(pb, 1, Target(host.bases, host.keys, 0, 1 << 20, b"H"))
    assert a.post_write(11, remote, 0, None, 0, 0, 6) is False
    assert a.drain() == [OpDone(11)]
    assert b.counter_avail(6) == 1


def test_peer_watch_and_release_reach_the_inner_transport():
    calls = []
    inner = LoopbackTransport(domains=1, ctrl_max=64, complete="event")
    # (patched before wrapping: the wrapper binds the inner transport's methods once)
    inner.watch_peer = lambda peer, pid: calls.append(("watch", peer, pid))
    inner.release = lambda: calls.append(("release",))
    inner.peer_dead = lambda peer: calls.append(("dead", peer)) or True
    a = CudaIpcTransport(inner)
    b = CudaIpcTransport(LoopbackTransport(domains=1, ctrl_max=64, complete="event"))
    try:
        pb = a.add_peer(b.addresses)
        a.watch_peer(pb, 1234)
        a.release()
        assert a.peer_dead(pb)
        assert calls == [("watch", pb, 1234), ("release",), ("dead", pb)]
    finally:
        a.close()
        b.close()


def test_identity_and_paths(pair):
    a, _, _ = pair
    assert (a.backend, a.provider, a.cuda_path, a.cuda_native) == (
        "cuda_ipc",
        "nvlink",
        "ipc",
        True,
    )
    assert "cuda" in a.devices


def test_backend_offers_nvlink_only_when_asked():
    b = CudaIpcBackend()
    assert b.accepts("shm") is None and b.accepts("nvlink") is None
    assert b.auto(local_only=False, nvlink=True) == []
    assert b.auto(local_only=True, nvlink=False) == []
    assert b.auto(local_only=True, nvlink=True) == ([(0, "nvlink")] if b.providers() else [])


def test_drop_internal_keeps_fallback_batch_sub_tokens():
    # A batch posted entry by entry completes under sub-tokens (SUB_BIT set, above
    # INTERNAL_TOKENS): they are the engine's, or the batch never ends.
    from asyncfabric.transport.batching import sub_token

    evs = [OpDone(sub_token(9, 0)), OpDone(INTERNAL_TOKENS + 3), OpDone(sub_token(9, 1), IO_ERROR)]
    kept, failed = drop_internal(evs)
    assert kept == [OpDone(sub_token(9, 0)), OpDone(sub_token(9, 1), IO_ERROR)]
    assert failed == 0


def _gpu_batch(a, pb, gpu_src: bool, gpu_dst: bool):
    """A two-entry batch from a (fabricated) GPU registration and/or into a GPU remote."""
    import numpy as np

    from asyncfabric.backends.cuda_ipc import _GpuRemote
    from asyncfabric.transport import Registration, WriteBatch

    host_src = a.inner.register(0, 64, remote_write=False, remote_read=False)
    src = (
        Registration(7, (7,), (0xDEAD0000,), 0xDEAD0000, 64, "cuda", 0, b"C")
        if gpu_src
        else host_src
    )
    t = Target((0xBEEF0000,), (7,), 64, 1 << 20, b"C")
    dst = (
        _GpuRemote(pb, 1, t, 0xBEEF0000, 64)
        if gpu_dst
        else a.remote(pb, 1, Target((0,), (0,), 64, 1 << 20, b"H"))
    )
    return WriteBatch(
        5, (src,), (dst,), np.zeros(2, np.uint32), np.zeros(2, np.uint32),
        np.array([0, 32], np.uint64), np.array([0, 32], np.uint64),
        np.array([32, 32], np.uint64), np.array([3, 3], np.int64), np.zeros(2, np.int32), {}, {},
    )  # fmt: skip


@pytest.mark.parametrize("gpu_src,gpu_dst", [(True, True), (False, True)])
def test_gpu_batches_never_reach_the_native_host_batch_path(gpu_src, gpu_dst):
    """The 2026-12-06 GPU weights crash: CudaIpcTransport forwarded post_batch to the
    shm transport's native batch, which memcpy()d from device pointers (SIGSEGV). A
    batch with a GPU side must go entry by entry through cuda_ipc's own post_write."""
    native = []
    inner = LoopbackTransport(domains=1, ctrl_max=64, complete="event")
    inner.post_batch = lambda b: native.append(b) or True  # (patched before wrapping)
    a = CudaIpcTransport(inner)
    b = CudaIpcTransport(LoopbackTransport(domains=1, ctrl_max=64, complete="event"))
    try:
        pb = a.add_peer(b.addresses)
        posted = []
        a.post_write = lambda *args: posted.append(args) or True  # no CUDA here: record
        batch = _gpu_batch(a, pb, gpu_src, gpu_dst)
        assert a.post_batch(batch) is True
        assert native == []
        assert [(p[2], p[4], p[5], p[6]) for p in posted] == [(0, 0, 32, 3), (32, 32, 32, 3)]
        assert batch.cache["cuda_ipc"] is True  # decided once per compiled batch
    finally:
        a.close()
        b.close()


def test_gpu_to_host_batch_entries_are_refused_before_anything_is_posted(pair):
    from asyncfabric import RegionError

    a, _, pb = pair
    posted = []
    a.post_write = lambda *args: posted.append(args) or True
    batch = _gpu_batch(a, pb, True, False)
    with pytest.raises(RegionError, match="batch entry 0: cuda_ipc cannot write GPU memory"):
        a.post_batch(batch)
    assert posted == []


def test_host_batches_keep_the_native_path():
    native = []
    inner = LoopbackTransport(domains=1, ctrl_max=64, complete="event")
    inner.post_batch = lambda b: native.append(b) or True
    a = CudaIpcTransport(inner)
    b = CudaIpcTransport(LoopbackTransport(domains=1, ctrl_max=64, complete="event"))
    try:
        pb = a.add_peer(b.addresses)
        batch = _gpu_batch(a, pb, False, False)
        assert a.post_batch(batch) is True
        assert native == [batch]
    finally:
        a.close()
        b.close()


def test_reads_of_gpu_memory_are_refused(pair):
    from asyncfabric import Unsupported
    from asyncfabric.backends.cuda_ipc import _GpuRemote
    from asyncfabric.transport import Registration

    a, _, pb = pair
    gpu_reg = Registration(7, (7,), (0xDEAD0000,), 0xDEAD0000, 64, "cuda", 0, b"C")
    t = Target((0xBEEF0000,), (7,), 64, 1 << 20, b"C")
    with pytest.raises(Unsupported, match="no one-sided read of GPU memory"):
        a.post_read(1, _GpuRemote(pb, 1, t, 0xBEEF0000, 64), 0, a.inner.register(0, 64,
                    remote_write=True, remote_read=True), 0, 64)  # fmt: skip
    host = a.remote(pb, 1, Target((0,), (0,), 64, 1 << 20, b"H"))
    with pytest.raises(Unsupported, match="no one-sided read of GPU memory"):
        a.post_read(1, host, 0, gpu_reg, 0, 64)


@pytest.fixture
def shm_pair():
    from asyncfabric.backends.libfabric import LibfabricBackend, LibfabricTransport

    if "shm" not in LibfabricBackend().providers():
        pytest.skip("libfabric's shm provider is not here")

    def shm():
        return LibfabricTransport("shm", domains=1, node=None, ctrl_max=64, hmem=False)

    a, b = CudaIpcTransport(shm()), CudaIpcTransport(shm())
    pb = a.add_peer(b.addresses)
    b.add_peer(a.addresses)
    for t in (a, b):  # progress threads, as an engine starts them
        t.start(PolicyNs(spin_ns=50_000, idle_block_ns=10**6, busy_block_ns=10**6))
        # The copy kernel would be launched for real where there is a GPU (on the
        # fabricated pointers here): a test that wants it puts a fake in _kernels.
        t.kernel_bytes = 0
    yield a, b, pb
    a.close()
    b.close()


def _until(cond, what: str, timeout: float = 5.0):
    import time

    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, what
        time.sleep(0.001)


def test_a_triggered_gpu_batch_copies_on_the_stream_and_fires_its_immediates(shm_pair, monkeypatch):
    """cuda_ipc splits a triggered GPU batch: the copies become stream work, and the
    immediates are armed on a private word that only the stream work writes, after the
    copies. Here the stream work runs against host memory (no CUDA): the copies are
    recorded, the word's store is made by the test. Writing the user's flag alone
    posts nothing: no immediate without its data."""
    import ctypes
    import time

    import numpy as np

    from asyncfabric import Flag
    from asyncfabric.backends.cuda_ipc import _CopyWords, _driver

    a, b, pb = shm_pair
    assert a.gpu_triggers
    buf = np.zeros(2 * _CopyWords.STRIDE, np.uint8)
    base = buf.ctypes.data
    a._words[0] = _CopyWords(base, base, 2)  # host memory standing in for mapped words
    copies, stores = [], []
    monkeypatch.setattr(_driver, "use_device", lambda dev: None)
    monkeypatch.setattr(_driver, "copy_async", lambda *args: copies.append(args))
    monkeypatch.setattr(
        _driver,
        "write_value32",
        lambda s, p, v: (
            stores.append((s, p, v)) or setattr(ctypes.c_uint32.from_address(p), "value", v)
        ),
    )
    batch = _gpu_batch(a, pb, True, True)
    flag = Flag()
    work = a.trigger_arm(5, batch, flag.ptr, 1, -1, False, 10**6, 20_000)
    flag.set(1)  # a store into the flag alone: nothing may be posted
    time.sleep(0.02)
    assert b.counter_avail(3) == 0
    work(99, 1)  # what cuda_memops.stream_fire(trigger) queues on stream 99
    assert copies == [
        (0xBEEF0000, 0xDEAD0000, 32, 99),
        (0xBEEF0000 + 32, 0xDEAD0000 + 32, 32, 99),
    ]
    assert stores == [(99, base, 1)]  # after the copies: the private word
    _until(lambda: b.counter_avail(3) == 2, "the peer counts one immediate per entry")
    evs: list = []
    _until(lambda: evs.extend(a.drain()) or OpDone(5) in evs, "the fire ends as a batch")
    assert batch.status.tolist() == [0, 0]
    assert a._words[0].free == [1, 0] and not a._lent  # one-shot: its word is back


def test_gpu_triggers_give_their_word_back_on_disarm(shm_pair, monkeypatch):
    import numpy as np

    from asyncfabric import Flag, RegionError
    from asyncfabric.backends.cuda_ipc import _CopyWords, _driver

    a, _, pb = shm_pair
    buf = np.zeros(_CopyWords.STRIDE, np.uint8)
    a._words[0] = _CopyWords(buf.ctypes.data, buf.ctypes.data, 1)
    monkeypatch.setattr(_driver, "use_device", lambda dev: None)
    flag = Flag()
    a.trigger_arm(5, _gpu_batch(a, pb, True, True), flag.ptr, 1, 0, True, 0, 0)
    with pytest.raises(RegionError, match="every one of the 1024 trigger words of GPU 0"):
        a.trigger_arm(6, _gpu_batch(a, pb, True, True), flag.ptr, 1, 0, True, 0, 0)
    assert a.trigger_disarm(5) == 0
    assert a._words[0].free == [0]
    a.trigger_arm(6, _gpu_batch(a, pb, True, True), flag.ptr, 1, 0, True, 0, 0)
    assert a.trigger_disarm(6) == 0


def test_host_triggers_stay_the_shm_transports(shm_pair):
    import numpy as np

    from asyncfabric import Flag
    from asyncfabric.transport import WriteBatch

    a, b, pb = shm_pair
    src_buf, land = np.arange(64, dtype=np.uint8), np.zeros(64, np.uint8)
    src = a.register(src_buf.ctypes.data, 64, remote_write=False, remote_read=False, owner=src_buf)
    reg = b.register(land.ctypes.data, 64, remote_write=True, remote_read=False, owner=land)
    dst = a.remote(pb, 1, Target(reg.bases, reg.keys, 64, 1 << 20, reg.ext))
    batch = WriteBatch(
        6, (src,), (dst,), np.zeros(1, np.uint32), np.zeros(1, np.uint32),
        np.zeros(1, np.uint64), np.zeros(1, np.uint64), np.array([64], np.uint64),
        np.array([4], np.int64), np.zeros(1, np.int32), {}, {},
    )  # fmt: skip
    flag = Flag()
    assert a.trigger_arm(6, batch, flag.ptr, 1, -1, False, 10**6, 20_000) is None
    flag.set(1)
    _until(lambda: b.counter_avail(4) == 1, "the host write's immediate is counted")
    assert (land == src_buf).all()


@pytest.mark.parametrize(
    "gpu_src,gpu_dst,match",
    [
        (False, True, "batch entry 0: a triggered write into a GPU region on cuda_ipc"),
        (True, False, "batch entry 0: cuda_ipc cannot write GPU memory into a peer's host"),
    ],
)
def test_triggered_gpu_entries_that_cannot_be_copied_are_refused(shm_pair, gpu_src, gpu_dst, match):
    from asyncfabric import Flag, RegionError

    a, _, pb = shm_pair
    flag = Flag()
    with pytest.raises(RegionError, match=match):
        a.trigger_arm(7, _gpu_batch(a, pb, gpu_src, gpu_dst), flag.ptr, 1, -1, False, 0, 0)
    assert a.trigger_disarm(7) < 0  # nothing was armed


def test_a_large_copy_can_end_by_a_trigger_on_a_word_the_stream_writes(shm_pair, monkeypatch):
    """copy_triggers: after a large copy, the copy stream writes a word (here: the test,
    standing in for cuStreamWriteValue32) on which the write's immediates are armed;
    the shm watcher posts them, the write ends as the trigger's OpDone, and the word
    is lent again. With every word lent, the copy-notice path takes over (False)."""
    import ctypes

    import numpy as np

    from asyncfabric.backends.cuda_ipc import _CopyWords, _driver

    a, b, pb = shm_pair
    buf = np.zeros(2 * _CopyWords.STRIDE, np.uint8)
    base = buf.ctypes.data
    a._words[0] = _CopyWords(base, base, 2)  # host memory standing in for mapped words
    stores = []
    monkeypatch.setattr(_driver, "write_value32", lambda s, p, v: stores.append((s, p, v)))
    store = partial(_driver.write_value32, 5)  # (as post_write passes it: the copy stream's)
    assert a._fire_after(77, 0, pb, 9, 3, store)
    assert a._fire_after(78, 0, pb, 10, 1, store)
    assert not a._fire_after(79, 0, pb, 11, 1, store)  # both words lent
    assert stores == [(5, base, 1), (5, base + _CopyWords.STRIDE, 1)]
    import time

    time.sleep(0.01)
    assert b.counter_avail(9) == 0  # armed, not fired: the stream has not got there
    ctypes.c_uint32.from_address(base).value = 1  # the first copy's stream arrives
    _until(lambda: b.counter_avail(9) == 3, "the first write's immediates are counted")
    evs: list = []
    _until(lambda: evs.extend(a.drain()) or OpDone(77) in evs, "the write ends")
    assert OpDone(78) not in evs and b.counter_avail(10) == 0
    assert a._words[0].free == [0] and buf[:4].tolist() == [0, 0, 0, 0]  # lent again
    ctypes.c_uint32.from_address(base + _CopyWords.STRIDE).value = 1
    _until(lambda: evs.extend(a.drain()) or OpDone(78) in evs, "the second write ends")
    assert not a._lent
    # (the sender's completion and the peer's count are not ordered: wait for it)
    _until(lambda: b.counter_avail(10) == 1, "the second write's immediate is counted")


def test_device_pointer_addresses_a_peers_gpu_word_and_refuses_host_regions(pair):
    """Engine.peer_word's transport half: a peer's GPU region as mapped here, plus the
    offset; a host region or a word past the region's end is refused by name."""
    from asyncfabric._errors import RegionError, Unsupported
    from asyncfabric.backends.cuda_ipc import _GpuRemote

    a, b, pb = pair
    g = _GpuRemote(pb, 1, Target((0xBEEF0000,), (7,), 64, 1 << 20, b"C"), 0xBEEF0000, 64)
    assert a.device_pointer(g, 0) == 0xBEEF0000
    assert a.device_pointer(g, 60) == 0xBEEF003C
    with pytest.raises(RegionError, match="no 4-byte word"):
        a.device_pointer(g, 61)
    host = b.inner.register(0, 64, remote_write=True, remote_read=False)
    remote = a.remote(pb, 1, Target(host.bases, host.keys, 64, 1 << 20, b"H"))
    with pytest.raises(Unsupported, match="host region"):
        a.device_pointer(remote, 0)


def test_a_repeating_gpu_trigger_never_merges_two_fires(shm_pair, monkeypatch):
    """A stream that fires a repeating GPU trigger again before the watcher took the
    previous fire (signal words let the stream run ahead of the host) must not merge
    the two: the stream work waits until the private word is back at the reset value
    before it stores again, so every fire posts its immediates. The wait is played
    here by polling the word, as the GPU would."""
    import ctypes
    import time

    import numpy as np

    from asyncfabric import Flag
    from asyncfabric.backends.cuda_ipc import _CopyWords, _driver

    a, b, pb = shm_pair
    buf = np.zeros(2 * _CopyWords.STRIDE, np.uint8)
    base = buf.ctypes.data
    a._words[0] = _CopyWords(base, base, 2)
    waits = []

    def wait_value32(stream, ptr, value, flags):
        waits.append((stream, ptr, value, flags))
        t0 = time.monotonic()
        while ctypes.c_uint32.from_address(ptr).value != value:  # EQ, as the stream waits
            assert time.monotonic() - t0 < 5, "the watcher never reset the word"

    monkeypatch.setattr(_driver, "use_device", lambda dev: None)
    monkeypatch.setattr(_driver, "copy_async", lambda *args: None)
    monkeypatch.setattr(_driver, "wait_value32", wait_value32)
    monkeypatch.setattr(
        _driver,
        "write_value32",
        lambda s, p, v: setattr(ctypes.c_uint32.from_address(p), "value", v),
    )
    batch = _gpu_batch(a, pb, True, True)  # kept: the native trigger points into it
    work = a.trigger_arm(5, batch, Flag().ptr, 1, 0, True, 10**6, 20_000)
    fires = 5
    for _ in range(fires):  # back to back: the stream does not wait for the host
        work(99, 1)
    assert waits == [(99, base, 0, _driver.WAIT_VALUE_EQ)] * fires
    _until(lambda: b.counter_avail(3) == 2 * fires, "every fire's two immediates are counted")
    evs: list = []
    _until(lambda: evs.extend(a.drain()) or evs.count(OpDone(5)) == fires, "each fire ends once")
    assert a.trigger_disarm(5) == 0  # nothing in flight: the word (our buf) is free again


def test_a_gpu_trigger_armed_on_a_fired_flag_waits_for_its_stream(shm_pair, monkeypatch):
    """A flag that already holds the value (a previous phase's fires leave it there)
    must not fire a GPU trigger at arm time: that would post the immediates of copies
    the stream never made. The private word starts unfired; a reset that has already
    reached the value is refused by name."""
    import ctypes
    import time

    import numpy as np

    from asyncfabric import Flag
    from asyncfabric.backends.cuda_ipc import _CopyWords, _driver

    a, b, pb = shm_pair
    buf = np.zeros(2 * _CopyWords.STRIDE, np.uint8)
    base = buf.ctypes.data
    a._words[0] = _CopyWords(base, base, 2)
    monkeypatch.setattr(_driver, "use_device", lambda dev: None)
    monkeypatch.setattr(_driver, "copy_async", lambda *args: None)
    monkeypatch.setattr(
        _driver,
        "write_value32",
        lambda s, p, v: setattr(ctypes.c_uint32.from_address(p), "value", v),
    )
    flag = Flag()
    flag.set(1)  # fired long ago
    batch = _gpu_batch(a, pb, True, True)  # kept: the native trigger points into it
    with pytest.raises(ValueError, match="reset 1 has already reached value 1"):
        a.trigger_arm(4, batch, flag.ptr, 1, 1, True, 10**6, 20_000)
    assert a._words[0].free == [1, 0]  # the refused arm took no word
    work = a.trigger_arm(5, batch, flag.ptr, 1, -1, False, 10**6, 20_000)
    time.sleep(0.02)
    assert b.counter_avail(3) == 0  # (the old code copied the flag's 1 and fired here)
    work(99, 1)
    _until(lambda: b.counter_avail(3) == 2, "the stream's fire posts the immediates")
    evs: list = []
    _until(lambda: evs.extend(a.drain()) or OpDone(5) in evs, "the fire ends")


class _FakeKernel:
    """The copy kernel's launches, recorded; a launch with a word stores it (as the
    kernel does after its copy), into host memory standing in for a mapped word."""

    def __init__(self) -> None:
        self.launches: list[tuple[int, ...]] = []

    def launch(self, stream: int, dst: int, src: int, n: int, word: int = 0, value: int = 0):
        import ctypes

        self.launches.append((stream, dst, src, n, word, value))
        if word:
            ctypes.c_uint32.from_address(word).value = value


def _fake_kernel(a):
    """Turn ``a``'s copy kernel on as a _FakeKernel, with one word (host memory
    standing in for a mapped word) in GPU 0's pool: (the word's buffer, the fake)."""
    import numpy as np

    from asyncfabric.backends.cuda_ipc import _CopyWords

    buf = np.zeros(_CopyWords.STRIDE, np.uint8)
    a._words[0] = _CopyWords(buf.ctypes.data, buf.ctypes.data, 1)
    k = a._kernels[0] = _FakeKernel()
    a.kernel_bytes = KERNEL_BYTES
    return buf, k


def test_a_triggered_gpu_batch_of_small_copies_stores_its_word_from_the_kernel(
    shm_pair, monkeypatch
):
    """Small copies of a triggered GPU batch go through the copy kernel, and the last
    launch stores the private word itself (one launch, no separate stream write); a
    repeating trigger's gate wait comes before any copy of the fire."""

    from asyncfabric import Flag
    from asyncfabric.backends.cuda_ipc import _driver

    a, b, pb = shm_pair
    buf, k = _fake_kernel(a)
    base = buf.ctypes.data
    calls: list = []
    monkeypatch.setattr(_driver, "use_device", lambda dev: None)
    monkeypatch.setattr(_driver, "copy_async", lambda *args: calls.append(("copy", *args)))
    monkeypatch.setattr(_driver, "write_value32", lambda *args: calls.append(("store", *args)))
    monkeypatch.setattr(_driver, "wait_value32", lambda *args: calls.append(("wait", *args)))
    batch = _gpu_batch(a, pb, True, True)
    flag = Flag()
    work = a.trigger_arm(5, batch, flag.ptr, 1, 0, True, 10**6, 20_000)
    work(99, 1)
    assert calls == [("wait", 99, base, 0, _driver.WAIT_VALUE_EQ)]  # the gate, first
    assert k.launches == [
        (99, 0xBEEF0000, 0xDEAD0000, 32, 0, 0),
        (99, 0xBEEF0000 + 32, 0xDEAD0000 + 32, 32, base, 1),  # copies, then the word
    ]
    _until(lambda: b.counter_avail(3) == 2, "the peer counts one immediate per entry")
    assert a.trigger_disarm(5) == 0
    # one launch per copy past the kernel's size: the copy engine and a stream write
    a.kernel_bytes = 16
    calls.clear()
    work = a.trigger_arm(6, batch, flag.ptr, 1, -1, False, 10**6, 20_000)
    work(99, 1)
    assert [c[0] for c in calls] == ["copy", "copy", "store"]
    assert a.trigger_disarm(6) == 0


@pytest.mark.parametrize("small_triggers", [False, True])
def test_a_small_gpu_write_ends_by_a_sync_or_by_the_kernels_word(
    shm_pair, monkeypatch, small_triggers
):
    """A small GPU-to-GPU write ends one of two ways: a copy-engine copy, a stream
    sync and its immediates posted inline (done in the call); or the copy kernel,
    which stores a word after the copy on which its immediates are armed (the
    watcher posts them, the write ends as the trigger's OpDone, and the word is lent
    again)."""
    import types

    from asyncfabric.backends.cuda_ipc import _driver, _GpuRemote
    from asyncfabric.transport import Registration

    a, b, pb = shm_pair
    buf, k = _fake_kernel(a)
    base = buf.ctypes.data
    a.small_triggers = small_triggers
    syncs: list = []
    copies: list = []
    monkeypatch.setattr(_driver, "use_device", lambda dev: None)
    monkeypatch.setattr(_driver, "stream_sync", syncs.append)
    monkeypatch.setattr(_driver, "copy_async", lambda *args: copies.append(args))
    src = Registration(7, (7,), (0xDEAD0000,), 0xDEAD0000, 64, "cuda", 0, b"C")
    dst = _GpuRemote(pb, 1, Target((0xBEEF0000,), (7,), 64, 1 << 20, b"C"), 0xBEEF0000, 64)
    stream = types.SimpleNamespace(cuda_stream=99)
    done = a.post_write(41, dst, 8, src, 16, 8, 4, stream)
    _until(lambda: b.counter_avail(4) == 1, "the peer counts the write's immediate")
    if not small_triggers:
        assert done and syncs == [99] and not k.launches
        assert copies == [(0xBEEF0000 + 8, 0xDEAD0000 + 16, 8, 99)]
        return
    assert not done and not syncs and not copies
    assert k.launches == [(99, 0xBEEF0000 + 8, 0xDEAD0000 + 16, 8, base, 1)]
    evs: list = []
    _until(lambda: evs.extend(a.drain()) or OpDone(41) in evs, "the write ends")
    assert a._words[0].free == [0] and not a._lent


def test_the_copy_kernels_ptx_is_generated_from_its_source():
    """_copy_ptx.py is scripts/build_ptx.py's output for copy_kernel.cu: the digest of
    the source it was made from matches the file, and where NVRTC is installed
    (nvidia-cuda-nvrtc-cu12), generating it again gives the same module."""
    import hashlib
    import importlib.util
    from pathlib import Path

    from asyncfabric.backends.cuda_ipc import _copy_ptx

    root = Path(__file__).resolve().parents[2]
    src = (root / "asyncfabric/backends/cuda_ipc/copy_kernel.cu").read_text()
    assert hashlib.sha256(src.encode()).hexdigest() == _copy_ptx.SOURCE_SHA256, (
        "copy_kernel.cu changed: run scripts/build_ptx.py"
    )
    assert ".entry af_copy(" in _copy_ptx.PTX and _copy_ptx.PTX.count(".param .") == 5
    try:  # (find_spec of a submodule imports its parent package, absent without NVRTC)
        have_nvrtc = importlib.util.find_spec("nvidia.cuda_nvrtc") is not None
    except ModuleNotFoundError:
        have_nvrtc = False
    if not have_nvrtc:
        return
    spec = importlib.util.spec_from_file_location("build_ptx", root / "scripts/build_ptx.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.render(src) == (root / "asyncfabric/backends/cuda_ipc/_copy_ptx.py").read_text()
