"""The immediate-counter table, for transports written in Python.

The native core keeps its own table in C (counters.c); tests/unit/test_counters_agree.py
drives both with the same sequence and checks they agree.

Per immediate value: ``avail`` (arrived, not yet taken) and ``want`` (the
threshold a waiter armed, 0 when nobody waits). Arrivals are counted whether
or not anyone waits, so none are lost. An arrival (or a give) that makes
``avail >= want`` disarms the counter and reports it once (the caller queues a
:class:`~asyncfabric.transport.events.CounterReady`). Entries with nothing
available and nobody waiting are dropped, so live counters cost memory only
while they are live.
"""

from __future__ import annotations


class CounterTable:
    __slots__ = ("_t",)

    def __init__(self) -> None:
        self._t: dict[int, list[int]] = {}  # imm -> [avail, want]

    def arrive(self, imm: int, n: int = 1) -> bool:
        """Count ``n`` arrivals of ``imm``; True when an armed counter just became ready."""
        c = self._t.get(imm)
        if c is None:
            self._t[imm] = [n, 0]
            return False
        c[0] += n
        if c[1] and c[0] >= c[1]:
            c[1] = 0
            return True
        return False

    give = arrive  # a count handed back by a waiter that will not use it counts as arrivals

    def arm(self, imm: int, want: int) -> bool:
        """Take ``want`` now (True), or arm the counter to be reported at ``want`` (False)."""
        c = self._t.get(imm)
        if c is None:
            c = self._t[imm] = [0, 0]
        if c[0] >= want:
            c[0] -= want
            c[1] = 0
            if not c[0]:
                del self._t[imm]
            return True
        c[1] = want
        return False

    def take(self, imm: int, want: int) -> bool:
        """Take ``want`` now if they are there, arming nothing."""
        c = self._t.get(imm)
        if c is None or c[0] < want:
            return False
        c[0] -= want
        if not c[0] and not c[1]:
            del self._t[imm]
        return True

    def disarm(self, imm: int) -> None:
        c = self._t.get(imm)
        if c is not None:
            c[1] = 0
            if not c[0]:
                del self._t[imm]

    def avail(self, imm: int) -> int:
        c = self._t.get(imm)
        return c[0] if c else 0

    def live(self) -> int:
        return len(self._t)
