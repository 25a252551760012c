"""The weight system's immediates: the 0x3 nibble of the 32-bit imm space.

``0x3`` (bits 28..31) | instance slot (bits 20..27) | kind and payload (bits 0..19):

* data: bit 19 clear, bits 0..18 the update version modulo 2**19. Every write of
  update ``v`` to a receiver carries it; the receiver's counter for it expects
  the plan's count.
* ack: bit 19 set, bits 12..18 the receiver's index (0..127), bits 0..11 the
  version it now serves modulo 4095, or 4095 (``FRESH``) for a receiver that
  has not been updated yet. A receiver sends it to every trainer rank when its
  spare buffer is free to be written.
"""

from __future__ import annotations

NIBBLE = 0x3 << 28
FRESH = 0xFFF
MAX_RECEIVERS = 128
MAX_SLOT = 255


def check_slot(slot: int) -> int:
    if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot <= MAX_SLOT:
        raise ValueError(
            f"slot must be an int in 0..{MAX_SLOT} (one per weight-update instance on an "
            f"engine), got {slot!r}"
        )
    return slot


def data(slot: int, version: int) -> int:
    return NIBBLE | (slot << 20) | (version & 0x7FFFF)


def ack(slot: int, index: int, version: int | None) -> int:
    v = FRESH if version is None else version % FRESH
    return NIBBLE | (slot << 20) | (1 << 19) | (index << 12) | v
