"""The decode side's block pool: free blocks, reference counts and the prefix cache.

A full block of a finished request keeps its content and its hash (a chain of
the prompt's token ids up to that block). A later request whose prompt starts
the same way gets those blocks again instead of new ones, and the prefill side
skips writing them. Blocks nobody references are reused, free ones first, then
the least recently used cached ones.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

import numpy as np

from .errors import OutOfBlocks


class BlockPool:
    def __init__(self, blocks: int) -> None:
        self.size = blocks
        self._free: deque[int] = deque(range(blocks))
        self._ref = np.zeros(blocks, np.int32)
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced, LRU first

    @property
    def free(self) -> int:
        """Blocks a request can get now (free or cached and unreferenced)."""
        return len(self._free) + len(self._idle)

    @property
    def in_use(self) -> int:
        return int(np.count_nonzero(self._ref))

    def acquire(self, n: int, prefix: Sequence[bytes] = ()) -> tuple[np.ndarray, int]:
        """``n`` blocks for a request, the first ones from the prefix cache where
        ``prefix`` (hashes of its leading full blocks) hits. Returns (blocks, hits):
        the first ``hits`` blocks already hold the request's KV."""
        hits: list[int] = []
        for h in prefix[:n]:
            b = self._by_hash.get(h)
            if b is None:
                break
            hits.append(b)
        need = n - len(hits)
        spare = len(self._free) + sum(1 for b in self._idle if b not in hits)
        if need > spare:
            raise OutOfBlocks(need, spare)
        for b in hits:
            self._ref[b] += 1
            self._idle.pop(b, None)
        fresh: list[int] = []
        while len(fresh) < need:
            if self._free:
                fresh.append(self._free.popleft())
                continue
            b, _ = self._idle.popitem(last=False)  # evict the least recently used
            del self._by_hash[self._hash_of.pop(b)]
            fresh.append(b)
        for b in fresh:
            self._ref[b] += 1
        return np.array(hits + fresh, np.int64), len(hits)

    def publish(self, blocks: Sequence[int], hashes: Sequence[bytes]) -> None:
        """Make the first ``len(hashes)`` of ``blocks`` (full, their KV landed) findable."""
        for b, h in zip(blocks, hashes):
            b = int(b)
            if h in self._by_hash or b in self._hash_of:
                continue
            self._by_hash[h] = b
            self._hash_of[b] = h

    def release(self, blocks: Sequence[int], *, keep: bool = True) -> None:
        """Drop one reference to each block; ``keep=False`` forgets cached content
        (an aborted request's blocks may be half written)."""
        for b in blocks:
            b = int(b)
            if self._ref[b] <= 0:
                raise RuntimeError(f"block {b} released more often than acquired")
            self._ref[b] -= 1
            if self._ref[b]:
                continue
            if keep and b in self._hash_of:
                self._idle[b] = None
            else:
                h = self._hash_of.pop(b, None)
                if h is not None:
                    del self._by_hash[h]
                self._free.append(b)
