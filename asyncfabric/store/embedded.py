"""The embedded store's client (``af://host:port``)."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

from .abc import KeyValue, Store, WatchEvent, _Events, _KVs
from .errors import LeaseNotFound, StoreAuthError, StoreUnavailable
from .wire import Channel, b64, read_frame, unb64

CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 10.0


class EmbeddedStore(Store):
    """A client of :class:`~asyncfabric.store.server.StoreServer`."""

    def __init__(self, host: str, port: int, secret: bytes) -> None:
        host_s = f"[{host}]" if ":" in host else host
        self.url = f"af://{host_s}:{port}"
        self._host, self._port, self._secret = host, port, secret
        self._chan: Channel | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._watches: dict[int, asyncio.Queue[Any]] = {}
        self._lost: BaseException | None = None
        self._closed = False

    async def _connect(self) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port), CONNECT_TIMEOUT_S
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise StoreUnavailable(
                f"cannot reach the embedded store at {self.url}: {exc or 'timed out'}; start it "
                "(`asyncfabric store serve --listen HOST:PORT`) or fix the address"
            ) from None
        try:
            got = await asyncio.wait_for(read_frame(reader), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            got = None
        if got is None or got[0] != b"H":
            writer.close()
            raise StoreUnavailable(
                f"{self.url} did not greet like an asyncfabric store; is the address right?"
            )
        nonce = bytes.fromhex(json.loads(got[1])["nonce"])
        self._chan = Channel(reader, writer, self._secret, nonce, server=False)
        self._lost = None
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop(self._chan))
        await self._request("ping")  # the server checks our MAC now: a wrong secret fails here

    async def reconnect(self) -> None:
        if self._closed:
            raise StoreUnavailable("the store client was closed; connect again")
        self._teardown(StoreUnavailable(f"reconnecting to {self.url}"))
        await self._connect()

    async def aclose(self) -> None:
        self._closed = True
        self._teardown(StoreUnavailable(f"the client of {self.url} was closed"))
        if self._reader_task is not None:
            self._reader_task.cancel()
            try:
                await self._reader_task
            except BaseException:
                pass
            self._reader_task = None

    def _teardown(self, exc: BaseException) -> None:
        self._lost = self._lost or exc
        if self._chan is not None:
            self._chan.writer.close()
            self._chan = None
        for f in self._pending.values():
            if not f.done():
                f.set_exception(exc)
        self._pending.clear()
        for q in self._watches.values():
            q.put_nowait(exc)
        self._watches.clear()

    async def _read_loop(self, chan: Channel) -> None:
        exc: BaseException
        try:
            while True:
                msg = await chan.recv()
                if msg is None:
                    exc = StoreUnavailable(
                        f"the embedded store at {self.url} closed the connection (stopped or "
                        "restarted); the group re-registers when it is back"
                    )
                    break
                if "w" in msg:
                    q = self._watches.get(msg["w"])
                    if q is not None:
                        q.put_nowait([_ev_in(e) for e in msg["events"]])
                    continue
                f = self._pending.pop(msg.get("id", -1), None)
                if f is not None and not f.done():
                    f.set_result(msg)
        except StoreAuthError as e:
            exc = e
        except (ConnectionError, OSError) as e:
            exc = StoreUnavailable(f"lost the connection to the store at {self.url}: {e}")
        except asyncio.CancelledError:
            return
        if self._chan is chan:
            self._teardown(exc)

    async def _request(self, op: str, **args: Any) -> dict[str, Any]:
        if self._chan is None:
            raise self._lost or StoreUnavailable(f"not connected to {self.url}")
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            self._chan.send({"id": rid, "op": op, **args})
        except (ConnectionError, RuntimeError) as exc:
            self._pending.pop(rid, None)
            raise StoreUnavailable(f"cannot send to the store at {self.url}: {exc}") from None
        try:
            msg = await asyncio.wait_for(fut, REQUEST_TIMEOUT_S)
        except asyncio.TimeoutError:
            self._pending.pop(rid, None)
            raise StoreUnavailable(
                f"the store at {self.url} did not answer {op} within {REQUEST_TIMEOUT_S} s"
            ) from None
        err = msg.get("error")
        if err == "lease_not_found":
            raise LeaseNotFound(msg.get("message", "lease not found"))
        if err:
            raise StoreUnavailable(f"the store refused {op}: {msg.get('message', err)}")
        return msg

    async def grant(self, ttl: float) -> int:
        return int((await self._request("grant", ttl=float(ttl)))["lease"])

    async def keepalive(self, lease: int) -> None:
        await self._request("keepalive", lease=lease)

    async def revoke(self, lease: int) -> None:
        await self._request("revoke", lease=lease)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        return int((await self._request("put", key=key, value=b64(value), lease=lease))["rev"])

    async def get(self, key: str) -> KeyValue | None:
        kv = (await self._request("get", key=key))["kv"]
        return _kv_in(kv) if kv else None

    async def list(self, prefix: str) -> tuple[_KVs, int]:
        r = await self._request("list", prefix=prefix)
        return [_kv_in(kv) for kv in r["kvs"]], int(r["rev"])

    async def delete(self, key: str) -> bool:
        return bool((await self._request("delete", key=key))["deleted"])

    async def cas(self, key: str, value: bytes, *, expect_mod: int, lease: int = 0) -> bool:
        r = await self._request("cas", key=key, value=b64(value), expect=expect_mod, lease=lease)
        return bool(r["ok"])

    async def watch(self, prefix: str, start: int) -> AsyncIterator[_Events]:
        wid = next(self._ids)
        q: asyncio.Queue[Any] = asyncio.Queue()
        self._watches[wid] = q
        try:
            r = await self._request("watch", wid=wid, prefix=prefix, start=start)
            if r["events"]:
                yield [_ev_in(e) for e in r["events"]]
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if self._watches.pop(wid, None) is not None and self._chan is not None:
                try:
                    self._chan.send({"id": next(self._ids), "op": "unwatch", "wid": wid})
                except (ConnectionError, RuntimeError):
                    pass


def _kv_in(d: dict[str, Any]) -> KeyValue:
    return KeyValue(d["k"], unb64(d["v"]), int(d["c"]), int(d["m"]), int(d["l"]))


def _ev_in(d: dict[str, Any]) -> WatchEvent:
    return WatchEvent(d["t"], d["k"], unb64(d["v"]), int(d["r"]), int(d["c"]))


async def connect_embedded(host: str, port: int, secret: bytes) -> EmbeddedStore:
    s = EmbeddedStore(host, port, secret)
    await s._connect()
    return s
