"""Engine addresses: the bytes a peer needs to reach an engine, sent out of band.

Layout (little endian, version 1)::

    b"AFA" u8 version | 8 bytes engine uid | 8 bytes host id | u32 pid
    | u8 len + backend | u8 len + provider | u8 ndomains | per domain: u16 len + transport address

``host`` and ``pid`` let a peer on the same host (same boot, same pid namespace)
watch the owner's process: when it exits, transfers to it fail at once instead
of vanishing into its dead shared memory. A zero host id means "unknown" and
turns the watch off; they are hints for failure detection, never for access.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
from dataclasses import dataclass

from .._errors import DescriptorError

MAGIC = b"AFA"
VERSION = 1
MAX_DOMAINS = 16


@dataclass(frozen=True, slots=True)
class EngineAddress:
    """An engine's address, parsed: its uid, backend, provider and one address per domain."""

    uid: bytes
    backend: str
    provider: str
    domains: tuple[bytes, ...]
    host: bytes = bytes(8)
    pid: int = 0

    def __post_init__(self) -> None:
        # Built by hand, an address must still fit its wire format (to_bytes would
        # write bytes that parse as something else).
        if not isinstance(self.uid, bytes) or len(self.uid) != 8:
            raise DescriptorError("engine address uid must be 8 bytes")
        if not isinstance(self.host, bytes) or len(self.host) != 8:
            raise DescriptorError("engine address host id must be 8 bytes")
        if (
            isinstance(self.pid, bool)
            or not isinstance(self.pid, int)
            or not 0 <= self.pid < 1 << 32
        ):
            raise DescriptorError(f"engine address pid {self.pid!r} does not fit 32 bits")
        for name, v in (("backend", self.backend), ("provider", self.provider)):
            if not isinstance(v, str) or not v.isascii() or len(v) > 255:
                raise DescriptorError(f"engine address {name} must be ASCII of at most 255")
        if not 1 <= len(self.domains) <= MAX_DOMAINS or not all(
            isinstance(d, bytes) and 0 < len(d) <= 0xFFFF for d in self.domains
        ):
            raise DescriptorError(
                f"engine address needs 1 to {MAX_DOMAINS} non-empty domain addresses"
            )

    @property
    def same_host(self) -> bool:
        """True when the owner runs on this host, in this pid namespace (its pid means something here)."""
        return self.host != bytes(8) and self.host == host_id()

    def to_bytes(self) -> bytes:
        """The wire format (what ``Engine.address`` returns)."""
        b, p = self.backend.encode(), self.provider.encode()
        out = [MAGIC, bytes([VERSION]), self.uid, self.host, struct.pack("<I", self.pid)]
        out += [bytes([len(b)]), b, bytes([len(p)]), p]
        out.append(bytes([len(self.domains)]))
        for d in self.domains:
            out.append(struct.pack("<H", len(d)))
            out.append(d)
        return b"".join(out)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> EngineAddress:
        """Parse :meth:`to_bytes` output; malformed input raises :class:`DescriptorError`."""
        addr, end = parse(bytes(data), 0, "engine address")
        if end != len(data):
            raise DescriptorError(f"engine address has {len(data) - end} trailing bytes")
        return addr


class _Reader:
    __slots__ = ("buf", "pos", "what")

    def __init__(self, buf: bytes, pos: int, what: str) -> None:
        self.buf, self.pos, self.what = buf, pos, what

    def take(self, n: int, field: str) -> bytes:
        if self.pos + n > len(self.buf):
            raise DescriptorError(
                f"{self.what} is truncated: {field} needs {n} bytes at offset {self.pos}, "
                f"only {len(self.buf) - self.pos} left (were all bytes sent?)"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int(struct.unpack("<H", self.take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(struct.unpack("<I", self.take(4, field))[0])

    def u64(self, field: str) -> int:
        return int(struct.unpack("<Q", self.take(8, field))[0])

    def text(self, field: str) -> str:
        raw = self.take(self.u8(field + " length"), field)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise DescriptorError(f"{self.what}: {field} is not ASCII") from None


def parse(buf: bytes, pos: int, what: str) -> tuple[EngineAddress, int]:
    r = _Reader(buf, pos, what)
    magic = r.take(3, "magic")
    if magic != MAGIC:
        raise DescriptorError(
            f"{what} does not start with an asyncfabric engine address (magic {magic!r}, "
            f"expected {MAGIC!r}); pass the bytes of Engine.address"
        )
    ver = r.u8("version")
    if ver != VERSION:
        raise DescriptorError(f"{what} has address version {ver}; this asyncfabric reads {VERSION}")
    uid = r.take(8, "engine uid")
    host = r.take(8, "host id")
    pid = r.u32("pid")
    backend = r.text("backend")
    provider = r.text("provider")
    nd = r.u8("domain count")
    if not 1 <= nd <= MAX_DOMAINS:
        raise DescriptorError(f"{what} lists {nd} domains; expected 1 to {MAX_DOMAINS}")
    doms = tuple(r.take(r.u16("domain address length"), "domain address") for _ in range(nd))
    if any(len(d) == 0 for d in doms):
        raise DescriptorError(f"{what} has an empty domain address")
    return EngineAddress(uid, backend, provider, doms, host, pid), r.pos


@functools.lru_cache(maxsize=1)
def host_id() -> bytes:
    """8 bytes naming this boot of this host and this pid namespace (zeros when unknown)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            boot = f.read().strip()
        pidns = os.readlink("/proc/self/ns/pid").encode()
    except OSError:
        return bytes(8)
    return hashlib.sha256(boot + b"/" + pidns).digest()[:8] or bytes(8)
