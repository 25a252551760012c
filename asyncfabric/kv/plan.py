"""Which writes move a request's pages: one ``Batch`` entry per page, built with
array calls (``Batch.add_many``), so the Python cost per layer does not grow with
the number of blocks."""

from __future__ import annotations

import numpy as np

import asyncfabric as af

from .cache import PagedCache
from .layout import KVLayout


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
    """Add the pages of ``layers`` to ``batch``; return how many (one immediate each)."""
    lay = src.layout
    n = 0
    halves = (0,) if ppb == 1 else (0, 1)
    nbytes = lay.block_bytes if ppb == 1 else lay.half_bytes
    for layer in layers:
        for kv in halves:
            ts, so = lay.where(layer, kv, src_blocks)
            td, do = dst.where(layer, kv, dst_blocks)
            batch.add_many(src.regions[ts], dst_descs[td], so, do, nbytes, imm=imm)
            n += len(so)
    return n
