"""KV-cache transfer for disaggregated inference (docs/kv.md).

A paged KV layout (:class:`KVLayout`), described once; the decode side
(:class:`KVDecode`) grants blocks per request and counts the pages in with one
counter per request; the prefill side (:class:`KVPrefill`) pushes the pages,
layer by layer as they are ready. :class:`Router` spreads requests over the
live decode members of a group. Built on the engine's public API only.
"""

from __future__ import annotations

from .cache import PagedCache
from .decode import DecodeRequest, KVDecode
from .errors import (
    KVError,
    LayoutMismatch,
    MemberDraining,
    NoDecodeMembers,
    OutOfBlocks,
    RequestAborted,
    RequestFailed,
)
from .hashing import block_hashes
from .layout import KVLayout, pages_per_block
from .prefill import DecodeLink, KVPrefill, PrefillRequest
from .router import RoutedRequest, Router

__all__ = [
    "DecodeLink",
    "DecodeRequest",
    "KVDecode",
    "KVError",
    "KVLayout",
    "KVPrefill",
    "LayoutMismatch",
    "MemberDraining",
    "NoDecodeMembers",
    "OutOfBlocks",
    "PagedCache",
    "PrefillRequest",
    "RequestAborted",
    "RequestFailed",
    "RoutedRequest",
    "Router",
    "block_hashes",
    "pages_per_block",
]
