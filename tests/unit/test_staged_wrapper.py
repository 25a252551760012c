"""The staged GPU path as a transport wrapper, on the in-memory loopback transport.

No provider, no engine, no GPU: two loopback transports, each wrapped in a
StagedTransport, driven through the contract. ``stage_host_tensors`` stages CPU
torch tensors as if they were GPU tensors (host copies, the real protocol);
``StagedMemory.fault`` injects a failed copy.
"""

from __future__ import annotations

import numpy as np
import pytest

from asyncfabric._errors import DescriptorError, RegionError
from asyncfabric.backends.staged import (
    PIECE_BYTES,
    CopyFailed,
    StagedTransport,
    StagedWrapper,
)
from asyncfabric.testing.loopback import LoopbackTransport
from asyncfabric.transport import (
    NO_IMM,
    CounterReady,
    Fatal,
    Message,
    OpDone,
    PagedWrite,
    Target,
    expected_imms,
)

torch = pytest.importorskip("torch")

CHUNK = 1 << 20
HOT = ("post_write", "post_paged", "pending_events", "spin", "counter_take_spin")
COUNTERS = ("counter_arm", "counter_give", "counter_disarm", "counter_avail", "counters_live")


@pytest.fixture(params=["inline", "event"])
def pair(request):
    """Two wrapped loopback transports that know each other: (a, b, a's peer index of b)."""
    a = StagedWrapper().wrap(
        LoopbackTransport(domains=1, ctrl_max=65, complete=request.param), cuda="auto"
    )
    b = StagedWrapper().wrap(
        LoopbackTransport(domains=1, ctrl_max=65, complete=request.param), cuda="auto"
    )
    assert isinstance(a, StagedTransport) and isinstance(b, StagedTransport)
    a.stage_host_tensors = b.stage_host_tensors = True
    pb = a.add_peer(b.addresses)
    b.add_peer(a.addresses)
    yield a, b, pb
    a.close()
    b.close()


def _reg(t, buf, staged=None):
    if staged is not None:
        t.stage_host_tensors = staged
    if isinstance(buf, np.ndarray):
        ptr, n = buf.ctypes.data, buf.nbytes
    else:
        ptr, n = buf.data_ptr(), buf.numel() * buf.element_size()
    return t.register(ptr, n, remote_write=True, remote_read=True, owner=buf)


def _remote(t, peer, reg, chunk=CHUNK):
    return t.remote(peer, 1, Target(reg.bases, reg.keys, reg.nbytes, chunk, reg.ext, reg.staged))


def _pump(a, b, until, rounds=200):
    """Drain both sides until ``until(events_a, events_b)``; returns both event lists."""
    ea: list = []
    eb: list = []
    for _ in range(rounds):
        ea += a.drain()
        eb += b.drain()
        if until(ea, eb):
            return ea, eb
    raise AssertionError(f"not done after {rounds} drains: a={ea} b={eb}")


def _done(token):
    return lambda ea, eb: any(isinstance(e, OpDone) and e.token == token and not e.held for e in ea)


# ------------------------------------------------------------------ cost and framing


def test_hot_paths_are_the_inner_methods_until_staging_is_needed(pair):
    a, b, pb = pair
    inner = a.inner
    for name in HOT + COUNTERS:
        assert name in vars(a), name
        assert getattr(a, name) == getattr(inner, name), name
    host = np.zeros(4096, np.uint8)
    a.stage_host_tensors = False
    _reg(a, host)  # host memory: still nothing to intercept
    assert all(name in vars(a) for name in HOT)
    _reg(a, torch.zeros(4096, dtype=torch.uint8), staged=True)
    for name in HOT:
        assert name not in vars(a), name
        assert getattr(a, name).__func__ is getattr(StagedTransport, name), name
    for name in COUNTERS:  # staging only gives to counters: they stay the inner's
        assert getattr(a, name) == getattr(inner, name), name


def test_a_staged_remote_also_switches(pair):
    a, b, pb = pair
    rb = _reg(b, torch.zeros(4096, dtype=torch.uint8))
    assert "post_write" in vars(a)
    _remote(a, pb, rb)
    assert "post_write" not in vars(a)


