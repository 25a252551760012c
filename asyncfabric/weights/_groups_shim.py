"""TEMPORARY stand-in for the groups API (issue 13) until it lands on main: the subset
weights uses (``members``, ``publish``, ``lookup``), in one process. Delete it, and use
``af.join`` groups, once groups land."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import asyncfabric as af


@dataclass(frozen=True)
class Member:
    name: str
    address: bytes
    meta: dict[str, Any]
    joined: float


@dataclass
class ShimStore:
    members: dict[str, Member] = field(default_factory=dict)
    published: dict[tuple[str, str], af.Descriptor] = field(default_factory=dict)


class ShimGroup:
    def __init__(self, store: ShimStore, name: str, engine: af.Engine, meta: dict[str, Any]):
        self.store, self.name = store, name
        store.members[name] = Member(name, engine.address, dict(meta), time.monotonic())

    @property
    def members(self) -> dict[str, Member]:
        return dict(self.store.members)

    async def publish(self, key: str, desc: af.Descriptor) -> None:
        self.store.published[(self.name, key)] = desc

    async def lookup(self, name: str, key: str, timeout: float = 5.0) -> af.Descriptor:
        return self.store.published[(name, key)]

    async def leave(self) -> None:
        self.store.members.pop(self.name, None)
        for k in [k for k in self.store.published if k[0] == self.name]:
            del self.store.published[k]
