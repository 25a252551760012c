"""The embedded store's wire format: length-prefixed frames, HMAC on every message.

A frame is ``u32 length | u8 kind | body``. The server opens with a plain hello
(kind ``H``) carrying a fresh random nonce. Every later message (kind ``M``) is
``HMAC-SHA256(secret, nonce | direction | seq) (32 bytes) | JSON``, ``seq``
counting that direction's messages from 0: a message cannot be forged without
the secret, nor replayed into another connection or out of order. A server that
rejects a MAC answers one plain ``E`` frame and closes the connection.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import struct
from pathlib import Path
from typing import Any

from .errors import StoreAuthError

MAX_FRAME = 64 << 20
MAC_LEN = 32
SECRET_ENV = "ASYNCFABRIC_STORE_SECRET"
SECRET_FILE_ENV = "ASYNCFABRIC_STORE_SECRET_FILE"


def load_secret(secret: bytes | str | None = None, secret_file: str | None = None) -> bytes:
    """The shared secret: given, else from ``secret_file``, ``$ASYNCFABRIC_STORE_SECRET``
    or the file named by ``$ASYNCFABRIC_STORE_SECRET_FILE``."""
    if secret is None and secret_file is not None:
        try:
            secret = Path(secret_file).read_bytes().strip()
        except OSError as exc:
            raise StoreAuthError(
                f"cannot read the store secret file {secret_file!r}: {exc}; create it "
                "(the same bytes on every member and the server), mode 0600"
            ) from None
    if secret is None:
        env = os.environ.get(SECRET_ENV)
        if env:
            secret = env
        elif os.environ.get(SECRET_FILE_ENV):
            return load_secret(None, os.environ[SECRET_FILE_ENV])
    if secret is None:
        raise StoreAuthError(
            f"the embedded store needs a shared secret: pass secret=..., or set "
            f"${SECRET_ENV} (or ${SECRET_FILE_ENV} to a file holding it) on every member"
        )
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, (bytes, bytearray)) or len(secret) < 8:
        raise StoreAuthError("the store secret must be at least 8 bytes; use a long random one")
    return bytes(secret)


class Channel:
    """One side of an authenticated connection."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        secret: bytes,
        nonce: bytes,
        server: bool,
    ) -> None:
        self.reader, self.writer = reader, writer
        self._secret, self._nonce = secret, nonce
        self._send_dir, self._recv_dir = (b"s", b"c") if server else (b"c", b"s")
        self._send_seq = 0
        self._recv_seq = 0

    def _mac(self, direction: bytes, seq: int, body: bytes) -> bytes:
        msg = self._nonce + direction + struct.pack("<Q", seq) + body
        return hmac.new(self._secret, msg, hashlib.sha256).digest()

    def send(self, obj: dict[str, Any]) -> None:
        body = json.dumps(obj, separators=(",", ":")).encode()
        mac = self._mac(self._send_dir, self._send_seq, body)
        self._send_seq += 1
        write_frame(self.writer, b"M", mac + body)

    async def recv(self) -> dict[str, Any] | None:
        """The next message, or None at end of stream; raises StoreAuthError on a bad MAC
        (or the peer's plain refusal)."""
        got = await read_frame(self.reader)
        if got is None:
            return None
        kind, body = got
        if kind == b"E":
            raise StoreAuthError(json.loads(body).get("message", "the store refused this client"))
        if kind != b"M" or len(body) < MAC_LEN:
            raise StoreAuthError("malformed store message; is this an asyncfabric store?")
        mac, payload = body[:MAC_LEN], body[MAC_LEN:]
        if not hmac.compare_digest(mac, self._mac(self._recv_dir, self._recv_seq, payload)):
            raise StoreAuthError(
                "a store message failed its HMAC check: the two sides hold different secrets "
                f"(set the same ${SECRET_ENV} on the server and every member)"
            )
        self._recv_seq += 1
        obj = json.loads(payload)
        if not isinstance(obj, dict):
            raise StoreAuthError("malformed store message (not an object)")
        return obj


def write_frame(writer: asyncio.StreamWriter, kind: bytes, body: bytes) -> None:
    writer.write(struct.pack(">I", len(body) + 1) + kind + body)


async def read_frame(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    try:
        head = await reader.readexactly(4)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    (n,) = struct.unpack(">I", head)
    if not 1 <= n <= MAX_FRAME:
        raise StoreAuthError(f"store frame of {n} bytes; is this an asyncfabric store?")
    try:
        data = await reader.readexactly(n)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return data[:1], data[1:]


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def unb64(s: str) -> bytes:
    return base64.b64decode(s)
