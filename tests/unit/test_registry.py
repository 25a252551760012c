"""Backend resolution: every "auto" branch, names, bare providers, the unknown-spec error."""

from __future__ import annotations

import pytest

import asyncfabric as af
from asyncfabric.transport import registry
from asyncfabric.transport.contract import Backend

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _have(p: str) -> bool:
    return p in registry.backends()["libfabric"].providers()


@pytest.mark.skipif(not _have("tcp"), reason="libfabric's tcp provider is not usable here")
async def test_default_engine_opens():
    """The README's default, Engine() (provider="auto"), opens (it raised before)."""
    async with af.Engine() as eng:
        assert eng.backend == "libfabric"
        assert eng.provider.partition(";")[0] == "tcp"  # no efa or verbs device here


@pytest.mark.skipif(not _have("shm"), reason="libfabric's shm provider is not usable here")
async def test_local_only_engine_opens_shm():
    async with af.Engine(local_only=True) as eng:
        assert eng.provider == "shm"


def test_auto_ranks_efa_then_verbs_then_tcp(monkeypatch):
    lf = registry.backends()["libfabric"]
    for have, want in [
        (["shm", "tcp", "verbs;ofi_rxm", "efa"], "efa"),
        (["shm", "tcp", "verbs;ofi_rxm"], "verbs;ofi_rxm"),
        (["shm", "tcp"], "tcp"),
    ]:
        monkeypatch.setattr(type(lf), "providers", lambda self, h=have: list(h))
        assert registry.resolve("auto") == (lf, want)
        assert registry.resolve("auto", local_only=True) == (lf, "shm")


def test_auto_nvlink_without_cuda_falls_back_to_shm():
    b, p = registry.resolve("auto", local_only=True, nvlink=True)
    if "cuda_ipc" in registry.backends() and registry.backends()["cuda_ipc"].providers():
        assert b.name == "cuda_ipc"
    else:
        assert (b.name, p) == ("libfabric", "shm")


def test_auto_with_nothing_usable_names_what_is_installed(monkeypatch):
    class Dead(Backend):
        name = "dead"
        needs = "a device this machine lacks"

        def providers(self):
            return []

        def open(self, provider, **kw):
            raise AssertionError

    monkeypatch.setattr(registry, "backends", lambda: {"dead": Dead()})
    with pytest.raises(af.BackendUnavailable, match="dead.*nothing usable here.*lacks"):
        registry.resolve("auto")


def test_names_and_bare_providers():
    lf = registry.backends()["libfabric"]
    assert registry.resolve("shm") == (lf, "shm")
    assert registry.resolve("verbs;ofi_rxm") == (lf, "verbs;ofi_rxm")
    assert registry.resolve("libfabric:tcp") == (lf, "tcp")
    assert registry.resolve("libfabric") == (lf, "")


def test_unknown_spec_lists_installed_backends():
    with pytest.raises(af.BackendUnavailable) as ei:
        af.Engine("nosuch")
    msg = str(ei.value)
    assert "'nosuch'" in msg and "libfabric (usable here:" in msg and "needs" in msg
