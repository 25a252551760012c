"""Access control: a write through a revoked key or into a region without remote-write
access never lands and never counts, with or without an immediate; a read through a
revoked key never returns the target's bytes; descriptor and address bytes, however
mangled, only ever raise DescriptorError or TypeError."""

from __future__ import annotations

import time

import anyio
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncfabric as af
from asyncfabric.testing.peer import PeerProcess

TIMEOUT = 1.0


async def _attempt(eng, src, desc, n, imm):
    """Write; return what happened. Must end within the engine's peer_timeout (no hang)."""
    t0 = time.monotonic()
    with anyio.fail_after(TIMEOUT + 5):
        try:
            await eng.write(src[0:n], desc[0:n], imm=imm)
            outcome = "completed locally"
        except (af.RemoteAccessError, af.PeerUnreachable, af.TransferError) as exc:
            outcome = type(exc).__name__
    return outcome, time.monotonic() - t0


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("case", ["unregistered", "no_remote_write", "forged_key"])
@pytest.mark.parametrize("with_imm", [True, False], ids=["imm", "plain"])
async def test_denied_write_never_lands(provider, kw, case, with_imm):
    # Plain writes matter on their own: shm copies a plain write from the sender's
    # process without looking at the target's keys unless the engine asks otherwise.
    async with (
        PeerProcess(provider, **kw) as peer,
        af.Engine(provider, peer_timeout=TIMEOUT, **kw) as eng,
    ):
        src = eng.register(np.full(1 << 16, 0xAB, np.uint8))
        for n in (8, 4096, 65536):
            imm = 100 + n % 251 if with_imm else None
            rid, desc_b = await peer.alloc(n, remote_write=case != "no_remote_write")
            desc = af.Descriptor.from_bytes(desc_b)
            if case == "unregistered":
                await peer.call("unregister", rid)  # the memory stays, the key is revoked
            elif case == "no_remote_write":
                with pytest.raises(af.RegionError, match="remote_write=False"):
                    await eng.write(src[0:n], desc[0:n], imm=imm)
                # a sender that lies about the flags is stopped by the target's key check
                desc = af.Descriptor(
                    desc.address,
                    desc.region_id,
                    desc.nbytes,
                    desc.chunk_bytes,
                    desc.bases,
                    desc.keys,
                    flags=3,
                )
            else:
                desc = af.Descriptor(
                    desc.address,
                    desc.region_id,
                    desc.nbytes,
                    desc.chunk_bytes,
                    desc.bases,
                    tuple(k ^ 0x5A5A5A for k in desc.keys),
                )
            outcome, took = await _attempt(eng, src, desc, n, imm)
            print(f"\n[access] {provider} {case} {n} B: {outcome} in {took * 1e3:.0f} ms")
            await anyio.sleep(0.2)  # give a (wrongly) accepted write time to land
            got = np.frombuffer(await peer.call("read", rid, 0, n), np.uint8)
            assert not got.any(), f"{case}: {int(np.count_nonzero(got))} bytes landed"
            if imm is not None:
                assert await peer.call("count", imm) == 0, f"{case}: the immediate was counted"
        # the target is unharmed: a legitimate write from a fresh engine lands
        async with af.Engine(provider, **kw) as other:
            ok_src = other.register(np.full(64, 7, np.uint8))
            rid, desc_b = await peer.alloc(64)
            await other.write(ok_src, af.Descriptor.from_bytes(desc_b), imm=9)
            await peer.wait(9, 1, timeout=10)
            assert np.all(np.frombuffer(await peer.call("read", rid, 0, 64), np.uint8) == 7)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_revoked_read_returns_nothing(provider, kw):
    if provider not in ("shm", "tcp"):
        pytest.skip("reads: shm and tcp")
    async with (
        PeerProcess(provider, **kw) as peer,
        af.Engine(provider, peer_timeout=TIMEOUT, **kw) as eng,
    ):
        dst = eng.register(np.zeros(1 << 16, np.uint8))
        for n in (8, 65536):
            rid, desc_b = await peer.alloc(n, seed=n)  # random bytes, not zeros
            await peer.call("unregister", rid)
            desc = af.Descriptor.from_bytes(desc_b)
            with anyio.fail_after(TIMEOUT + 5):
                try:
                    await eng.read(dst[0:n], desc[0:n])
                    outcome = "completed"
                except (af.RemoteAccessError, af.PeerUnreachable, af.TransferError) as exc:
                    outcome = type(exc).__name__
            print(f"\n[access] {provider} read through a revoked key, {n} B: {outcome}")
            got = np.frombuffer(dst.buffer, np.uint8)[:n]
            assert not got.any(), f"{int(np.count_nonzero(got))} of the target's bytes came back"


def _valid_blobs():
    a = af.EngineAddress(
        b"\x01" * 8, "libfabric", "shm", (b"fi_shm://123:4", b"x" * 40), b"\x02" * 8, 4242
    )
    d = af.Descriptor(a, 7, 1 << 20, 1 << 20, (0x1000, 0x2000), (11, 22))
    return a.to_bytes(), d.to_bytes()


ADDR, DESC = _valid_blobs()


@st.composite
def mangled(draw, base: bytes):
    kind = draw(st.sampled_from(["flip", "truncate", "extend", "splice", "random"]))
    b = bytearray(base)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(b) - 1))
            b[i] = draw(st.integers(0, 255))
    elif kind == "truncate":
        b = b[: draw(st.integers(0, len(b)))]
    elif kind == "extend":
        b += draw(st.binary(min_size=1, max_size=64))
    elif kind == "splice":
        i = draw(st.integers(0, len(b)))
        b = b[:i] + draw(st.binary(max_size=32)) + b[i + draw(st.integers(0, 8)) :]
    else:
        b = bytearray(draw(st.binary(max_size=256)))
    return bytes(b)


@settings(
    max_examples=10_000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    data=st.one_of(mangled(DESC), mangled(ADDR)),
    as_type=st.sampled_from([bytes, bytearray, memoryview]),
)
def test_fuzzed_wire_bytes_never_crash(data, as_type):
    blob = as_type(bytearray(data)) if as_type is not bytes else data
    for parse in (af.Descriptor.from_bytes, af.EngineAddress.from_bytes):
        try:
            parse(blob)
        except (af.DescriptorError, TypeError):
            pass


def test_wire_round_trip():
    assert af.EngineAddress.from_bytes(ADDR).to_bytes() == ADDR
    assert af.Descriptor.from_bytes(DESC).to_bytes() == DESC
    assert af.EngineAddress.from_bytes(ADDR).pid == 4242