def test_messages_are_framed_and_unframed(pair):
    a, b, pb = pair
    assert a.ctrl_max == a.inner.ctrl_max - StagedWrapper.ctrl_overhead == 64
    sent = []
    orig = a.inner.post_send
    a.inner.post_send = lambda tok, peer, data: sent.append(data) or orig(tok, peer, data)
    for data in (b"", b"\x00", b"\x01hello", b"x" * 64):
        a.post_send(1, pb, data)
    assert sent == [b"\x00", b"\x00\x00", b"\x00\x01hello", b"\x00" + b"x" * 64]
    _, eb = _pump(a, b, lambda ea, eb: len(eb) >= 4)
    assert [e.data for e in eb if isinstance(e, Message)] == [b"", b"\x00", b"\x01hello", b"x" * 64]


def test_unknown_control_messages_are_dropped_and_counted(pair):
    a, b, pb = pair
    a.inner.post_send(1, pb, b"\x07junk")  # not framed by a wrapper of ours
    a.inner.post_send(2, pb, b"\x01short")  # a landing notice of the wrong size
    a.post_send(3, pb, b"ok")
    _, eb = _pump(a, b, lambda ea, eb: any(isinstance(e, Message) for e in eb))
    assert [e.data for e in eb if isinstance(e, Message)] == [b"ok"]
    assert b.stats()["staging_errors"] == 2


def test_cuda_native_transports_are_not_wrapped():
    class Native(LoopbackTransport):
        cuda_native = True

    t = Native(domains=1, ctrl_max=65)
    try:
        assert StagedWrapper().wrap(t, cuda="auto") is t
    finally:
        t.close()


def test_cuda_path_without_hmem_is_staged(pair):
    a, _, _ = pair
    assert a.cuda_path == "staged"
    assert a.devices == frozenset({"cpu", "cuda"})


def test_wants_hmem_rule():
    from asyncfabric.backends.libfabric import wants_hmem

    assert not wants_hmem("staged", "efa")
    assert wants_hmem("direct", "shm")
    assert not wants_hmem("auto", "shm")
    assert wants_hmem("auto", "verbs;ofi_rxm")
    assert wants_hmem("auto", "tcp")


# ------------------------------------------------------------------ the protocol

SIZES = [1, 4096, CHUNK + 1, PIECE_BYTES, (5 << 20) + 3, (9 << 20) + 1]


@pytest.mark.parametrize("src_staged,dst_staged", [(True, True), (True, False), (False, True)])
def test_staged_write_counts_and_bytes(pair, src_staged, dst_staged):
    a, b, pb = pair
    top = max(SIZES)
    src = torch.randint(0, 256, (top,), dtype=torch.uint8)
    dst = torch.zeros(top, dtype=torch.uint8) if dst_staged else np.zeros(top, np.uint8)
    rs = _reg(a, src, staged=src_staged)
    rd = _reg(b, dst, staged=dst_staged)
    assert rs.staged == src_staged and rd.staged == dst_staged
    remote = _remote(a, pb, rd)
    for i, n in enumerate(SIZES):
        off, roff = (7 * i) % (top - n + 1), (13 * i) % (top - n + 1)
        imm = 300 + i
        if not a.post_write(i + 1, remote, roff, rs, off, n, imm):
            _pump(a, b, _done(i + 1))
        want = expected_imms(n, chunk_bytes=CHUNK)
        _pump(a, b, lambda ea, eb, imm=imm, want=want: b.counter_avail(imm) >= want)
        b.drain()
        assert b.counter_avail(imm) == want  # exactly the rule's count
        got = np.asarray(dst)[roff : roff + n]
        assert bytes(got) == bytes(src.numpy()[off : off + n]), n
    assert not a._ops and not b._ops  # every internal post came back


def test_staged_write_without_imm_and_imm_alone(pair):
    a, b, pb = pair
    n = 3 << 20
    src = torch.randint(0, 256, (n,), dtype=torch.uint8)
    dst = torch.zeros(n, dtype=torch.uint8)
    rs, rd = _reg(a, src), _reg(b, dst)
    remote = _remote(a, pb, rd)
    if not a.post_write(1, remote, 0, rs, 0, n, NO_IMM):
        _pump(a, b, _done(1))
    _pump(a, b, lambda ea, eb: bool(torch.equal(src, dst)))
    assert b.counters_live() == 0
    a.post_write(2, remote, 0, None, 0, 0, 9) or _pump(a, b, _done(2))
    _pump(a, b, lambda ea, eb: b.counter_avail(9) == 1)


