"""The engine's native fast path, or its stand-in when there is none.

``Engine.write``, ``write_imm`` and ``ImmCounter.wait`` first ask the fast path
(``_fastpath.c``: the same checks the Python path makes, then the transport's
native table, ``transport/native_ops.h``, in one C call). Whenever it answers
``NOT_HERE`` they take their Python path, which is the definition of what a
call does: the fast path only ever does less work for the same result.

There is no fast path when the transport offers no native table (Python
backends, wrappers that own the hot paths), when the extension is not built, or
when ``ASYNCFABRIC_FASTPATH=0`` is set (tests run both ways with it). Then the
stand-in answers ``NOT_HERE`` to everything, at the cost of one call.
"""

from __future__ import annotations

import importlib
import itertools
import os
from typing import Any

from ..transport.contract import Remote, Transport

_native: Any
try:  # through importlib: the extension has no stub for mypy to read
    _native = importlib.import_module(__package__ + "._fastpath")
except ImportError:  # not built (a source checkout without a compiler)
    _native = None

DONE, DONE_EVENTS, NOT_HERE, FAILED, LAST_CODE = 0, 1, 2, 3, 15
"""Answers of ``write`` and ``write_imm``; a larger answer is a token to await."""
TAKE_NOT_HERE, TAKE_BUSY = -1, -2
"""Answers of ``take`` besides the transport's bits: no fast path; the loop has
callbacks ready (so a wait must not spin)."""


def enabled() -> bool:
    """Whether engines opened now use the native fast path where they can."""
    return _native is not None and os.environ.get("ASYNCFABRIC_FASTPATH", "1") != "0"


class NoFastPath:
    """The stand-in: every answer is 'take the Python path'; tokens from a counter."""

    on = 0
    status = 0
    act = 0
    posts = 0
    ends = 0

    def __init__(self) -> None:
        self.next_token = itertools.count(LAST_CODE + 1).__next__

    def write(self, src: Any, dst: Any, imm: Any) -> int:
        return NOT_HERE

    def write_wait(self, src: Any, dst: Any, imm: Any, ops: dict[int, Any], left: list[int]) -> Any:
        return NOT_HERE

    def write_imm(self, dst: Any, imm: Any) -> int:
        return NOT_HERE

    def take(self, imm: int, want: int, ns: int) -> int:
        return TAKE_NOT_HERE

    def complete(self, ops: dict[int, Any], left: list[int]) -> int:
        return 0


def waiters(loop: Any) -> Any:
    """The native waiters of ``loop`` (``_waiter.c``), or None: ``Engine.write``'s
    waiters then come from the loop adapter. ``ASYNCFABRIC_NATIVE_WAITERS=0``
    turns them off (``tests/test_waiter.py`` writes both ways)."""
    if loop is None or _native is None or not hasattr(_native, "Waiters"):
        return None
    if os.environ.get("ASYNCFABRIC_NATIVE_WAITERS", "1") == "0":
        return None
    return _native.Waiters(loop)


def make(
    engine: Any,
    uid: bytes,
    transport: Transport,
    ready: Any,
    slice_t: type,
    rslice_t: type,
    region_t: type,
    desc_t: type,
    route_t: type,
) -> Any:
    """The fast path of ``engine`` over ``transport``, or the stand-in."""
    ops = transport.native_ops() if enabled() else None
    if ops is None or not ops.open:
        return NoFastPath()
    return _native.FastPath(
        engine, uid, ops.table, ops.ctx, ops.gate, ops, ready,
        slice_t, rslice_t, region_t, desc_t, route_t, Remote,
    )  # fmt: skip
