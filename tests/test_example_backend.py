"""The example third-party backend (tests/example_backend): a plugin found by its entry point.

tests/conformance runs the whole conformance suite on it (spec "example"); these check what
the suite cannot see from outside: where it comes from, that it stays on loopback, and how
it fails against a peer that accepts but never answers, or refuses, or revoked a key.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

import numpy as np
import pytest

import asyncfabric as af
from asyncfabric.transport import registry

pytestmark = pytest.mark.anyio
EXAMPLE = Path(__file__).parent / "example_backend"


def _backend():
    try:
        return registry.resolve("example")[0]
    except af.BackendUnavailable as exc:
        pytest.fail(
            "the example backend is not installed: run bash scripts/setup.sh "
            f"(.venv/bin/python -m pip install --no-build-isolation --no-deps -e {EXAMPLE}): {exc}"
        )


def _address(port: int) -> bytes:
    """An example-backend engine address for whatever listens on ``port`` (no process watch)."""
    dom = struct.pack("<4sHQ", b"afx1", port, 1234)
    return af.EngineAddress(os.urandom(8), "example", "loopback", (dom,)).to_bytes()


def test_found_by_its_entry_point_alone():
    b = _backend()
    mod = type(b).__module__
    assert mod == "af_example_backend"
    src = Path(__import__(mod).__file__).resolve()
    assert src.is_relative_to(EXAMPLE.resolve())  # lives in its own folder, not in asyncfabric/
    assert b.providers() == ["loopback"]
    assert not b.auto(local_only=True, nvlink=False)  # a test backend: "auto" never picks it


async def test_binds_loopback_only():
    _backend()
    async with af.Engine("example") as eng:
        assert eng.transport._ls.getsockname()[0] == "127.0.0.1"


async def test_silent_peer_times_out_within_peer_timeout():
    _backend()
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog), never answers
        async with af.Engine("example", peer_timeout=1.0) as eng:
            t0 = time.monotonic()
            with pytest.raises(af.PeerUnreachable, match="peer_timeout"):
                await eng.send(_address(silent.getsockname()[1]), b"hello", timeout=30)
            assert 0.9 < time.monotonic() - t0 < 10


async def test_refused_connection_fails_at_once():
    _backend()
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed again: nothing listens there
    async with af.Engine("example", peer_timeout=30.0) as eng:
        t0 = time.monotonic()
        with pytest.raises(af.PeerUnreachable):
            await eng.send(_address(port), b"hello", timeout=30)
        assert time.monotonic() - t0 < 10
        with pytest.raises(af.PeerUnreachable):  # and the peer stays failed
            await eng.send(_address(port), b"again", timeout=30)


async def test_revoked_key_is_refused_by_the_target():
    _backend()
    async with af.Engine("example") as a, af.Engine("example") as b:
        src = a.register(np.ones(64, np.uint8))
        dst = b.register(np.zeros(64, np.uint8))
        desc = dst.descriptor()
        await a.write(src, desc, imm=1)
        await b.counter(1).wait(1, timeout=30)
        dst.close()
        with pytest.raises(af.RemoteAccessError):
            await a.write(src, desc, imm=1, timeout=30)
        assert b.counter(1).count == 0  # a refused write delivers no immediate
