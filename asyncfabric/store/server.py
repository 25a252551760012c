"""The embedded store: a small asyncio key-value server with leases and watches.

One process holds the data in memory (nothing on disk: a restarted server is
empty, and groups re-register into it). Revisions start at the wall clock in
microseconds, so they keep increasing across a restart.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .abc import KeyValue, WatchEvent
from .errors import StoreAuthError, StoreUnavailable
from .wire import Channel, b64, load_secret, unb64, write_frame

HISTORY = 65536
EXPIRY_TICK_S = 0.05


@dataclass
class _Lease:
    ttl: float
    deadline: float
    keys: set[str] = field(default_factory=set)


@dataclass(eq=False)
class _Watch:
    chan: Channel
    wid: int
    prefix: str


class StoreServer:
    """An embedded store serving on ``host:port``; ``url`` is what members connect to."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._rev = int(time.time() * 1e6)
        self._kv: dict[str, KeyValue] = {}
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(int.from_bytes(os.urandom(4), "little") << 16)
        self._history: deque[WatchEvent] = deque(maxlen=HISTORY)
        self._watches: set[_Watch] = set()
        self._conns: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._server: asyncio.base_events.Server | None = None
        self._expiry: asyncio.Task[None] | None = None
        self.host = ""
        self.port = 0
        self.auth_failures = 0

    @property
    def url(self) -> str:
        """``af://host:port``: give it to members (with the secret, out of band)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"af://{host}:{self.port}"

    async def start(self, host: str, port: int) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, host, port)
        except OSError as exc:
            raise StoreUnavailable(
                f"the embedded store cannot listen on {host}:{port}: {exc}; pick a free "
                "port (0 picks one) or an address of this host"
            ) from None
        sock = self._server.sockets[0].getsockname()
        self.host, self.port = host, int(sock[1])
        self._expiry = asyncio.get_running_loop().create_task(self._expire_loop())

    async def aclose(self) -> None:
        """Stop serving; connected clients see the store go away."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._server is not None:
            self._server.close()
            for w in list(self._conns):
                w.close()
            # the handlers see end of stream and return: wait for them, so none is
            # cancelled half-way by the loop's shutdown
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> StoreServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    # ------------------------------------------------------------ connections

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonce = os.urandom(16)
        me = asyncio.current_task()
        if me is not None:
            self._handlers.add(me)
        self._conns.add(writer)
        write_frame(writer, b"H", json.dumps({"v": 1, "nonce": nonce.hex()}).encode())
        chan = Channel(reader, writer, self._secret, nonce, server=True)
        try:
            while True:
                try:
                    req = await chan.recv()
                except StoreAuthError:
                    # Nothing of a message that failed its MAC is looked at or applied.
                    self.auth_failures += 1
                    msg = (
                        "the embedded store refused this client: its requests fail the HMAC "
                        "check, so it holds a different secret; set the server's "
                        "ASYNCFABRIC_STORE_SECRET on this member"
                    )
                    write_frame(writer, b"E", json.dumps({"message": msg}).encode())
                    await writer.drain()
                    return
                if req is None:
                    return
                rid = req.get("id")
                try:
                    out = self._handle(chan, req)
                except _ReqError as exc:
                    chan.send({"id": rid, "error": exc.code, "message": str(exc)})
                except (KeyError, TypeError, ValueError) as exc:
                    chan.send({"id": rid, "error": "bad_request", "message": repr(exc)})
                else:
                    out["id"] = rid
                    chan.send(out)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if me is not None:
                self._handlers.discard(me)
            self._conns.discard(writer)
            self._watches = {w for w in self._watches if w.chan is not chan}
            writer.close()

    # ------------------------------------------------------------ operations

    def _handle(self, chan: Channel, r: dict[str, Any]) -> dict[str, Any]:
        op = r["op"]
        if op == "ping":
            return {"rev": self._rev}
        if op == "grant":
            ttl = float(r["ttl"])
            if not 0 < ttl <= 3600:
                raise _ReqError("bad_request", f"lease ttl {ttl} not in (0, 3600] seconds")
            lid = next(self._lease_ids)
            self._leases[lid] = _Lease(ttl, time.monotonic() + ttl)
            return {"lease": lid}
        if op == "keepalive":
            le = self._leases.get(int(r["lease"]))
            if le is None:
                raise _ReqError("lease_not_found", f"lease {r['lease']} is gone")
            le.deadline = time.monotonic() + le.ttl
            return {}
        if op == "revoke":
            self._revoke(int(r["lease"]))
            return {}
        if op == "put":
            return {"rev": self._put(r["key"], unb64(r["value"]), int(r.get("lease", 0)))}
        if op == "cas":
            key = r["key"]
            cur = self._kv.get(key)
            if (cur.mod if cur else 0) != int(r["expect"]):
                return {"ok": False}
            return {"ok": True, "rev": self._put(key, unb64(r["value"]), int(r.get("lease", 0)))}
        if op == "get":
            kv = self._kv.get(r["key"])
            return {"kv": _kv_out(kv) if kv else None}
        if op == "list":
            p = r["prefix"]
            kvs = [_kv_out(self._kv[k]) for k in sorted(self._kv) if k.startswith(p)]
            return {"kvs": kvs, "rev": self._rev}
        if op == "delete":
            return {"deleted": self._delete(r["key"])}
        if op == "watch":
            return self._watch(chan, int(r["wid"]), r["prefix"], int(r["start"]))
        if op == "unwatch":
            wid = int(r["wid"])
            self._watches = {w for w in self._watches if not (w.chan is chan and w.wid == wid)}
            return {}
        raise _ReqError("bad_request", f"unknown store operation {op!r}")

    def _put(self, key: str, value: bytes, lease: int) -> int:
        if not isinstance(key, str) or not key:
            raise _ReqError("bad_request", "key must be a non-empty string")
        le = None
        if lease:
            le = self._leases.get(lease)
            if le is None:
                raise _ReqError("lease_not_found", f"lease {lease} is gone")
        self._rev += 1
        old = self._kv.get(key)
        if old is not None and old.lease and old.lease != lease:
            ol = self._leases.get(old.lease)
            if ol is not None:
                ol.keys.discard(key)
        if le is not None:
            le.keys.add(key)
        kv = KeyValue(key, value, old.create if old else self._rev, self._rev, lease)
        self._kv[key] = kv
        self._emit(WatchEvent("put", key, value, self._rev, kv.create))
        return self._rev

    def _delete(self, key: str) -> bool:
        old = self._kv.pop(key, None)
        if old is None:
            return False
        if old.lease and old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)
        self._rev += 1
        self._emit(WatchEvent("delete", key, b"", self._rev, old.create))
        return True

    def _revoke(self, lid: int) -> None:
        le = self._leases.pop(lid, None)
        if le is not None:
            for k in sorted(le.keys):
                self._delete(k)

    def _watch(self, chan: Channel, wid: int, prefix: str, start: int) -> dict[str, Any]:
        full = len(self._history) == self._history.maxlen
        if full and start < self._history[0].revision:
            raise _ReqError(
                "compacted", f"revision {start} is older than the store keeps; list again"
            )
        past = [e for e in self._history if e.revision >= start and e.key.startswith(prefix)]
        self._watches.add(_Watch(chan, wid, prefix))
        return {"events": [_ev_out(e) for e in past]}

    def _emit(self, ev: WatchEvent) -> None:
        self._history.append(ev)
        for w in list(self._watches):
            if ev.key.startswith(w.prefix):
                try:
                    w.chan.send({"w": w.wid, "events": [_ev_out(ev)]})
                except (ConnectionError, RuntimeError):
                    self._watches.discard(w)

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_TICK_S)
            now = time.monotonic()
            for lid in [lid for lid, le in self._leases.items() if le.deadline <= now]:
                self._revoke(lid)


