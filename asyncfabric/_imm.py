"""How many immediates a transfer delivers: the rule both sides compute.

* ``write`` of ``n`` bytes into a region whose descriptor says ``chunk_bytes``:
  ``max(1, ceil(n / chunk_bytes))`` immediates, one per chunk (a zero-byte write
  delivers one). Chunks are striped round-robin over the domains both engines
  have, so the count does not depend on how many NICs either side has.
* ``write_paged`` of ``p`` pages: ``p`` immediates, one per page.
"""

from __future__ import annotations


def expected_imms(
    nbytes: int = 0, *, chunk_bytes: int | None = None, pages: int | None = None
) -> int:
    """Immediates a receiver must count for one write (``nbytes``) or one paged write (``pages``)."""
    if pages is not None:
        if pages < 0:
            raise ValueError(f"pages must be >= 0, got {pages}")
        return pages
    if chunk_bytes is None or chunk_bytes <= 0:
        raise ValueError("chunk_bytes (from the target's descriptor) must be a positive int")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    return max(1, -(-nbytes // chunk_bytes))


def check_imm(imm: object) -> int:
    """Validate a 32-bit immediate; returns it as int."""
    if isinstance(imm, bool) or not isinstance(imm, int):
        raise TypeError(f"imm must be an int in [0, 2**32), got {type(imm).__name__}")
    if not 0 <= imm < 1 << 32:
        raise ValueError(
            f"imm={imm} does not fit in 32 bits: EFA and verbs carry 4 bytes of immediate data, "
            "so use a value in [0, 2**32)"
        )
    return imm
