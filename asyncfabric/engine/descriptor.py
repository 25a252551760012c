"""Descriptors: what a peer needs to write into a registered region.

A descriptor is compact binary (never pickle), versioned, and carries the
owner's engine address plus, for each domain, the base address and key.

Layout (little endian, version 1)::

    b"AFD" u8 version | u8 flags | u32 region id | u64 nbytes | u64 chunk_bytes
    | u8 ndomains | per domain: u64 base, u64 key | engine address (see _address)
    [| u16 len + backend extension bytes, when FLAG_EXT is set]

FLAG_STAGED marks a GPU region whose writes land in a pinned host mirror first
(the staged path, see docs/gpu.md); FLAG_EXT carries what a backend needs beyond
base and key (a CUDA IPC handle for cuda_ipc).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from .._errors import DescriptorError, RegionError
from ..transport.counting import expected_imms
from .address import MAX_DOMAINS, EngineAddress, _Reader, parse

MAGIC = b"AFD"
VERSION = 1
FLAG_REMOTE_WRITE = 1
FLAG_REMOTE_READ = 2
FLAG_STAGED = 4
FLAG_EXT = 8
_KNOWN_FLAGS = FLAG_REMOTE_WRITE | FLAG_REMOTE_READ | FLAG_STAGED | FLAG_EXT


@dataclass(frozen=True, eq=False)
class Descriptor:
    """A peer's registered region, as received out of band. Slice it to address bytes in it."""

    address: EngineAddress
    region_id: int
    nbytes: int
    chunk_bytes: int
    bases: tuple[int, ...]
    keys: tuple[int, ...]
    flags: int = FLAG_REMOTE_WRITE | FLAG_REMOTE_READ
    ext: bytes = b""
    # per-engine routes (Engine._route), keyed by engine uid (not part of the value)
    _cache: dict[bytes, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A descriptor may be built or edited by hand (dataclasses.replace); every field
        # must still fit the wire format, or a transport would meet it as a raw
        # OverflowError deep in a post.
        if not isinstance(self.address, EngineAddress):
            raise DescriptorError("descriptor address must be an EngineAddress")
        _u("region_id", self.region_id, 32)
        _u("nbytes", self.nbytes, 64, low=1)
        _u("chunk_bytes", self.chunk_bytes, 64, low=1)
        _u("flags", self.flags, 8)
        if self.flags & ~_KNOWN_FLAGS:
            raise DescriptorError(f"descriptor has unknown flags {self.flags:#x}")
        nd = len(self.bases)
        if not 1 <= nd <= MAX_DOMAINS or len(self.keys) != nd:
            raise DescriptorError(
                f"descriptor has {nd} bases and {len(self.keys)} keys; expected the same "
                f"number, 1 to {MAX_DOMAINS}"
            )
        for i, (b, k) in enumerate(zip(self.bases, self.keys)):
            _u(f"domain {i} base", b, 64)
            _u(f"domain {i} key", k, 64)
            if b + self.nbytes > 1 << 64:
                raise DescriptorError(
                    f"descriptor domain {i}: base {b:#x} + nbytes {self.nbytes} passes 2**64"
                )
        if not isinstance(self.ext, bytes) or len(self.ext) > 0xFFFF:
            raise DescriptorError("descriptor ext must be bytes of at most 65535")

    @property
    def remote_write(self) -> bool:
        """Whether peers may write into the region (it was registered with ``remote_write``)."""
        return bool(self.flags & FLAG_REMOTE_WRITE)

    @property
    def remote_read(self) -> bool:
        """Whether peers may read the region (it was registered with ``remote_read``)."""
        return bool(self.flags & FLAG_REMOTE_READ)

    @property
    def staged(self) -> bool:
        """True when the target is GPU memory reached through a pinned host mirror."""
        return bool(self.flags & FLAG_STAGED)

    def __getitem__(self, s: slice) -> RemoteSlice:
        start, stop = _slice_bounds(s, self.nbytes, "remote region")
        return RemoteSlice(self, start, stop - start)

    def __len__(self) -> int:
        return self.nbytes

    def expected_imms(self, nbytes: int | None = None, *, pages: int | None = None) -> int:
        """Immediates one write of ``nbytes`` (default: the whole region) or ``pages`` delivers."""
        if pages is not None:
            return expected_imms(pages=pages)
        return expected_imms(
            self.nbytes if nbytes is None else nbytes, chunk_bytes=self.chunk_bytes
        )

    def to_bytes(self) -> bytes:
        """The wire format (also ``bytes(desc)``): send this to the peer out of band."""
        head = struct.pack(
            "<3sBBIQQB",
            MAGIC,
            VERSION,
            (self.flags | FLAG_EXT) if self.ext else (self.flags & ~FLAG_EXT),
            self.region_id,
            self.nbytes,
            self.chunk_bytes,
            len(self.bases),
        )
        body = b"".join(struct.pack("<QQ", b, k) for b, k in zip(self.bases, self.keys))
        tail = struct.pack("<H", len(self.ext)) + self.ext if self.ext else b""
        return head + body + self.address.to_bytes() + tail

    def __bytes__(self) -> bytes:
        return self.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Descriptor:
        """Parse :meth:`to_bytes` output; malformed input raises :class:`DescriptorError`."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"descriptor must be bytes, got {type(data).__name__}")
        buf = bytes(data)
        r = _Reader(buf, 0, "descriptor")
        magic = r.take(3, "magic")
        if magic != MAGIC:
            raise DescriptorError(
                f"not an asyncfabric descriptor (magic {magic!r}, expected {MAGIC!r}); "
                "pass the bytes of Region.descriptor()"
            )
        ver = r.u8("version")
        if ver != VERSION:
            raise DescriptorError(f"descriptor version {ver}; this asyncfabric reads {VERSION}")
        flags = r.u8("flags")
        if flags & ~_KNOWN_FLAGS:
            raise DescriptorError(f"descriptor has unknown flags {flags:#x}")
        region_id = r.u32("region id")
        nbytes = r.u64("nbytes")
        chunk = r.u64("chunk_bytes")
        if nbytes == 0 or chunk == 0:
            raise DescriptorError("descriptor has a zero size or zero chunk_bytes")
        nd = r.u8("domain count")
        if not 1 <= nd <= MAX_DOMAINS:
            raise DescriptorError(f"descriptor lists {nd} domains; expected 1 to {MAX_DOMAINS}")
        bases, keys = [], []
        for _ in range(nd):
            bases.append(r.u64("domain base"))
            keys.append(r.u64("domain key"))
        address, end = parse(buf, r.pos, "descriptor")
        if len(address.domains) != nd:
            raise DescriptorError(
                f"descriptor has {nd} domain keys but its engine address lists "
                f"{len(address.domains)} domains"
            )
        ext = b""
        if flags & FLAG_EXT:
            r2 = _Reader(buf, end, "descriptor")
            ext = r2.take(r2.u16("extension length"), "extension")
            end = r2.pos
            flags &= ~FLAG_EXT
        if end != len(buf):
            raise DescriptorError(f"descriptor has {len(buf) - end} trailing bytes")
        return cls(address, region_id, nbytes, chunk, tuple(bases), tuple(keys), flags, ext)


@dataclass(frozen=True, slots=True)
class RemoteSlice:
    """A byte range ``[offset, offset + nbytes)`` of a peer's region."""

    descriptor: Descriptor
    offset: int
    nbytes: int


def _u(name: str, v: object, bits: int, low: int = 0) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v < 1 << bits:
        raise DescriptorError(
            f"descriptor {name} is {v!r}, outside [{low}, 2**{bits}): the descriptor was "
            "forged or corrupted; use Descriptor.from_bytes on bytes from Region.descriptor()"
        )


def _slice_bounds(s: object, n: int, what: str) -> tuple[int, int]:
    if not isinstance(s, slice):
        raise TypeError(f"index a {what} with a byte slice like [start:stop], not {s!r}")
    if s.step not in (None, 1):
        raise RegionError(f"{what} slices must be contiguous (step 1), got step {s.step}")
    start = 0 if s.start is None else s.start
    stop = n if s.stop is None else s.stop
    if not isinstance(start, int) or not isinstance(stop, int):
        raise TypeError(f"{what} slice bounds must be ints")
    if start < 0:
        start += n
    if stop < 0:
        stop += n
    if not 0 <= start <= stop <= n:
        raise RegionError(f"slice [{s.start}:{s.stop}] is out of range for a {what} of {n} bytes")
    return start, stop
