"""What the two sides of an update need to know of each other (moved through the group)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncfabric as af

from .layout import Layout


@dataclass(frozen=True)
class ReceiverInfo:
    """One inference rank, as trainers see it.

    ``index``: unique among the receivers of one weight-update instance (0..127;
    it names the receiver in its acknowledgements). ``buffers``: its two
    buffers' descriptors (version ``v`` lands in the one it is not serving)."""

    name: str
    index: int
    rank: int
    layout: Layout
    buffers: tuple[af.Descriptor, af.Descriptor]


@dataclass(frozen=True)
class SenderInfo:
    """One trainer rank, as receivers see it: where to send acknowledgements."""

    name: str
    rank: int
    ack: af.Descriptor
