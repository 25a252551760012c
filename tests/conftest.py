from __future__ import annotations

import pytest

from asyncfabric.backends.libfabric import LibfabricBackend

_HAVE = set(LibfabricBackend().providers())
PROVIDERS = [p for p in ("shm", "tcp") if p in _HAVE]


def engine_kwargs(provider: str) -> dict:
    # tcp binds loopback: tests never leave the machine
    return {"node": "127.0.0.1"} if provider == "tcp" else {}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.fixture(
    params=PROVIDERS or [pytest.param("none", marks=pytest.mark.skip("no libfabric provider"))]
)
def provider(request):
    return request.param


@pytest.fixture
def kw(provider):
    return engine_kwargs(provider)
