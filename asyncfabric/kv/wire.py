"""Control messages between the prefill and decode sides (``Engine.send``/``recv``).

Each message: the magic ``b"AFKV"``, a type byte, then its fields. Block lists
travel as little-endian int32 arrays, so a 16k-token request (1,024 blocks)
takes 4 KiB of an engine's ``ctrl_max``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from .errors import KVError

MAGIC = b"AFKV"
HELLO, WELCOME, REFUSE, ALLOC, GRANT, DENY, ABORT, ABORTED, RESULT, NOTE = range(1, 11)
_HDR = struct.Struct("<4sB")


def _chunks(data: bytes, pos: int, n: int) -> tuple[list[bytes], int]:
    out = []
    for _ in range(n):
        (k,) = struct.unpack_from("<I", data, pos)
        pos += 4
        out.append(bytes(data[pos : pos + k]))
        pos += k
    return out, pos


def _pack_chunks(parts: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(p)) + p for p in parts)


@dataclass
class Msg:
    kind: int
    link: int = 0  # the prefill side's link id at the decode side
    request: str = ""
    num: int = 0  # tokens (ALLOC), imm (GRANT), pages posted (ABORTED), need (DENY)
    num2: int = 0  # hits (GRANT), free blocks (DENY)
    blocks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    parts: list[bytes] = field(default_factory=list)  # layout, address, descriptors, hashes...

    def encode(self) -> bytes:
        rid = self.request.encode()
        if len(rid) > 255:
            raise ValueError(f"request ids are at most 255 bytes of UTF-8, got {len(rid)}")
        b = np.ascontiguousarray(self.blocks, "<i4").tobytes()
        return b"".join((
            _HDR.pack(MAGIC, self.kind),
            struct.pack("<IBqqI", self.link, len(rid), self.num, self.num2, len(self.blocks)),
            rid, b, struct.pack("<I", len(self.parts)), _pack_chunks(self.parts),
        ))  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> Msg:
        if len(data) < _HDR.size or data[:4] != MAGIC:
            raise KVError(
                "a control message that is not the KV protocol's reached a KV engine; "
                "give each KV role an engine of its own"
            )
        (_, kind) = _HDR.unpack_from(data)
        pos = _HDR.size
        link, nrid, num, num2, nb = struct.unpack_from("<IBqqI", data, pos)
        pos += struct.calcsize("<IBqqI")
        rid = bytes(data[pos : pos + nrid]).decode()
        pos += nrid
        blocks = np.frombuffer(data, "<i4", nb, pos).astype(np.int64)
        pos += 4 * nb
        (np_,) = struct.unpack_from("<I", data, pos)
        parts, _ = _chunks(data, pos + 4, np_)
        return cls(kind, link, rid, num, num2, blocks, parts)
