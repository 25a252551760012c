"""Which writes move a request's pages, and how many immediates they deliver.

A page is one block's K or V half of one layer (or both halves, when both sides
keep them adjacent: ``pages_per_block``). Blocks that follow each other on
*both* sides (source block ``s, s+1, ...`` to destination ``d, d+1, ...``) sit
next to each other in memory on both sides, so they travel as one write: a run.
Both sides compute the runs from the same two block lists (the request's
source blocks travel in its ALLOC, the destination blocks in its GRANT), so both
know the count: each run delivers ``ceil(run_bytes / chunk_bytes)`` immediates
(the engine's counting rule for one write), for every layer and half. With no
two blocks adjacent that is one immediate per page.

Entries are added with one array call (``Batch.add_table``: every layer, half and
run at once), so the Python cost of a post grows neither with the number of
blocks nor with the number of layers.
"""

from __future__ import annotations

import numpy as np

import asyncfabric as af

from .cache import PagedCache
from .layout import KVLayout


def _mergeable(lay: KVLayout, ppb: int) -> bool:
    """Whether consecutive blocks' pages are adjacent in ``lay``'s memory."""
    return ppb == 1 or lay.order == "kv_first"


def runs(
    src: KVLayout, dst: KVLayout, ppb: int, src_blocks: np.ndarray, dst_blocks: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(index of each run's first block, blocks in each run)."""
    n = len(src_blocks)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if not (_mergeable(src, ppb) and _mergeable(dst, ppb)):
        return np.arange(n, dtype=np.int64), np.ones(n, np.int64)
    s = np.asarray(src_blocks, np.int64)
    d = np.asarray(dst_blocks, np.int64)
    brk = (np.diff(s) != 1) | (np.diff(d) != 1)
    starts = np.concatenate(([0], np.flatnonzero(brk) + 1)).astype(np.int64)
    lens = np.diff(np.concatenate((starts, [n]))).astype(np.int64)
    return starts, lens


def unit_bytes(lay: KVLayout, ppb: int) -> int:
    return lay.block_bytes if ppb == 1 else lay.half_bytes


def expected_imms(
    src: KVLayout, dst: KVLayout, ppb: int, src_blocks: np.ndarray, dst_blocks: np.ndarray,
    chunk_bytes: int,
) -> int:  # fmt: skip
    """Immediates the whole request delivers (every layer, every half)."""
    _, lens = runs(src, dst, ppb, src_blocks, dst_blocks)
    nb = lens * unit_bytes(src, ppb)
    per_layer = int(np.sum(np.maximum(1, -(-nb // chunk_bytes))))
    return src.layers * ppb_halves(ppb) * per_layer


def ppb_halves(ppb: int) -> int:
    return 1 if ppb == 1 else 2


def add_layers(
    batch: af.Batch,
    src: PagedCache,
    dst: KVLayout,
    dst_descs: list[af.Descriptor],
    layers: range,
    src_blocks: np.ndarray,
    dst_blocks: np.ndarray,
    imm: int,
    ppb: int,
) -> int:
    """Add the writes of ``layers`` to ``batch``; return how many."""
    lay = src.layout
    starts, lens = runs(lay, dst, ppb, src_blocks, dst_blocks)
    if not len(starts) or not len(layers):
        return 0
    # every (layer, half, run) at once, in that order: one call whatever the layer count
    halves, nrun = ppb_halves(ppb), len(starts)
    reps = len(layers) * halves
    lay_col = np.repeat(np.asarray(layers, np.int64), halves * nrun)
    kv_col = np.tile(np.repeat(np.arange(halves, dtype=np.int64), nrun), len(layers))
    sb = np.tile(np.asarray(src_blocks)[starts], reps)
    db = np.tile(np.asarray(dst_blocks)[starts], reps)
    nbytes = np.tile((lens * unit_bytes(lay, ppb)).astype(np.uint64), reps)
    ts, so = lay.where(lay_col, kv_col, sb)
    td, do = dst.where(lay_col, kv_col, db)
    batch.add_table(src.regions, dst_descs, ts, td, so, do, nbytes, imm=imm)
    return len(so)
