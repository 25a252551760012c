"""The unit layer: the engine's logic against the in-memory loopback transport.

No provider and no second process (except where a test says it checks a real
transport against the Python semantics)."""

from __future__ import annotations

import pytest

from asyncfabric.testing import loopback


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.fixture(params=["inline", "event", "polled"])
def lb(request):
    """Engine("loopback") opens the in-memory transport; writes finish inline, by event, or
    by an event only drain() finds (a transport that polls there, as pyverbs does)."""
    with loopback.installed(request.param) as b:
        yield b
