"""The decode side's block pool: free blocks, reference counts and the prefix cache.

A full block of a finished request keeps its content and its hash (a chain of
the prompt's token ids up to that block). A later request whose prompt starts
the same way gets those blocks again instead of new ones, and the prefill side
skips writing them. Blocks nobody references are reused, free ones first, then
the least recently used cached ones. Free blocks are handed out lowest number
first, so a request's blocks tend to be adjacent and travel in few writes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from .errors import OutOfBlocks


class BlockPool:
    def __init__(self, blocks: int) -> None:
        self.size = blocks
        self._is_free = np.ones(blocks, bool)
        self._nfree = blocks
        self._ref = np.zeros(blocks, np.int32)
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced, LRU first

    @property
    def free(self) -> int:
        """Blocks a request can get now (free or cached and unreferenced)."""
        return self._nfree + len(self._idle)

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
        spare = self._nfree + sum(1 for b in self._idle if b not in hits)
        if need > spare:
            raise OutOfBlocks(need, spare)
        for b in hits:
            self._ref[b] += 1
            self._idle.pop(b, None)
        fresh = np.flatnonzero(self._is_free)[:need]
        self._is_free[fresh] = False
        self._nfree -= len(fresh)
        more: list[int] = []
        while len(fresh) + len(more) < need:
            b, _ = self._idle.popitem(last=False)  # evict the least recently used
            del self._by_hash[self._hash_of.pop(b)]
            more.append(b)
        out = np.concatenate((np.array(hits, np.int64), fresh.astype(np.int64),
                              np.array(more, np.int64)))  # fmt: skip
        self._ref[out[len(hits) :]] += 1
        return out, len(hits)

    def acquire_exact(self, blocks: np.ndarray) -> None:
        """Take exactly ``blocks`` (the caller chose them); each must be free."""
        if not self._is_free[blocks].all() or len(np.unique(blocks)) != len(blocks):
            raise OutOfBlocks(len(blocks), int(np.count_nonzero(self._is_free[blocks])))
        self._is_free[blocks] = False
        self._nfree -= len(blocks)
        self._ref[blocks] += 1

    def publish(self, blocks: Sequence[int] | np.ndarray, hashes: Sequence[bytes]) -> None:
        """Make the first ``len(hashes)`` of ``blocks`` (full, their KV landed) findable."""
        for b, h in zip(blocks, hashes):
            b = int(b)
            if h in self._by_hash or b in self._hash_of or self._ref[b] <= 0:
                continue  # a free block's content is not kept: it may be written any time
            self._by_hash[h] = b
            self._hash_of[b] = h

    def release(self, blocks: Sequence[int] | np.ndarray, *, keep: bool = True) -> None:
        """Drop one reference to each block; ``keep=False`` forgets cached content
        (an aborted request's blocks may be half written)."""
        bl = np.asarray(blocks, np.int64)
        if not self._hash_of:  # no prefix cache in use: one array operation
            if (self._ref[bl] <= 0).any():
                raise RuntimeError("a block was released more often than acquired")
            np.subtract.at(self._ref, bl, 1)
            done = bl[self._ref[bl] == 0]
            self._is_free[done] = True
            self._nfree = int(np.count_nonzero(self._is_free))
            return
        for b in bl:
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
                self._is_free[b] = True
                self._nfree += 1
