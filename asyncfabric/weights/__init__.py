"""RL weight updates: trainer shards to differently sharded inference ranks.

``plan(trainer_layout, inference_layout)`` computes, once, which bytes of which
trainer rank go to which bytes of which inference rank; a :class:`Sender` per
trainer rank executes its part, pipelined (pack and cast of one bucket overlaps
the writes of the previous one); a :class:`Receiver` per inference rank serves
version ``v`` while ``v + 1`` lands in its other buffer, then flips. See
docs/weights.md.
"""

from __future__ import annotations

from . import fleet, fp8, imms
from .endpoints import ReceiverInfo, SenderInfo
from .errors import LayoutError, ReceiverFailed, UpdateError
from .layout import ALIGN, Layout, Param, Pieces, Replicated, Spec, Split, column, row
from .plan import Move, Plan, plan
from .receiver import Receiver
from .sender import Sender

__all__ = [
    "ALIGN",
    "Layout",
    "LayoutError",
    "Move",
    "Param",
    "Pieces",
    "Plan",
    "ReceiverFailed",
    "ReceiverInfo",
    "Receiver",
    "Replicated",
    "Sender",
    "SenderInfo",
    "Spec",
    "fleet",
    "fp8",
    "imms",
    "Split",
    "UpdateError",
    "column",
    "plan",
    "row",
]
