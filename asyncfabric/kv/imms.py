"""Immediates of the KV system: the 0x2 nibble, an instance slot, a request tag.

``imm = 0x2 << 28 | slot << 20 | tag``: ``slot`` (0-255) separates KV
instances on one engine, ``tag`` (20 bits) names one request in flight. A tag
goes back into the pool only once its counter is drained (nothing of an aborted
request can still add to it), and the pool hands tags out first in, first out,
so a tag is reused as late as possible.
"""

from __future__ import annotations

from collections import deque

from .errors import KVError

NIBBLE = 0x2
TAG_BITS = 20
MAX_SLOT = 0xFF
# The tag reserved for liveness probes of a slot (a zero-byte write that nobody awaits).
PROBE_TAG = (1 << TAG_BITS) - 1


def imm_of(slot: int, tag: int) -> int:
    return (NIBBLE << 28) | (slot << TAG_BITS) | tag


def check_slot(slot: object) -> int:
    if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot <= MAX_SLOT:
        raise ValueError(
            f"slot must be an int from 0 to {MAX_SLOT} (bits 20-27 of the KV immediates), "
            f"got {slot!r}; give each KV instance on one engine its own slot"
        )
    return slot


class TagPool:
    """Request tags of one slot: each in use by at most one request at a time."""

    def __init__(self, slot: int, size: int = PROBE_TAG) -> None:
        self.slot = check_slot(slot)
        self._free: deque[int] = deque(range(size))

    def take(self) -> int:
        if not self._free:
            raise KVError(
                f"all {PROBE_TAG} request tags of KV slot {self.slot} are in use; finish or "
                "abort requests before starting more"
            )
        return self._free.popleft()

    def give(self, tag: int) -> None:
        self._free.append(tag)

    @property
    def free(self) -> int:
        return len(self._free)
