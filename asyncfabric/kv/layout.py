"""A paged KV layout, described once, and where each page of it lives in memory.

A *block* holds ``block_tokens`` tokens of K and V for every KV head of one
layer. Its K half (or V half) is ``block_tokens * kv_heads * head_dim``
elements in "NHD" order (token, head, dim), as vLLM stores it. Two block
orders are supported, as vLLM's attention backends use them:

* ``"kv_first"``: a layer is ``[2, blocks, T, H, D]`` (flash-attn backend): the
  K halves of all blocks, then the V halves;
* ``"block_first"``: a layer is ``[blocks, 2, T, H, D]`` (FlashInfer): a
  block's K and V halves are adjacent, so one write moves both.

And three ways to hold the layers (``tensors``): ``"per_layer"`` (one tensor
per layer), ``"per_layer_kv"`` (a K tensor and a V tensor per layer, each
``[blocks, T, H, D]``: the per-layer K and V split) or ``"one"`` (one tensor
``[layers, ...]`` for all). Where a page sits is the sides' own business: only
what a page *is* (its bytes) must agree, which the handshake checks.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import LayoutMismatch

# Element size of each dtype name the layout accepts (torch names).
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1, "uint8": 1}
ORDERS = ("kv_first", "block_first")
TENSORS = ("per_layer", "per_layer_kv", "one")
# Fields both sides must share, in the order a mismatch is reported.
SHARED = ("dtype", "layers", "block_tokens", "kv_heads", "head_dim")
_WIRE = struct.Struct("<IIIIIBBB16s")


def _pos(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"KVLayout.{name} must be a positive int, got {v!r}")
    return v


@dataclass(frozen=True)
class KVLayout:
    """The paged KV cache of one side: ``blocks`` blocks per layer.

    ``layers``, ``block_tokens``, ``kv_heads``, ``head_dim`` and ``dtype`` must
    match the peer's (checked at the handshake); ``blocks``, ``order`` and
    ``tensors`` are this side's own.
    """

    layers: int
    blocks: int
    block_tokens: int
    kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    order: str = "kv_first"
    tensors: str = "per_layer"

    def __post_init__(self) -> None:
        for f in ("layers", "blocks", "block_tokens", "kv_heads", "head_dim"):
            _pos(f, getattr(self, f))
        if self.dtype not in ITEMSIZE:
            raise ValueError(
                f"KVLayout.dtype {self.dtype!r} is not supported; use one of {sorted(ITEMSIZE)}"
            )
        if self.order not in ORDERS:
            raise ValueError(f"KVLayout.order must be one of {ORDERS}, got {self.order!r}")
        if self.tensors not in TENSORS:
            raise ValueError(f"KVLayout.tensors must be one of {TENSORS}, got {self.tensors!r}")
        if self.tensors == "per_layer_kv" and self.order != "kv_first":
            raise ValueError(
                "KVLayout.tensors='per_layer_kv' keeps K and V in separate tensors: "
                "order must be 'kv_first'"
            )

    # ------------------------------------------------------------ sizes

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def half_bytes(self) -> int:
        """Bytes of one block's K (or V) for one layer."""
        return self.block_tokens * self.kv_heads * self.head_dim * self.itemsize

    @property
    def block_bytes(self) -> int:
        """Bytes of one block's K and V for one layer."""
        return 2 * self.half_bytes

    @property
    def nbytes(self) -> int:
        return self.layers * self.blocks * self.block_bytes

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold ``tokens`` tokens (the last one may be partly filled)."""
        return -(-tokens // self.block_tokens)

    # ------------------------------------------------------------ memory

    @property
    def n_tensors(self) -> int:
        return {"per_layer": self.layers, "per_layer_kv": 2 * self.layers, "one": 1}[self.tensors]

    def tensor_shape(self) -> tuple[int, ...]:
        """Shape of each tensor (``n_tensors`` of them)."""
        t, h, d = self.block_tokens, self.kv_heads, self.head_dim
        if self.tensors == "per_layer_kv":
            return (self.blocks, t, h, d)
        per = (2, self.blocks, t, h, d) if self.order == "kv_first" else (self.blocks, 2, t, h, d)
        return per if self.tensors == "per_layer" else (self.layers, *per)

    def where(self, layer: Any, kv: Any, blocks: np.ndarray) -> tuple[Any, np.ndarray]:
        """(tensor index, byte offsets in it) of the K (``kv=0``) or V (``kv=1``) halves
        of ``blocks`` in ``layer``. ``layer`` and ``kv`` may be arrays as long as
        ``blocks`` (one entry each); the tensor index is then an array too."""
        b = np.asarray(blocks, np.uint64)
        lay, k = np.asarray(layer, np.uint64), np.asarray(kv, np.uint64)
        hb, nb = np.uint64(self.half_bytes), np.uint64(self.blocks)
        if self.tensors == "per_layer_kv":
            t, off = 2 * lay + k, b * hb
        else:
            if self.order == "kv_first":
                off = k * nb * hb + b * hb
            else:
                off = k * hb + b * np.uint64(2) * hb
            if self.tensors == "one":
                off = off + lay * nb * np.uint64(2) * hb
                t = np.zeros_like(lay)
            else:
                t = lay
        off = np.broadcast_to(off, np.broadcast_shapes(b.shape, lay.shape, k.shape))
        if lay.ndim == 0 and k.ndim == 0:
            return int(t), off
        return np.broadcast_to(t, off.shape).astype(np.int64), off

    # ------------------------------------------------------------ handshake

    def check_peer(self, peer: KVLayout) -> None:
        """Raise :class:`LayoutMismatch` naming the first shared field that differs."""
        for f in SHARED:
            if getattr(self, f) != getattr(peer, f):
                raise LayoutMismatch(f, getattr(self, f), getattr(peer, f))

    def to_bytes(self) -> bytes:
        return _WIRE.pack(
            self.layers, self.blocks, self.block_tokens, self.kv_heads, self.head_dim,
            ORDERS.index(self.order), TENSORS.index(self.tensors), 0, self.dtype.encode(),
        )  # fmt: skip

    @classmethod
    def from_bytes(cls, data: bytes) -> KVLayout:
        if len(data) < _WIRE.size:
            raise ValueError(f"a KV layout takes {_WIRE.size} bytes, got {len(data)}")
        l_, b, t, h, d, o, ts, _, dt = _WIRE.unpack_from(data)
        return cls(l_, b, t, h, d, dt.rstrip(b"\0").decode(), ORDERS[o], TENSORS[ts])

    WIRE_SIZE = _WIRE.size


def pages_per_block(a: KVLayout, b: KVLayout) -> int:
    """Writes (and immediates) per block per layer between two sides: 1 when both keep a
    block's K and V adjacent (one write moves both), else 2."""
    return 1 if a.order == b.order == "block_first" and a.tensors != "per_layer_kv" else 2
