"""The contract's fallback for batches: every entry posted as its own write.

A transport without a native batch path (see :meth:`.contract.Transport.post_batch`)
posts each entry through ``post_write`` under a *sub-token*: the batch's token
and the entry's index packed with :data:`SUB_BIT` set. Each such write ends in
its own :class:`~.events.OpDone`, which the engine folds back into the batch
(:func:`split_sub`), so a transport needs nothing beyond ``post_write`` for
batches to work. It costs Python per entry; native batches cost it per call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._errors import TransferError

if TYPE_CHECKING:
    from .contract import Transport, WriteBatch

SUB_BIT = 1 << 63
"""Set in every sub-token: the token of one entry of a batch, not of a transfer."""
ENTRY_BITS = 24
MAX_ENTRIES = 1 << ENTRY_BITS
"""The most entries one fallback batch takes (native batches have no such limit)."""


def sub_token(token: int, index: int) -> int:
    """The token entry ``index`` of batch ``token`` is posted under."""
    return SUB_BIT | (token << ENTRY_BITS) | index


def split_sub(token: int) -> tuple[int, int]:
    """``(batch token, entry index)`` of a sub-token."""
    return (token & ~SUB_BIT) >> ENTRY_BITS, token & (MAX_ENTRIES - 1)


def post_batch_each(t: Transport, batch: WriteBatch) -> bool:
    """Post every entry of ``batch`` through ``t.post_write``; see the module doc.

    Sets ``batch.subops`` to the entries whose end is still to come. An entry the
    transport refuses at once gets its status (and its exception in
    ``batch.errors``); the others still go out."""
    n = len(batch.src)
    if n >= MAX_ENTRIES:
        raise ValueError(
            f"a batch of {n} entries is more than this transport's fallback takes "
            f"({MAX_ENTRIES - 1}); split it into several write_many calls"
        )
    if batch.token >= 1 << (63 - ENTRY_BITS):
        raise ValueError("token out of the fallback's range")
    srcs, dsts = batch.srcs, batch.dsts
    src, dst = batch.src.tolist(), batch.dst.tolist()
    soff, doff = batch.soff.tolist(), batch.doff.tolist()
    nbytes, imm = batch.nbytes.tolist(), batch.imm.tolist()
    left = 0
    for i in range(n):
        try:
            done = t.post_write(
                sub_token(batch.token, i), dsts[dst[i]], doff[i], srcs[src[i]], soff[i],
                nbytes[i], imm[i],
            )  # fmt: skip
        except TransferError as exc:
            batch.status[i] = -abs(exc.errno) if exc.errno else -5  # EIO
            batch.errors[i] = exc
            continue
        if not done:
            left += 1
    batch.subops = left
    return left == 0
