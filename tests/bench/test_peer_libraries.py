"""Peer libraries in the benchmark runner: UCXX, NIXL (nixl, nixl64), Mooncake Transfer Engine.

Each peer, where its package imports, runs a tiny write stream and pingpong
through the runner (NIXL and Mooncake in worker processes of their own) and
gives positive numbers; where it does not, availability() says so with the
command that installs it. Nothing here asserts anything about speed.
"""

from __future__ import annotations

import importlib

import pytest

from asyncfabric.backends.libfabric import LibfabricBackend
from asyncfabric.bench import peers, schema
from asyncfabric.bench.runner import PEER_BACKEND, Runner

needs_shm = pytest.mark.skipif(
    "shm" not in LibfabricBackend().providers(), reason="libfabric shm provider not available"
)
# impl -> (module that must import, what the skip message must name)
PEERS = {
    "ucxx": ("ucxx", "pip install ucxx-cu12"),
    "nixl": ("nixl", "pip install nixl"),
    "nixl64": ("nixl", "pip install nixl"),
    "mooncake": ("mooncake.engine", "pip install mooncake-transfer-engine-non-cuda"),
}


def test_peers_are_known_everywhere():
    for impl in PEERS:
        assert impl in peers.PEER_IMPLS and impl in schema.IMPLS and impl in PEER_BACKEND
    assert set(peers.OWN_WORKERS) == {"nixl", "nixl64", "mooncake"}
    assert not peers._NOT_WIRED  # NIXL is wired now


@pytest.mark.parametrize("impl", list(PEERS))
def test_absent_peer_is_skipped_with_its_install_command(monkeypatch, impl):
    monkeypatch.setitem(peers._MODULES, impl, "no_such_module_for_asyncfabric_tests")
    ok, why = peers.availability((impl,))
    assert ok == []
    assert why[impl].startswith(f"{impl} skipped: cannot import")
    assert PEERS[impl][1] in why[impl]


def test_own_worker_peers_are_skipped_with_connect(monkeypatch):
    monkeypatch.setattr(peers, "availability", lambda impls: (list(impls), {}))
    r = Runner("tcp", ("nixl", "mooncake", "zmq"), connect="127.0.0.1:9")
    assert r.peers == ["zmq"]
    for impl in ("nixl", "mooncake"):
        assert "not with --connect" in r.skipped[impl]


@needs_shm
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("impl", list(PEERS))
async def test_peer_write_and_pingpong_run(anyio_backend, impl):
    pytest.importorskip(PEERS[impl][0])
    importlib.import_module(PEERS[impl][0])
    async with Runner("shm", (impl,), quick=True) as r:
        assert r.peers == [impl], r.skipped
        # 100 writes: NIXL's window of 64 reposts, nixl64 sends one full batch and a tail
        rows = await r.run_suite("write", sizes=[4096], iters=100)
        rows += await r.run_suite("pingpong", sizes=[64], iters=20)
        assert impl not in r.skipped, r.skipped[impl]
    mine = [x for x in rows if x["impl"] == impl]
    want = {"write"} if impl == "nixl64" else {"write", "pingpong"}  # nixl64 batches streams
    assert {x["suite"] for x in mine} == want
    for x in mine:
        schema.validate_row(x)
        assert (x["backend"], x["provider"]) == PEER_BACKEND[impl]
        assert x["gbps"] > 0 and x["ops_per_s"] > 0 and x["lat_p50_us"] > 0
        assert x["iters"] == (100 if x["suite"] == "write" else 20)