def test_counter_fires_only_after_the_copy(pair):
    """An armed counter of a staged target reports once, after the data is in place."""
    a, b, pb = pair
    n = (9 << 20) + 1
    src = torch.randint(0, 256, (n,), dtype=torch.uint8)
    dst = torch.zeros(n, dtype=torch.uint8)
    rs, rd = _reg(a, src), _reg(b, dst)
    want = expected_imms(n, chunk_bytes=CHUNK)
    assert not b.counter_arm(5, want)
    a.post_write(1, _remote(a, pb, rd), 0, rs, 0, n, 5)
    _, eb = _pump(a, b, lambda ea, eb: any(isinstance(e, CounterReady) for e in eb))
    assert [e.imm for e in eb if isinstance(e, CounterReady)] == [5]
    assert torch.equal(src, dst)


def test_write_paged_refused_with_staged_regions(pair):
    a, b, pb = pair
    rs = _reg(a, torch.zeros(8192, dtype=torch.uint8))
    rh = _reg(a, np.zeros(8192, np.uint8), staged=False)
    rd = _reg(b, torch.zeros(8192, dtype=torch.uint8), staged=True)
    offs = np.zeros(1, np.uint64)
    host_remote = _remote(a, pb, _reg(b, np.zeros(8192, np.uint8), staged=False))
    for src, dst in ((rs, host_remote), (rh, _remote(a, pb, rd))):
        with pytest.raises(RegionError, match="write_paged"):
            a.post_paged(PagedWrite(1, dst, src, offs, offs, 4096, 1))


def test_staged_target_without_stage_id_is_a_descriptor_error(pair):
    a, b, pb = pair
    rd = _reg(b, torch.zeros(4096, dtype=torch.uint8))
    with pytest.raises(DescriptorError, match="stage id"):
        a.remote(pb, 1, Target(rd.bases, rd.keys, rd.nbytes, CHUNK, b"", True))


def test_a_closed_staged_region_takes_no_notice(pair):
    a, b, pb = pair
    n = 8192
    src = torch.randint(0, 256, (n,), dtype=torch.uint8)
    rs = _reg(a, src)
    rd = _reg(b, torch.zeros(n, dtype=torch.uint8))
    remote = _remote(a, pb, rd)
    b.deregister(rd)
    # the target's memory is gone: the write is refused there (or its notice is dropped)
    a.post_write(1, remote, 0, rs, 0, n, 4)
    ea, _ = _pump(a, b, _done(1))
    assert b.counter_avail(4) == 0


# ------------------------------------------------------------------ failed copies


def test_failed_device_to_host_copy_fails_the_write_with_its_cause(pair):
    a, b, pb = pair
    n = (9 << 20) + 1  # three pieces: the failure comes while others are in flight
    src = torch.randint(0, 256, (n,), dtype=torch.uint8)
    dst = torch.zeros(n, dtype=torch.uint8)
    rs, rd = _reg(a, src), _reg(b, dst)
    a.staged_memory(rs).fault = "d2h"
    assert a.post_write(1, _remote(a, pb, rd), 0, rs, 0, n, 3) is False
    ea, _ = _pump(a, b, _done(1))
    mine = [e for e in ea if isinstance(e, OpDone) and e.token == 1]
    assert mine[0].held and isinstance(mine[0].error, CopyFailed)  # failed at once...
    assert not mine[-1].held and mine[-1].error is mine[0].error  # ...released at the end
    assert "device-to-host" in str(mine[0].error)
    assert b.counter_avail(3) == 0
    # the transport is fine: the next write goes through
    a.post_write(2, _remote(a, pb, rd), 0, rs, 0, n, 4) or _pump(a, b, _done(2))
    _pump(a, b, lambda ea, eb: b.counter_avail(4) == expected_imms(n, chunk_bytes=CHUNK))
    assert torch.equal(src, dst)


def test_failed_host_to_device_copy_is_fatal(pair):
    a, b, pb = pair
    n = 4096
    src = np.arange(n, dtype=np.uint8)
    dst = torch.zeros(n, dtype=torch.uint8)
    rs, rd = _reg(a, src, staged=False), _reg(b, dst, staged=True)
    b.staged_memory(rd).fault = "h2d"
    b.counter_arm(8, 1)
    remote = _remote(a, pb, rd)  # (before a.post_write is looked up: this switches it)
    a.post_write(1, remote, 0, rs, 0, n, 8)
    _, eb = _pump(a, b, lambda ea, eb: any(isinstance(e, Fatal) for e in eb))
    (fatal,) = [e for e in eb if isinstance(e, Fatal)]
    assert isinstance(fatal.error, CopyFailed) and "host-to-device" in str(fatal.error)
    assert not any(isinstance(e, CounterReady) for e in eb)
    assert b.counter_avail(8) == 0
