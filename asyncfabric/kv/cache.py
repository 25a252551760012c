"""A paged KV cache in memory, registered once with an engine."""

from __future__ import annotations

from typing import Any

import numpy as np

import asyncfabric as af

from .layout import KVLayout

_NP = {"float16": np.float16, "float32": np.float32, "uint8": np.uint8}


def _alloc(layout: KVLayout, device: str) -> list[Any]:
    shape = layout.tensor_shape()
    try:
        import torch
    except ImportError:
        torch = None  # type: ignore[assignment]
    # host pages come from af.host_zeros (huge pages: shm's copies pin 2 MiB at a time)
    if torch is not None:
        dt = getattr(torch, layout.dtype)
        return [af.host_zeros(shape, dt, device) for _ in range(layout.n_tensors)]
    if device != "cpu":
        raise ValueError(f"a KV cache on {device!r} needs torch; pip install torch")
    if layout.dtype in _NP:
        return [af.host_zeros(shape, _NP[layout.dtype]) for _ in range(layout.n_tensors)]
    # dtypes numpy lacks (bfloat16, fp8) as raw bytes of the same size
    flat = (*shape[:-1], shape[-1] * layout.itemsize)
    return [af.host_zeros(flat, np.uint8) for _ in range(layout.n_tensors)]


class PagedCache:
    """``layout.n_tensors`` tensors (torch on ``device``, or numpy without torch), each
    registered with ``engine`` for the life of the cache. Close it (or use ``with``)
    to unregister."""

    def __init__(self, engine: af.Engine, layout: KVLayout, device: str = "cpu") -> None:
        self.engine, self.layout, self.device = engine, layout, device
        self.tensors = _alloc(layout, device)
        self.regions: list[af.Region] = []
        try:
            for t in self.tensors:
                self.regions.append(engine.register(t))
        except BaseException:
            self.close()
            raise

    def descriptors(self) -> list[af.Descriptor]:
        return [r.descriptor() for r in self.regions]

    def layer(self, layer: int) -> tuple[Any, Any]:
        """Views of ``layer``'s K and V pages, each ``[blocks, T, H, D]``."""
        lay = self.layout
        if lay.tensors == "per_layer_kv":
            return self.tensors[2 * layer], self.tensors[2 * layer + 1]
        t = self.tensors[layer] if lay.tensors == "per_layer" else self.tensors[0][layer]
        if lay.order == "kv_first":
            return t[0], t[1]
        return t[:, 0], t[:, 1]

    def close(self) -> None:
        for r in self.regions:
            r.close()
        self.regions = []

    def __enter__(self) -> PagedCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
