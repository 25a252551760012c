"""Forged or malformed descriptors raise DescriptorError, never a cffi or Python internal."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncfabric as af

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def test_forged_base_below_zero_on_tcp():
    """tcp registers with offsets (base 0), so ``base - n`` is negative: that leaked a raw
    OverflowError from cffi before descriptors checked their fields."""
    async with af.Engine("tcp", node="127.0.0.1") as eng:
        with eng.register(np.zeros(4096, np.uint8)) as r, eng.register(bytearray(64)) as s:
            desc = r.descriptor()
            with pytest.raises(af.DescriptorError, match="base"):
                forged = dataclasses.replace(desc, bases=(desc.bases[0] - 64,))
                await eng.write(s, forged[:64])


@pytest.mark.parametrize(
    "field,value",
    [
        ("bases", (-1,)),
        ("bases", (1 << 64,)),
        ("keys", (-5,)),
        ("keys", (1, 2)),
        ("nbytes", 0),
        ("chunk_bytes", -1),
        ("region_id", 1 << 32),
        ("flags", 0x80),
    ],
)
def test_out_of_range_fields(field, value):
    addr = af.EngineAddress(b"\1" * 8, "libfabric", "shm", (b"x",), b"h" * 8, 1)
    good = af.Descriptor(addr, 1, 4096, 1 << 20, (0,), (7,))
    with pytest.raises(af.DescriptorError):
        dataclasses.replace(good, **{field: value})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash(data):
    try:
        af.Descriptor.from_bytes(data)
    except af.DescriptorError:
        pass


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, (1 << 32) - 1),
    st.integers(1, 1 << 40),
    st.integers(1, 1 << 30),
    st.lists(
        st.tuples(st.integers(0, 1 << 48), st.integers(0, (1 << 64) - 1)), min_size=1, max_size=4
    ),
)
def test_wire_roundtrip(rid, nbytes, chunk, doms):
    addr = af.EngineAddress(
        b"\2" * 8, "libfabric", "tcp", tuple(b"a%d" % i for i in range(len(doms))), b"h" * 8, 9
    )
    d = af.Descriptor(
        addr, rid, nbytes, chunk, tuple(b for b, _ in doms), tuple(k for _, k in doms)
    )
    back = af.Descriptor.from_bytes(bytes(d))
    assert (back.region_id, back.nbytes, back.chunk_bytes, back.bases, back.keys) == (
        rid,
        nbytes,
        chunk,
        d.bases,
        d.keys,
    )
    assert back.expected_imms() == af.expected_imms(nbytes, chunk_bytes=chunk)
