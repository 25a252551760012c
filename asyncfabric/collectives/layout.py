"""Where every byte of an all-reduce goes, and which immediate says it landed.

Both sides compute the same layout from the header's agreed sizes, so no
offsets travel. Immediates live in the collectives' nibble (0x5):

    bits 28..31  0x5          bits 20..27  instance slot (per view and engine)
    bits 18..19  phase        bits 13..17  sending rank    bits 0..12  index

phase 0: header (index = call parity; a one-shot call's data rides in the same
write), 1: reduce-scatter piece, 2: all-gather piece. Each (phase, sender, index) is its own
counter, so a receiver reduces in a fixed rank order whatever order writes land in.
"""

from __future__ import annotations

from dataclasses import dataclass

NIBBLE = 0x5
HDR, RS, AG = 0, 1, 2
MAX_RANKS = 32
MAX_INDEX = 1 << 13
MAX_SLOT = 255
HDR_BYTES = 64


def imm(slot: int, phase: int, src: int, index: int) -> int:
    return (NIBBLE << 28) | (slot << 20) | (phase << 18) | (src << 13) | index


def align8(n: int) -> int:
    return (n + 7) & ~7


def wire_bytes(numel: int, itemsize: int, quant: bool, block: int) -> int:
    """Bytes on the wire for ``numel`` values: raw, or int8 values then bf16 scales."""
    if not quant:
        return numel * itemsize
    return align8(numel) + 2 * ((numel + block - 1) // block)


@dataclass(frozen=True)
class Span:
    """``numel`` values from ``start`` (elements, relative to the round)."""

    start: int
    numel: int


def chunks(m: int, size: int, block: int) -> list[Span]:
    """A round of ``m`` values cut into one chunk per rank, block-aligned (some may be empty)."""
    c = -(-m // size)
    c = -(-c // block) * block
    out = []
    for k in range(size):
        a = min(m, k * c)
        out.append(Span(a, min(m, a + c) - a))
    return out


def pieces(span: Span, piece: int) -> list[Span]:
    """A chunk cut into pipeline pieces of at most ``piece`` values."""
    return [Span(span.start + a, min(piece, span.numel - a)) for a in range(0, span.numel, piece)]
