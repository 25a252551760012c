"""What a transport reports: the typed events :meth:`Transport.drain` returns.

A transport never calls into the engine. It queues events; the engine drains
them on its event-loop thread and acts on each (resolve a future, serve a
counter's waiters, deliver a message, fail everything after a fatal error).
One event per finished transfer, per satisfied counter arm and per received
message: never one per chunk, page or immediate.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TypeAlias


@dataclass(slots=True)
class OpDone:
    """Transfer ``token`` ended with ``status`` (0, or a negative errno from :mod:`.status`).

    ``held``: it failed early (the peer was lost) but the transport still holds
    pieces of it, so its source memory must stay registered; a second ``OpDone``
    for the same token with ``held=False`` follows when the transport lets go.
    ``error``: the exception to fail it with, when the transport knows better
    than its status says (a failed GPU copy); else ``Transport.error(status)``.
    """

    token: int
    status: int = 0
    held: bool = False
    error: Exception | None = None


@dataclass(slots=True)
class CounterReady:
    """The counter of ``imm`` reached the count it was armed for (see ``counter_arm``)."""

    imm: int


@dataclass(slots=True)
class Message:
    """A control message arrived (two-sided send), whole."""

    data: bytes


@dataclass(slots=True)
class Fatal:
    """The transport broke (a fatal completion-queue error, a failed device copy).

    Every transfer and wait that depends on it fails with ``error``.
    """

    error: Exception


Event: TypeAlias = "OpDone | CounterReady | Message | Fatal"


class EventQueue:
    """The event queue a transport written in Python keeps (the native core has its own)."""

    __slots__ = ("_q",)

    def __init__(self) -> None:
        self._q: deque[Event] = deque()

    def __len__(self) -> int:
        return len(self._q)

    def op_done(
        self, token: int, status: int = 0, held: bool = False, error: Exception | None = None
    ) -> None:
        self._q.append(OpDone(token, status, held, error))

    def counter_ready(self, imm: int) -> None:
        self._q.append(CounterReady(imm))

    def message(self, data: bytes) -> None:
        self._q.append(Message(data))

    def fatal(self, error: Exception) -> None:
        self._q.append(Fatal(error))

    def push(self, ev: Event) -> None:
        self._q.append(ev)

    def take(self) -> list[Event]:
        """Everything queued, oldest first; the queue is empty afterwards."""
        q = self._q
        if not q:
            return []
        out = list(q)
        q.clear()
        return out