class _ReqError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _kv_out(kv: KeyValue) -> dict[str, Any]:
    return {"k": kv.key, "v": b64(kv.value), "c": kv.create, "m": kv.mod, "l": kv.lease}


def _ev_out(e: WatchEvent) -> dict[str, Any]:
    return {"t": e.kind, "k": e.key, "v": b64(e.value), "r": e.revision, "c": e.create}


async def serve(
    listen: str = "127.0.0.1:0",
    *,
    secret: bytes | str | None = None,
    secret_file: str | None = None,
) -> StoreServer:
    """Start an embedded store in this process, listening on ``HOST:PORT`` (port 0: any).

    The secret comes from ``secret``, ``secret_file``, ``$ASYNCFABRIC_STORE_SECRET`` or
    the file named by ``$ASYNCFABRIC_STORE_SECRET_FILE``; every client needs the same."""
    host, port = split_hostport(listen, "listen")
    srv = StoreServer(load_secret(secret, secret_file))
    await srv.start(host, port)
    return srv


def split_hostport(s: str, what: str) -> tuple[str, int]:
    if not isinstance(s, str) or ":" not in s:
        raise ValueError(f"{what} must be 'HOST:PORT' (e.g. 127.0.0.1:7400), got {s!r}")
    host, _, port = s.rpartition(":")
    host = host.strip("[]")
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"{what}: port {port!r} is not a number") from None
    if not 0 <= p <= 65535 or not host:
        raise ValueError(f"{what} must be 'HOST:PORT' with a port 0..65535, got {s!r}")
    return host, p
