"""The small async interface every store offers: leases, put/get, prefix list, watch, CAS.

Groups use nothing else, so a new store is one class. Revisions are the store's
global, increasing modification counter (etcd's revision); a watch started at
revision ``r`` delivers every change from ``r`` on, in order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as stored: ``create``/``mod`` are the revisions that created and last changed it."""

    key: str
    value: bytes
    create: int
    mod: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A change under a watched prefix; ``kind`` is ``"put"`` or ``"delete"``."""

    kind: Literal["put", "delete"]
    key: str
    value: bytes
    revision: int
    create: int = 0


_KVs = list[KeyValue]  # named here: the method ``list`` shadows the builtin in the class
_Events = list[WatchEvent]


class Store(ABC):
    """A connection to a key-value store with leases and watches."""

    url: str

    @abstractmethod
    async def grant(self, ttl: float) -> int:
        """A new lease of ``ttl`` seconds; keys put under it go when it expires."""

    @abstractmethod
    async def keepalive(self, lease: int) -> None:
        """Renew ``lease`` for its TTL; raises LeaseNotFound if it is gone."""

    @abstractmethod
    async def revoke(self, lease: int) -> None:
        """End ``lease`` now, deleting its keys (no error if it is already gone)."""

    @abstractmethod
    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Set ``key``; returns the new revision."""

    @abstractmethod
    async def get(self, key: str) -> KeyValue | None:
        """The key, or None."""

    @abstractmethod
    async def list(self, prefix: str) -> tuple[_KVs, int]:
        """Every key under ``prefix`` (sorted) and the store revision they were read at."""

    @abstractmethod
    async def delete(self, key: str) -> bool:
        """Delete ``key``; True if it existed."""

    @abstractmethod
    async def cas(self, key: str, value: bytes, *, expect_mod: int, lease: int = 0) -> bool:
        """Put ``key`` only if its mod revision is ``expect_mod`` (0: only if absent)."""

    @abstractmethod
    def watch(self, prefix: str, start: int) -> AsyncIterator[_Events]:
        """Batches of changes under ``prefix`` from revision ``start`` on, in order.

        Raises StoreUnavailable when the connection is lost (re-list and watch again
        after :meth:`reconnect`)."""

    @abstractmethod
    async def reconnect(self) -> None:
        """Reconnect after the store went away; raises StoreUnavailable if it still is."""

    @abstractmethod
    async def aclose(self) -> None:
        """Close the connection (the store's data stays)."""

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
