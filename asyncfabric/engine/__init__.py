"""The engine: engines, regions, descriptors, counters, and the event-loop glue.

It talks to transports only through ``asyncfabric.transport``; it imports no
backend and knows nothing of GPU memory (tests/unit/test_layering.py keeps it so).
"""

from __future__ import annotations

from .address import EngineAddress
from .batch import Batch
from .counter import ImmCounter
from .descriptor import Descriptor, RemoteSlice
from .engine import Engine, Peer
from .policy import ProgressPolicy
from .region import Region, RegionSlice
from .sync import run
from .trigger import Release, Trigger

__all__ = [
    "Batch",
    "Descriptor",
    "Engine",
    "EngineAddress",
    "ImmCounter",
    "Peer",
    "ProgressPolicy",
    "Region",
    "RegionSlice",
    "Release",
    "RemoteSlice",
    "Trigger",
    "run",
]
