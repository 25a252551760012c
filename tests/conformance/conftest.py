"""Backend conformance: one set of tests every backend and provider must pass.

Which transports run: ``ASYNCFABRIC_CONFORMANCE`` (comma-separated engine specs, e.g.
``shm,tcp`` or ``libfabric:verbs;ofi_rxm,pyverbs``), else every one usable here among shm,
tcp, verbs;ofi_rxm and pyverbs. A spec named explicitly but unusable here fails (it does not
skip), so a CI step that asks for a transport gets it or goes red.
"""

from __future__ import annotations

import os

import pytest

from asyncfabric import backends


def _usable(spec: str) -> bool:
    try:
        b, prov = backends.resolve(spec)
    except Exception:
        return False
    have = b.providers()
    return bool(have) and (not prov or prov in have)


def _specs() -> list[str]:
    env = os.environ.get("ASYNCFABRIC_CONFORMANCE", "").strip()
    if env:
        return [s.strip() for s in env.split(",") if s.strip()]
    return [s for s in ("shm", "tcp", "libfabric:verbs;ofi_rxm", "pyverbs") if _usable(s)]


SPECS = _specs()


def engine_kwargs(spec: str) -> dict:
    # tcp binds loopback so tests never leave the machine
    return {"node": "127.0.0.1"} if spec.endswith("tcp") else {}


@pytest.fixture(params=["asyncio"])
def anyio_backend(request):
    return request.param


@pytest.fixture(params=SPECS or [pytest.param("none", marks=pytest.mark.skip("no transport"))])
def spec(request):
    s = request.param
    if not _usable(s):
        pytest.fail(f"transport {s!r} was asked for but cannot be opened here")
    return s


@pytest.fixture
def kw(spec):
    return engine_kwargs(spec)
