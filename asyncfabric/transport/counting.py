"""The counting rule, and the chunk and stripe plan it comes from: written once, here.

No ordering is promised by any transport, so a receiver knows a transfer has
landed by counting its immediates. Both sides compute how many to expect:

* a ``write`` of ``n`` bytes into a region whose descriptor says ``chunk_bytes``
  delivers ``max(1, ceil(n / chunk_bytes))`` immediates, one per chunk (a
  zero-byte write delivers one);
* chunk ``i`` goes over domain ``i mod d``, ``d = min(local domains, peer
  domains)``: striping never changes the count;
* a ``write_paged`` of ``p`` pages delivers ``p``, one per page.

Transports written in Python plan their chunks with :func:`plan_chunks`; the
native core (libfabric backend) implements the same plan in C, and
tests/unit/test_counting.py checks the two agree.
"""

from __future__ import annotations

from collections.abc import Iterator

NO_IMM = -1
"""The ``imm`` a transport is given for a write that carries no immediate."""


def expected_imms(
    nbytes: int = 0, *, chunk_bytes: int | None = None, pages: int | None = None
) -> int:
    """Immediates a receiver must count for one write (``nbytes``) or one paged write (``pages``)."""
    if pages is not None:
        if isinstance(pages, bool) or not isinstance(pages, int) or pages < 0:
            raise ValueError(f"pages must be an int >= 0, got {pages!r}")
        return pages
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError("chunk_bytes (from the target's descriptor) must be a positive int")
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be an int >= 0, got {nbytes!r}")
    return max(1, -(-nbytes // chunk_bytes))


def plan_chunks(nbytes: int, chunk_bytes: int, ndom: int) -> Iterator[tuple[int, int, int]]:
    """The chunks of one write: ``(offset, length, domain)``, in order.

    A zero-byte write is one chunk of length 0 on domain 0 (it carries one immediate).
    """
    if nbytes == 0:
        yield 0, 0, 0
        return
    off = i = 0
    while off < nbytes:
        n = min(chunk_bytes, nbytes - off)
        yield off, n, i % ndom
        off += n
        i += 1


def piece_bytes(chunk_bytes: int, want: int) -> int:
    """The largest whole number of chunks within ``want`` bytes (at least one chunk).

    A transfer cut into such pieces delivers, piece by piece, counts that add up
    to the whole transfer's count (the staged GPU path pipelines this way).
    """
    return chunk_bytes * max(1, want // chunk_bytes)


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
