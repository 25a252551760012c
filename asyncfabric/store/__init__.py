"""Stores for groups: the embedded store (default) and etcd, behind one small interface.

``await af.store.serve(listen="127.0.0.1:0", secret=...)`` starts an embedded store in
this process; ``await af.store.connect(url, secret=...)`` connects to
``af://host:port`` (embedded) or ``etcd://host:2379`` (etcd).
"""

from __future__ import annotations

from typing import Any

from .abc import KeyValue, Store, WatchEvent
from .errors import LeaseNotFound, StoreAuthError, StoreLost, StoreUnavailable
from .server import StoreServer, serve, split_hostport
from .wire import load_secret

__all__ = [
    "KeyValue",
    "LeaseNotFound",
    "Store",
    "StoreAuthError",
    "StoreLost",
    "StoreServer",
    "StoreUnavailable",
    "WatchEvent",
    "connect",
    "serve",
]


async def connect(
    url: str,
    *,
    secret: bytes | str | None = None,
    secret_file: str | None = None,
    **etcd_options: Any,
) -> Store:
    """Connect to a store by URL: ``af://host:port`` or ``etcd://host:port[,host:port]``.

    The embedded store needs the shared secret (``secret``, ``secret_file``, or
    ``$ASYNCFABRIC_STORE_SECRET``). For etcd, ``etcd_options`` (``username``,
    ``password``, ``ca_cert``, ``cert_key``, ``cert_cert``, ``timeout``) pass through
    to the etcd client."""
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"store url must be 'af://HOST:PORT' or 'etcd://HOST:PORT', got {url!r}")
    scheme, _, rest = url.partition("://")
    if scheme == "af":
        from .embedded import connect_embedded

        if etcd_options:
            raise TypeError(f"options {sorted(etcd_options)} are for etcd stores only")
        host, port = split_hostport(rest.rstrip("/"), "store url")
        return await connect_embedded(host, port, load_secret(secret, secret_file))
    if scheme == "etcd":
        from .etcd import connect_etcd

        return await connect_etcd(rest.rstrip("/"), **etcd_options)
    raise ValueError(f"unknown store scheme {scheme!r} in {url!r}: use af:// or etcd://")
