"""Bad input gets a clear exception naming the problem: never a crash, hang or silent loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import asyncfabric as af

pytestmark = pytest.mark.anyio


@pytest.fixture
async def pair(provider, kw):
    async with af.Engine(provider, **kw) as a, af.Engine(provider, **kw) as b:
        src = a.register(np.ones(1024, np.uint8))
        dst = b.register(np.zeros(1024, np.uint8))
        yield a, b, src, dst
        src.close()
        dst.close()


async def test_unregistered_buffer(pair):
    a, _, _, dst = pair
    with pytest.raises(TypeError, match="register the buffer first"):
        await a.write(bytearray(16), dst.descriptor()[0:16])


async def test_already_unregistered_region(pair):
    a, _, src, dst = pair
    desc = dst.descriptor()
    src.close()
    with pytest.raises(af.RegionError, match="unregistered"):
        await a.write(src[0:16], desc[0:16])
    with pytest.raises(af.RegionError, match="unregistered"):
        src.descriptor()


async def test_write_to_own_unregistered_region(provider, kw):
    async with af.Engine(provider, **kw) as a:
        src = a.register(np.ones(64, np.uint8))
        dst = a.register(np.zeros(64, np.uint8))
        desc = dst.descriptor()
        await a.write(src, desc, imm=1)  # loopback to itself works
        await a.counter(1).wait(1, timeout=5)
        dst.close()
        with pytest.raises(af.RegionError, match="unregistered"):
            await a.write(src, desc)


@pytest.mark.parametrize(
    "sl", [slice(0, 1025), slice(1000, 1100), slice(-2000, None), slice(0, 10, 2)]
)
async def test_local_slice_out_of_range(pair, sl):
    _, _, src, _ = pair
    with pytest.raises(af.RegionError):
        src[sl]


@pytest.mark.parametrize("sl", [slice(0, 1025), slice(2000, 2001), slice(0, 10, 3)])
async def test_remote_slice_out_of_range(pair, sl):
    _, _, _, dst = pair
    with pytest.raises(af.RegionError):
        dst.descriptor()[sl]


async def test_size_mismatch(pair):
    a, _, src, dst = pair
    with pytest.raises(ValueError, match="16 bytes but destination has 32"):
        await a.write(src[0:16], dst.descriptor()[0:32])


async def test_non_contiguous_tensor_and_array(pair):
    a, *_ = pair
    t = torch.zeros(16, 16)[:, ::2]
    with pytest.raises(af.RegionError, match="not contiguous"):
        a.register(t)
    with pytest.raises(af.RegionError, match="C-contiguous"):
        a.register(np.zeros((8, 8))[:, ::2])
    with pytest.raises(TypeError, match="cannot register"):
        a.register(12345)
    with pytest.raises(af.RegionError, match="empty"):
        a.register(bytearray())
    with pytest.raises(af.RegionError, match="read-only"):
        a.register(b"immutable")
    with a.register(b"immutable", remote_write=False) as r:
        assert r.nbytes == 9


async def test_contiguous_tensor_roundtrip(pair):
    a, b, _, _ = pair
    t = torch.arange(256, dtype=torch.float32)
    out = torch.zeros(256, dtype=torch.float32)
    with a.register(t) as rs, b.register(out) as rd:
        await a.write(rs, rd.descriptor(), imm=8)
        await b.counter(8).wait(1, timeout=5)
    assert torch.equal(t, out)


@pytest.mark.parametrize("imm", [-1, 1 << 32, 2**40])
async def test_imm_out_of_32_bits(pair, imm):
    a, _, src, dst = pair
    with pytest.raises(ValueError, match="32 bits"):
        await a.write(src[0:8], dst.descriptor()[0:8], imm=imm)
    with pytest.raises(ValueError, match="32 bits"):
        a.counter(imm)


async def test_imm_wrong_type(pair):
    a, _, src, dst = pair
    with pytest.raises(TypeError, match="imm must be an int"):
        await a.write(src[0:8], dst.descriptor()[0:8], imm=1.5)


async def test_region_of_another_engine(pair):
    a, b, _, dst = pair
    with pytest.raises(af.RegionError, match="another engine"):
        await a.write(dst[0:8], dst.descriptor()[0:8])


async def test_local_region_as_destination(pair):
    a, _, src, dst = pair
    with pytest.raises(TypeError, match="Descriptor"):
        await a.write(src[0:8], dst[0:8])


async def test_descriptor_of_closed_engine(provider, kw):
    async with af.Engine(provider, **kw) as a:
        src = a.register(np.ones(64, np.uint8))
        b = await af.Engine.open(provider, **kw)
        desc = b.register(np.zeros(64, np.uint8)).descriptor()
        await b.aclose()
        # the peer is gone: an error or a timeout, never a hang or silent success
        with pytest.raises((af.TransferError, af.ImmTimeout)):
            await a.write(src, desc, imm=1, timeout=5)


async def test_closed_engine(provider, kw):
    a = await af.Engine.open(provider, **kw)
    r = a.register(np.ones(64, np.uint8))
    desc = r.descriptor()
    await a.aclose()
    with pytest.raises(af.EngineClosed):
        await a.write(r, desc)
    with pytest.raises(af.EngineClosed):
        a.register(bytearray(8))
    with pytest.raises(af.EngineClosed):
        await a.counter(1).wait(1)
    with pytest.raises(af.EngineClosed):
        _ = a.address


async def test_pending_wait_fails_on_close(provider, kw):
    import anyio

    a = await af.Engine.open(provider, **kw)
    errors = []

    async def waiter():
        try:
            await a.counter(1).wait(1)
        except af.EngineClosed as e:
            errors.append(e)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.sleep(0.05)
        await a.aclose()
    assert len(errors) == 1


async def test_malformed_descriptor_bytes(pair):
    _, _, _, dst = pair
    good = bytes(dst.descriptor())
    assert af.Descriptor.from_bytes(good).keys == dst.descriptor().keys
    for cut in range(len(good)):
        with pytest.raises(af.DescriptorError):
            af.Descriptor.from_bytes(good[:cut])
    with pytest.raises(af.DescriptorError, match="trailing"):
        af.Descriptor.from_bytes(good + b"x")
    with pytest.raises(af.DescriptorError, match="magic"):
        af.Descriptor.from_bytes(b"XYZ" + good[3:])
    with pytest.raises(af.DescriptorError, match="version"):
        af.Descriptor.from_bytes(good[:3] + b"\x63" + good[4:])
    with pytest.raises(TypeError):
        af.Descriptor.from_bytes("not bytes")  # type: ignore[arg-type]


async def test_message_too_large(pair):
    a, b, *_ = pair
    with pytest.raises(ValueError, match="ctrl_max"):
        await a.send(b.address, b"x" * (a.ctrl_max + 1))


async def test_peer_on_other_provider(provider, kw):
    other = "tcp" if provider == "shm" else "shm"
    okw = {"node": "127.0.0.1"} if other == "tcp" else {}
    async with af.Engine(provider, **kw) as a, af.Engine(other, **okw) as b:
        desc = b.register(np.zeros(8, np.uint8)).descriptor()
        src = a.register(np.zeros(8, np.uint8))
        with pytest.raises(af.TransferError, match="same provider"):
            await a.write(src, desc)


def test_unknown_provider():
    with pytest.raises(af.BackendUnavailable, match="unknown provider 'nosuch'"):
        af.Engine("nosuch")
    with pytest.raises(af.BackendUnavailable, match="unknown provider"):
        af.Engine("nobackend:shm")


async def test_unusable_provider():
    with pytest.raises(af.BackendUnavailable, match="cannot open libfabric provider"):
        async with af.Engine("libfabric:psm3"):
            pass


def test_engine_arguments():
    with pytest.raises(ValueError, match="domains"):
        af.Engine("shm", domains=0)
    with pytest.raises(ValueError, match="chunk_bytes"):
        af.Engine("shm", chunk_bytes=-5)
    with pytest.raises(ValueError, match="ProgressPolicy"):
        af.ProgressPolicy(spin_us=-1)
