"""The etcd store (``etcd://host:port``) through ``aetcd``, the maintained asyncio client.

Leases and watches are etcd's own: a group's lease is an etcd lease (etcd's TTLs
are whole seconds, at least its minimum, so a TTL is rounded up), its watch an etcd
watch from a revision, and compare-and-set an etcd transaction on the key's mod
revision. Install with ``pip install 'asyncfabric[etcd]'``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any, Literal

from .abc import KeyValue, Store, WatchEvent, _Events, _KVs
from .errors import LeaseNotFound, StoreAuthError, StoreUnavailable
from .server import split_hostport

OPTION_NAMES = ("username", "password", "timeout", "options")


def _import_aetcd() -> Any:
    try:
        import aetcd
    except ImportError:
        raise StoreUnavailable(
            "etcd stores need the aetcd client: pip install 'asyncfabric[etcd]'"
        ) from None
    return aetcd


class EtcdStore(Store):
    """A connection to an etcd cluster (the first endpoint of the URL)."""

    def __init__(self, endpoints: str, **options: Any) -> None:
        self._aetcd = _import_aetcd()
        bad = sorted(set(options) - set(OPTION_NAMES))
        if bad:
            raise TypeError(
                f"unknown etcd options {bad}; this client takes {list(OPTION_NAMES)} "
                "(aetcd speaks plaintext gRPC: reach a TLS etcd through a local proxy)"
            )
        first = endpoints.split(",")[0]
        self._host, self._port = split_hostport(first, "etcd url")
        self.url = f"etcd://{endpoints}"
        self._options = options
        self._options.setdefault("timeout", 10)
        # gRPC shares subchannels between channels to one target: a fresh client would
        # inherit the backoff of one that saw etcd down and fail at once, "connection
        # refused", after etcd is back. Own pool, short backoff: reconnects come fast.
        self._options["options"] = {
            "grpc.use_local_subchannel_pool": 1,
            "grpc.initial_reconnect_backoff_ms": 100,
            "grpc.min_reconnect_backoff_ms": 100,
            "grpc.max_reconnect_backoff_ms": 1000,
            **(options.get("options") or {}),
        }
        self._client: Any = None

    def _new_client(self) -> Any:
        return self._aetcd.Client(host=self._host, port=self._port, **self._options)

    async def _connect(self) -> None:
        self._client = self._new_client()
        try:
            await self._client.connect()
            await self._client.status()
        except BaseException as exc:
            await self._close_client()
            raise self._error(exc, "connect") from None

    async def _close_client(self) -> None:
        c, self._client = self._client, None
        if c is not None:
            try:
                await c.close()
            except Exception:
                pass

    def _error(self, exc: BaseException, op: str) -> BaseException:
        ex = self._aetcd.exceptions
        if isinstance(exc, ex.UnauthenticatedError):
            return StoreAuthError(
                f"etcd at {self.url} refused {op}: {exc}; pass username=/password= to "
                "af.store.connect"
            )
        if isinstance(exc, (ex.ClientError, OSError, asyncio.TimeoutError)):
            return StoreUnavailable(
                f"etcd at {self.url} failed {op}: {type(exc).__name__}: {exc}; is etcd "
                "running and reachable?"
            )
        return exc

    async def _call(self, op: str, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._client is None:
            raise StoreUnavailable(
                f"not connected to etcd at {self.url} (the connection was lost); the group "
                "reconnects on its own"
            )
        try:
            return await getattr(self._client, method)(*args, **kwargs)
        except (StoreUnavailable, LeaseNotFound, StoreAuthError):
            raise
        except Exception as exc:
            err = self._error(exc, op)
            if "lease not found" in str(exc):
                raise LeaseNotFound(f"etcd lease is gone: {exc}") from None
            raise err from None

    async def reconnect(self) -> None:
        await self._close_client()
        await self._connect()

    async def aclose(self) -> None:
        await self._close_client()

    async def grant(self, ttl: float) -> int:
        lease = await self._call("grant", "lease", max(1, math.ceil(ttl)))
        return int(lease.id)

    async def keepalive(self, lease: int) -> None:
        reply = await self._call("keepalive", "refresh_lease", lease)
        if reply is None or reply.TTL <= 0:
            raise LeaseNotFound(f"etcd lease {lease:#x} is gone (expired or revoked)")

    async def revoke(self, lease: int) -> None:
        try:
            await self._call("revoke", "revoke_lease", lease)
        except LeaseNotFound:
            pass

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        r = await self._call("put", "put", key.encode(), value, lease=lease or None)
        return int(r.header.revision)

    async def get(self, key: str) -> KeyValue | None:
        r = await self._call("get", "get", key.encode())
        return None if r is None else _kv(r)

    async def list(self, prefix: str) -> tuple[_KVs, int]:
        r = await self._call("list", "get_prefix", prefix.encode())
        return [_kv(kv) for kv in r], int(r.header.revision)

    async def delete(self, key: str) -> bool:
        r = await self._call("delete", "delete", key.encode())
        return r is not None and bool(getattr(r, "deleted", 1))

    async def cas(self, key: str, value: bytes, *, expect_mod: int, lease: int = 0) -> bool:
        if self._client is None:
            raise StoreUnavailable(f"not connected to etcd at {self.url}; reconnect")
        t = self._client.transactions
        k = key.encode()
        ok, _ = await self._call(
            "compare-and-set",
            "transaction",
            compare=[t.mod(k) == expect_mod],
            success=[t.put(k, value, lease=lease or None)],
            failure=[],
        )
        return bool(ok)

    async def watch(self, prefix: str, start: int) -> AsyncIterator[_Events]:
        w = await self._call("watch", "watch_prefix", prefix.encode(), start_revision=start)
        try:
            async for ev in w:
                kv = ev.kv
                kind: Literal["put", "delete"] = "put" if ev.kind == "PUT" else "delete"
                yield [
                    WatchEvent(
                        kind,
                        kv.key.decode(),
                        kv.value if kind == "put" else b"",
                        int(kv.mod_revision),
                        int(kv.create_revision),
                    )
                ]
        except (StoreUnavailable, LeaseNotFound):
            raise
        except Exception as exc:
            raise self._error(exc, "watch") from None
        finally:
            try:
                await w.cancel()
            except Exception:
                pass
        raise StoreUnavailable(f"etcd at {self.url} ended the watch (connection lost?)")


def _kv(kv: Any) -> KeyValue:
    return KeyValue(
        kv.key.decode(),
        bytes(kv.value),
        int(kv.create_revision),
        int(kv.mod_revision),
        int(kv.lease),
    )


async def connect_etcd(endpoints: str, **options: Any) -> EtcdStore:
    s = EtcdStore(endpoints, **options)
    await s._connect()
    return s
