"""Prefix-cache keys: one hash per full block, chained over the prompt's tokens."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def block_hashes(tokens: Sequence[int] | np.ndarray, block_tokens: int) -> list[bytes]:
    """The hashes of the full blocks of ``tokens``: block ``i``'s hash covers every
    token up to the end of block ``i``, so equal hashes mean equal prefixes."""
    t = np.asarray(tokens, np.int64)
    out: list[bytes] = []
    h = b""
    for i in range(len(t) // block_tokens):
        h = hashlib.blake2b(h + t[i * block_tokens : (i + 1) * block_tokens].tobytes(),
                            digest_size=16).digest()  # fmt: skip
        out.append(h)
    return out
