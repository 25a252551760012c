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


# ---------------------------------------------------------------- group stores
# The group tests run on both stores: the embedded one (a fresh server per test) and
# etcd (the one scripts/test.sh starts and names in $ASYNCFABRIC_TEST_ETCD, else one
# started here when the etcd binary is installed).


@pytest.fixture(scope="session")
def etcd_url():
    import os

    from asyncfabric.testing.etcd import EtcdUnavailable, start_etcd

    try:
        import aetcd  # noqa: F401
    except ImportError:
        pytest.skip("etcd store tests skipped: the aetcd client is not installed (extra 'etcd')")
    url = os.environ.get("ASYNCFABRIC_TEST_ETCD")
    if url:
        yield url
        return
    try:
        with start_etcd() as url:
            yield url
    except EtcdUnavailable as exc:
        pytest.skip(f"etcd store tests skipped: {exc}")


@pytest.fixture(params=["embedded", "etcd"])
async def group_store(request):
    """What af.join takes as ``store``: an embedded StoreServer, or an etcd URL."""
    if request.param == "etcd":
        yield request.getfixturevalue("etcd_url")
        return
    import os

    import asyncfabric as af

    srv = await af.store.serve("127.0.0.1:0", secret=os.urandom(16).hex())
    try:
        yield srv
    finally:
        await srv.aclose()
