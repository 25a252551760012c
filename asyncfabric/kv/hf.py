"""Moving Hugging Face ``transformers`` KV caches in and out of paged blocks.

A layer's K (or V) in a ``DynamicCache`` is ``[batch=1, kv_heads, tokens,
head_dim]``; a block's page is ``[block_tokens, kv_heads, head_dim]`` ("NHD").
The last block of a prompt may be partly filled: its tail stays zero and is
cut off again when the cache is rebuilt. Needs torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .cache import PagedCache


def store_layer(cache: PagedCache, layer: int, blocks: np.ndarray, k: Any, v: Any) -> None:
    """Copy one layer's ``k``/``v`` (``[1, H, S, D]``) into ``blocks`` of ``cache``."""
    import torch

    t = cache.layout.block_tokens
    s = k.shape[2]
    n = -(-s // t)
    kd, vd = cache.layer(layer)
    idx = torch.as_tensor(np.asarray(blocks[:n]), dtype=torch.long, device=kd.device)
    for src, dst in ((k, kd), (v, vd)):
        x = src[0].transpose(0, 1)  # [S, H, D]
        if n * t != s:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, n * t - s))
        dst.index_copy_(0, idx, x.reshape(n, t, *x.shape[1:]).to(dst.dtype))


def load_layer(cache: PagedCache, layer: int, blocks: np.ndarray, tokens: int) -> tuple[Any, Any]:
    """One layer's K and V for ``tokens`` tokens from ``blocks``, as ``[1, H, S, D]``."""
    import torch

    kd, vd = cache.layer(layer)
    idx = torch.as_tensor(np.asarray(blocks), dtype=torch.long, device=kd.device)
    out = []
    for src in (kd, vd):
        x = src.index_select(0, idx)  # [n, T, H, D]
        x = x.reshape(-1, *x.shape[2:])[:tokens]  # [S, H, D]
        out.append(x.transpose(0, 1).unsqueeze(0).contiguous())
    return out[0], out[1]


def dynamic_cache(cache: PagedCache, blocks: np.ndarray, tokens: int, dtype: Any = None) -> Any:
    """A ``transformers.DynamicCache`` holding ``tokens`` tokens of KV from ``blocks``."""
    from transformers import DynamicCache

    dc = DynamicCache()
    for layer in range(cache.layout.layers):
        k, v = load_layer(cache, layer, blocks, tokens)
        if dtype is not None:
            k, v = k.to(dtype), v.to(dtype)
        dc.update(k, v, layer)
    return dc


def layer_kv(dc: Any, layer: int) -> tuple[Any, Any]:
    """K and V of ``layer`` in a ``DynamicCache`` (transformers 4.5x and 5.x)."""
    if hasattr(dc, "layers"):
        lay = dc.layers[layer]
        return lay.keys, lay.values
    return dc.key_cache[layer], dc.value_cache[layer]
