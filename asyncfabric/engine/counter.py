"""ImmCounter: await a number of immediates with one value."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from .._errors import ImmTimeout
from .._flag import Flag, check_u32
from ..transport.contract import EVENTS_READY, NOT_POLLED, TAKEN
from .fastpath import TAKE_BUSY, TAKE_NOT_HERE
from .trigger import Release

if TYPE_CHECKING:
    from .engine import Engine


class ImmCounter:
    """Counts arriving immediates that carry one 32-bit value.

    Arrivals are counted by the transport whether or not anyone waits, so none
    are lost; ``await wait(n)`` resolves once ``n`` have arrived and consumes
    them, leaving any surplus for the next wait. Waiters are served first come,
    first served. A cancelled or timed-out wait consumes nothing.
    """

    __slots__ = ("_engine", "imm", "_waiters", "_release")

    def __init__(self, engine: Engine, imm: int) -> None:
        self._engine = engine
        self.imm = imm
        self._waiters: deque[tuple[int, Any]] = deque()
        self._release: Release | None = None

    def release_word(self, n: int, flag: Flag, value: int, *, repeat: bool = False) -> Release:
        """Once ``n`` immediates have arrived, take them and store ``value`` into
        ``flag``'s word (a release store), in the transport, with no Python in the
        path: a CUDA stream waiting on the word (``cuda_memops.stream_wait``) then
        proceeds with the data in place. Arrivals already counted count. ``repeat``:
        again for every further ``n``. While it is armed the counter's arrivals are
        its own: ``wait()`` refuses. Returns a :class:`Release` (``fired``,
        ``disarm()``). docs/gpu.md, "Triggers"."""
        eng = self._engine
        eng._check_open()
        if not isinstance(flag, Flag):
            raise TypeError(
                f"flag must be an asyncfabric Flag (af.Flag(), or cuda_memops.cuda_flag() for a "
                f"CUDA stream), got {type(flag).__name__}"
            )
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < 1 << 63:
            raise ValueError(f"n must be an int >= 1 (arrivals per store), got {n!r}")
        value = check_u32(value, "value")
        if not isinstance(repeat, bool):
            raise TypeError(f"repeat must be a bool, got {type(repeat).__name__}")
        if self._release is not None and not self._release.done():
            raise RuntimeError(
                f"counter imm={self.imm} has a release word armed already; disarm it first"
            )
        if any(not w.done() for _, w in self._waiters):
            raise RuntimeError(
                f"counter imm={self.imm} has waiters; a release word takes the counter's "
                "arrivals, so arm it when nobody waits on this counter"
            )
        rid = eng._t.release_arm(self.imm, n, flag.ptr, value, repeat)
        rel = self._release = Release(self, rid, flag, n, value, repeat)
        eng._after_call()
        return rel

    def _release_over(self, rel: Release) -> None:
        if self._release is rel:
            self._release = None

    @property
    def count(self) -> int:
        """Immediates arrived and not yet consumed by a wait."""
        self._engine._check_open()
        return self._engine._t.counter_avail(self.imm)

    async def wait(self, expected: int = 1, *, timeout: float | None = None) -> None:
        """Wait until ``expected`` immediates have arrived, then consume them."""
        if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
            raise ValueError(f"expected must be an int >= 0, got {expected!r}")
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout!r}")
        eng = self._engine
        eng._check_open()
        if expected == 0:
            return
        if self._release is not None and not self._release.done():
            raise RuntimeError(
                f"counter imm={self.imm} has a release word armed: its arrivals go to the "
                "flag; disarm it (release.disarm()) before waiting from Python"
            )
        spun = False
        spin = eng._wait_spin_ns
        if spin and not self._waiters:
            # Fast path: nobody queued ahead and nothing else to run, so poll for the
            # arrivals from this thread and take them without a future or an event
            # (in one native call where the engine has its fast path).
            if timeout is not None:
                spin = min(spin, int(timeout * 1e9))
            r = eng._fp.take(self.imm, expected, spin)
            if r == TAKE_NOT_HERE:
                r = (
                    TAKE_BUSY
                    if eng._loop.has_ready()
                    else eng._t.counter_take_spin(self.imm, expected, spin)
                )
            if r >= 0:
                if r & EVENTS_READY:
                    eng._drain()
                if r & TAKEN:
                    return
                # A spin cut short by other events did not have its time; one that
                # polled nothing never started: both spin the usual way.
                spun = not r & (EVENTS_READY | NOT_POLLED)
        w = eng._loop.new_waiter()
        self._waiters.append((expected, w))
        if len(self._waiters) == 1:
            self._serve()
        eng._after_call()
        if not w.done():
            if spun:
                eng._t.release()  # this wait has had its spin: the progress thread takes over
            else:
                eng._spin_for(w)
        try:
            await eng._loop.wait(w, timeout)
        except TimeoutError:
            self._abandon(expected, w)
            got = eng._t.counter_avail(self.imm) if not eng._closed else 0
            raise ImmTimeout(
                f"counter imm={self.imm}: {got} of {expected} expected immediates arrived "
                f"within {timeout} s (is the sender alive, and does it use this imm?)"
            ) from None
        except BaseException:
            self._abandon(expected, w)
            raise

    def _abandon(self, expected: int, w: Any) -> None:
        if self._engine._closed:
            return
        if w.done() and not w.cancelled() and w.exception() is None:
            # Satisfied, but the caller will never see it: put the count back.
            self._engine._t.counter_give(self.imm, expected)
            self._engine._after_call()
            return
        head = bool(self._waiters) and self._waiters[0][1] is w
        try:
            self._waiters.remove((expected, w))
        except ValueError:
            return
        if head:
            self._engine._t.counter_disarm(self.imm)
            self._serve()
            self._engine._after_call()

    def _serve(self) -> None:
        """Hand arrived immediates to waiters from the head; arm for the first unsatisfied."""
        ws, t = self._waiters, self._engine._t
        while ws:
            n, w = ws[0]
            if w.done():
                ws.popleft()
                continue
            if not t.counter_arm(self.imm, n):
                return
            ws.popleft()
            w.set_result(None)

    def _fail_all(self, exc: BaseException) -> None:
        while self._waiters:
            _, w = self._waiters.popleft()
            if not w.done():
                w.set_exception(exc)

    def __repr__(self) -> str:
        return f"<ImmCounter imm={self.imm} waiters={len(self._waiters)}>"
