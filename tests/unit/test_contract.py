"""The contract's helpers: forwarding covers every hook; the counting rule's plan."""

from __future__ import annotations

import inspect

from hypothesis import given
from hypothesis import strategies as st

from asyncfabric.transport import ForwardingTransport, Transport, expected_imms, plan_chunks


def _members(cls: type) -> set[str]:
    out = set()
    for name, v in vars(cls).items():
        if name.startswith("_"):
            continue
        if inspect.isfunction(v) or isinstance(v, property):
            out.add(name)
    return out


def test_forwarding_overrides_every_hook():
    """A wrapper built on ForwardingTransport cannot drop a hook (cuda_ipc once dropped
    watch_peer and release, so same-host peer death went unnoticed)."""
    missing = {
        m for m in _members(Transport) if m not in vars(ForwardingTransport) and m != "error"
    }
    missing |= {"error"} - set(vars(ForwardingTransport))
    assert not missing, f"ForwardingTransport does not forward: {sorted(missing)}"


def test_forwarding_is_concrete():
    assert not inspect.isabstract(ForwardingTransport)


@given(st.integers(0, 1 << 24), st.integers(1, 1 << 21), st.integers(1, 16))
def test_plan_matches_rule(n, chunk, ndom):
    chunk = max(chunk, n // 4096)  # keep the plan small enough to list
    plan = list(plan_chunks(n, chunk, ndom))
    assert len(plan) == expected_imms(n, chunk_bytes=chunk)
    assert sum(ln for _, ln, _ in plan) == n
    assert all(d == i % ndom for i, (_, _, d) in enumerate(plan))
    off = 0
    for o, ln, _ in plan:
        assert o == off and ln <= chunk
        off += ln
