"""PythonTransport: what every transport written in Python needs, written once.

A counter table, an event queue and a notify eventfd behind one lock, with the
contract's counter, event and progress methods on top. A backend subclasses it
and writes only what is its own: addresses, peers, registration and posting.
Its progress (threads, a poll inside ``spin``) reports through
:meth:`arrive`, :meth:`op_done` and :meth:`message`, which may be called from
any thread.
"""

from __future__ import annotations

import contextlib
import os
import threading

from .contract import Transport
from .counters import CounterTable
from .events import Event, EventQueue


class PythonTransport(Transport):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events = EventQueue()
        self.counters = CounterTable()
        self._notify = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._notify_open = True

    # ------------------------------------------------------------ reporting (any thread)

    def ring(self) -> None:
        """Wake the engine's event loop (call with the lock held, after queueing)."""
        if self._notify_open:
            os.eventfd_write(self._notify, 1)

    def arrive(self, imm: int, n: int = 1) -> None:
        """Count ``n`` arrivals of ``imm`` (the lock must be held)."""
        if self.counters.arrive(imm, n):
            self.events.counter_ready(imm)
            self.ring()

    def op_done(self, token: int, status: int = 0, error: Exception | None = None) -> None:
        """Transfer ``token`` ended (the lock must be held)."""
        self.events.op_done(token, status, False, error)
        self.ring()

    def message(self, data: bytes) -> None:
        """A control message arrived (the lock must be held)."""
        self.events.message(data)
        self.ring()

    def close_notify(self) -> None:
        """Close the notify fd (from ``close``; nothing rings afterwards)."""
        with self.lock:
            if self._notify_open:
                self._notify_open = False
                os.close(self._notify)

    # ------------------------------------------------------------ the contract

    @property
    def notify_fd(self) -> int:
        return self._notify

    def counter_arm(self, imm: int, want: int) -> bool:
        with self.lock:
            return self.counters.arm(imm, want)

    def counter_give(self, imm: int, n: int) -> None:
        with self.lock:
            self.arrive(imm, n)

    def counter_disarm(self, imm: int) -> None:
        with self.lock:
            self.counters.disarm(imm)

    def counter_avail(self, imm: int) -> int:
        with self.lock:
            return self.counters.avail(imm)

    def counters_live(self) -> int:
        with self.lock:
            return self.counters.live()

    def pending_events(self) -> int:
        return len(self.events)

    def drain(self) -> list[Event]:
        with self.lock:
            if self._notify_open:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._notify)
            return self.events.take()

    def spin(self, ns: int) -> bool:
        """Progress runs elsewhere (threads): report whether events are ready."""
        return len(self.events) > 0
