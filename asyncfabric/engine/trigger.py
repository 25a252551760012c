"""Triggers and release words: transfers and signals with no Python on their path.

* :class:`Trigger`: a write or a batch armed against a :class:`~asyncfabric.Flag`
  (``Engine.arm``, ``Engine.arm_write``). The transport's watcher posts it the moment
  the flag's word reaches the armed value, whoever wrote it (a CUDA stream, another
  thread, another process); its end comes back as the batch's usual event.
* :class:`Release`: a counter's release word (``ImmCounter.release_word``). When the
  counter has counted ``n`` arrivals, the transport takes them and stores ``value``
  into the flag, so a CUDA stream waiting on the word proceeds without the host.

docs/gpu.md, "Triggers", has the model and the memory ordering.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._errors import EngineClosed, ImmTimeout, TriggerDisarmed
from .._flag import Flag

if TYPE_CHECKING:
    from collections.abc import Callable, Generator

    from ..transport.contract import WriteBatch
    from .counter import ImmCounter
    from .engine import Engine
    from .region import Region


class _TrigHold:
    """A trigger's state in the engine's op table (under its token): what it holds
    alive, the fires that ended, the waiters for a number of them, and whether it is
    armed (``final_due``: disarmed with a fire in flight, whose event is still due)."""

    __slots__ = ("wb", "regions", "flag", "repeat", "done", "error", "armed", "final_due",
                 "waiters", "stream_work")  # fmt: skip

    def __init__(
        self, wb: WriteBatch, regions: tuple[Region, ...], flag: Flag, repeat: bool
    ) -> None:
        self.wb, self.regions, self.flag, self.repeat = wb, regions, flag, repeat
        self.done = 0
        self.error: BaseException | None = None
        self.armed = True
        self.final_due = False
        self.waiters: list[tuple[int, Any]] = []
        self.stream_work: Callable[[int, int], None] | None = None  # the transport's, if any

    @property
    def over(self) -> bool:
        """Nothing more will happen: not armed and no event due."""
        return not self.armed and not self.final_due

    def serve(self) -> None:
        keep = []
        for k, w in self.waiters:
            if w.done():
                continue
            if self.error is not None:
                w.set_exception(self.error)
            elif self.done >= k:
                w.set_result(None)
            elif self.over:
                w.set_exception(self.disarmed(k))
            else:
                keep.append((k, w))
        self.waiters = keep

    def disarmed(self, k: int) -> TriggerDisarmed:
        if not self.repeat:
            return TriggerDisarmed("the trigger was disarmed before it fired; nothing was posted")
        return TriggerDisarmed(f"the trigger was disarmed after {self.done} fires, before {k}")

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.serve()


class Trigger:
    """A write or batch armed against a flag (``Engine.arm``): posted by the transport's
    watcher when the flag's word reaches ``value`` (cyclic >=, as a CUDA stream's
    ``cuStreamWaitValue32`` GEQ compares).

    One-shot (the default): ``await trigger`` (or ``await trigger.wait(timeout=...)``)
    returns when the fired transfer is done (the source may be reused), and raises as
    ``write_many`` would (:class:`BatchError`; one write as ``write`` would), with
    :class:`EngineClosed` when the engine closes first, :class:`TriggerDisarmed` after
    :meth:`disarm`. ``repeat=True``: stays armed, one fire in flight at a time;
    ``await trigger.wait(k)`` returns once ``k`` fires have ended, ``fires`` counts
    them; the first failure stops it.
    """

    __slots__ = ("_engine", "token", "flag", "value", "repeat", "_h")

    def __init__(self, engine: Engine, token: int, value: int, hold: _TrigHold) -> None:
        self._engine, self.token, self.value, self._h = engine, token, value, hold
        self.flag = hold.flag
        self.repeat = hold.repeat

    @property
    def stream_work(self) -> Callable[[int, int], None] | None:
        """What a CUDA stream must queue to fire it, or None: on cuda_ipc, the copies
        of the batch's GPU entries and the write of the private word their
        immediates are armed on (called with the stream handle and the value).
        ``cuda_memops.stream_fire(trigger)`` queues it, then writes the flag."""
        return self._h.stream_work

    @property
    def fires(self) -> int:
        """Fires that ended well so far (one-shot: 0 or 1)."""
        return self._h.done

    def done(self) -> bool:
        """One-shot: it fired and ended, failed, or was disarmed. Repeating: it failed,
        or was disarmed and nothing of it is in flight."""
        h = self._h
        return h.error is not None or h.over or (not h.repeat and h.done > 0)

    def disarm(self) -> bool:
        """Stop it. One-shot: True when it was disarmed before it fired (nothing was
        posted; awaiting it raises :class:`TriggerDisarmed`), False when it had fired
        already (awaiting it gives the transfer's end). Repeating: True while it was
        armed; a fire in flight still ends and is counted."""
        return self._engine._disarm(self.token, self._h)

    async def wait(self, fires: int = 1, *, timeout: float | None = None) -> None:
        """Until the fired transfer is done (one-shot), or ``fires`` fires have ended
        (repeating)."""
        if isinstance(fires, bool) or not isinstance(fires, int) or fires < 1:
            raise ValueError(f"fires must be an int >= 1, got {fires!r}")
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout!r}")
        h, eng = self._h, self._engine
        if h.error is not None:
            raise h.error
        if h.done >= fires:
            return
        if h.over:
            raise h.disarmed(fires)
        if eng._closed:
            raise EngineClosed("the engine was closed while this was pending")
        w = eng._loop.new_waiter()
        h.waiters.append((fires, w))
        try:
            await eng._loop.wait(w, timeout)
        except TimeoutError:
            raise ImmTimeout(
                f"trigger not done within {timeout} s (its flag holds {self.flag.value}, armed "
                f"for {self.value}; {h.done} fires ended); it stays armed"
            ) from None
        finally:
            h.waiters = [x for x in h.waiters if x[1] is not w]

    def __await__(self) -> Generator[Any, None, None]:
        return self.wait().__await__()

    def __repr__(self) -> str:
        kind = "repeating " if self.repeat else ""
        state = "done" if self.done() else "armed"
        return f"<{kind}Trigger value={self.value} fires={self.fires} {state}>"


class Release:
    """A counter's release word (``ImmCounter.release_word``): once ``n`` arrivals are
    counted, the transport takes them and stores ``value`` into ``flag`` (a release
    store); ``repeat``: again for every further ``n``. The host is not in that path:
    poll ``fired`` or the flag, or let a CUDA stream wait on the word."""

    __slots__ = ("_counter", "rid", "flag", "n", "value", "repeat", "_fired", "_armed")

    def __init__(
        self, counter: ImmCounter, rid: int, flag: Flag, n: int, value: int, repeat: bool
    ) -> None:
        self._counter, self.rid, self.flag = counter, rid, flag
        self.n, self.value, self.repeat = n, value, repeat
        self._fired = 0
        self._armed = True

    @property
    def fired(self) -> int:
        """Stores made so far."""
        if self._armed and not self._counter._engine._closed:
            v = self._counter._engine._t.release_fired(self.rid)
            if v >= 0:
                self._fired = v
            else:  # not armed natively: a one-shot word that stored (it goes as it stores)
                self._fired = max(self._fired, 0 if self.repeat else 1)
                self._armed = False
                self._counter._release_over(self)
        return self._fired

    def done(self) -> bool:
        """One-shot: it stored. Repeating: it was disarmed (or its engine closed)."""
        n = self.fired
        return not self._armed or self._counter._engine._closed or (not self.repeat and n > 0)

    def disarm(self) -> int:
        """Stop it; returns the stores it made. Arrivals it did not take stay counted."""
        eng = self._counter._engine
        if self._armed and not eng._closed:
            v = eng._t.release_disarm(self.rid)
            if v >= 0:
                self._fired = v
        self._armed = False
        self._counter._release_over(self)
        return self._fired

    def __repr__(self) -> str:
        return (
            f"<Release imm={self._counter.imm} n={self.n} value={self.value} "
            f"fired={self._fired}{' repeating' if self.repeat else ''}>"
        )
