"""The transport contract: what a backend implements, and the semantics written once.

Nothing in this package imports the engine. A backend needs only this package
(and ``asyncfabric._errors``) to plug in.
"""

from __future__ import annotations

from .contract import (
    EVENTS_READY,
    NOT_POLLED,
    TAKEN,
    Backend,
    NativeOps,
    PagedWrite,
    PolicyNs,
    Registration,
    Remote,
    Target,
    Transport,
    Wrapper,
    WriteBatch,
)
from .counters import CounterTable
from .counting import NO_IMM, check_imm, expected_imms, piece_bytes, plan_chunks
from .events import CounterReady, Event, EventQueue, Fatal, Message, OpDone
from .forwarding import ForwardingTransport
from .pytransport import PythonTransport
from .status import status_error

__all__ = [
    "EVENTS_READY",
    "NOT_POLLED",
    "NO_IMM",
    "TAKEN",
    "Backend",
    "CounterReady",
    "CounterTable",
    "Event",
    "EventQueue",
    "Fatal",
    "ForwardingTransport",
    "Message",
    "NativeOps",
    "OpDone",
    "PagedWrite",
    "PolicyNs",
    "PythonTransport",
    "Registration",
    "Remote",
    "Target",
    "Transport",
    "Wrapper",
    "WriteBatch",
    "check_imm",
    "expected_imms",
    "piece_bytes",
    "plan_chunks",
    "status_error",
]
