"""Registered local memory: regions and their slices."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._buffers import BufferInfo
from .._errors import RegionError
from ..transport.contract import Registration
from ..transport.counting import expected_imms
from .descriptor import FLAG_REMOTE_READ, FLAG_REMOTE_WRITE, Descriptor, _slice_bounds

if TYPE_CHECKING:
    from .engine import Engine


class Region:
    """Memory registered with an engine. Slice it (``region[a:b]``) to name bytes to write from.

    Use as a context manager, or call :meth:`close`; a region with transfers in
    flight is unregistered when the last of them completes, and its buffer is
    kept alive until then.
    """

    __slots__ = (
        "_engine",
        "_info",
        "_reg",
        "_id",
        "_flags",
        "_closed",
        "_inflight",
        "_desc",
        "_fast",
        "_close_cbs",
        "__weakref__",
    )

    def __init__(
        self, engine: Engine, info: BufferInfo, reg: Registration, region_id: int, flags: int
    ) -> None:
        self._engine = engine
        self._info = info
        self._reg = reg
        self._id = region_id
        self._flags = flags
        self._closed = False
        self._inflight = 0
        self._desc: Descriptor | None = None
        self._close_cbs: list[Callable[[Region], None]] = []
        # What the engine's native fast path posts from (fastpath.py): host
        # memory the transport registered itself; GPU and staged memory take the
        # Python path, where the transport's wrappers see them.
        self._fast = (
            (reg.ptr, reg.handle, info.nbytes)
            if reg.device == "cpu" and not reg.staged and reg.ptr and reg.handle >= 0
            else None
        )

    @property
    def nbytes(self) -> int:
        """Size of the registered memory in bytes."""
        return self._info.nbytes

    @property
    def buffer(self) -> Any:
        """The registered object (kept alive by the region)."""
        return self._info.owner

    @property
    def ptr(self) -> int:
        """Address of the registered memory."""
        return self._info.ptr

    @property
    def device(self) -> str:
        """Where the memory lives (``"cpu"``, ``"cuda"``)."""
        return self._info.device

    @property
    def staged(self) -> bool:
        """True for GPU memory that travels through a pinned host mirror (docs/gpu.md)."""
        return self._reg.staged

    @property
    def registration(self) -> Registration:
        """The transport's registration: its handle, and per domain the key and base."""
        return self._reg

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (or the engine closed)."""
        return self._closed

    @property
    def engine(self) -> Engine:
        """The engine this region is registered with."""
        return self._engine

    def __len__(self) -> int:
        return self._info.nbytes

    def __getitem__(self, s: slice) -> RegionSlice:
        start, stop = _slice_bounds(s, self._info.nbytes, "region")
        return RegionSlice(self, start, stop - start)

    def descriptor(self) -> Descriptor:
        """What a peer needs to write into this region; send ``bytes(desc)`` out of band."""
        self._check()
        if self._desc is None:
            self._desc = Descriptor(
                address=self._engine._addr,
                region_id=self._id,
                nbytes=self._info.nbytes,
                chunk_bytes=self._engine.chunk_bytes,
                bases=self._reg.bases,
                keys=self._reg.keys,
                flags=self._flags,
                ext=self._reg.ext,
            )
        return self._desc

    def expected_imms(self, nbytes: int | None = None, *, pages: int | None = None) -> int:
        """Immediates a write of ``nbytes`` (or ``pages`` pages) into this region delivers."""
        if pages is not None:
            return expected_imms(pages=pages)
        n = self._info.nbytes if nbytes is None else nbytes
        return expected_imms(n, chunk_bytes=self._engine.chunk_bytes)

    def _check(self) -> None:
        if self._closed:
            raise RegionError("region was unregistered; register the buffer again to use it")
        self._engine._check_open()

    def on_close(self, callback: Callable[[Region], None]) -> None:
        """Call ``callback(region)`` once when the region closes (or its engine does).

        Systems that hand the descriptor out (a group's named descriptors) use it to
        revoke what they published. A callback must not raise; one that does is
        reported through the event loop's exception handler, and the others still run."""
        if not callable(callback):
            raise TypeError(f"on_close takes a callable, got {type(callback).__name__}")
        if self._closed:
            _call(callback, self)
            return
        self._close_cbs.append(callback)

    def _run_close_cbs(self) -> None:
        cbs, self._close_cbs = self._close_cbs, []
        for cb in cbs:
            _call(cb, self)

    def close(self) -> None:
        """Unregister: peers' writes through its descriptor are refused from now on."""
        if self._closed:
            return
        self._closed = True
        self._engine._regions.pop(self._id, None)
        if self._inflight == 0:
            self._engine._deregister(self)
        self._run_close_cbs()

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._info.nbytes} bytes"
        return f"<Region {self._id} {state} on {self._info.device}>"


@dataclass(frozen=True, slots=True)
class RegionSlice:
    """A byte range ``[offset, offset + nbytes)`` of a local region."""

    region: Region
    offset: int
    nbytes: int


def _call(cb: Callable[[Region], None], region: Region) -> None:
    try:
        cb(region)
    except Exception as exc:  # a bystander's bug must not break close()
        import asyncio

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.call_exception_handler(
            {"message": "Region.on_close callback failed", "exception": exc}
        )


def flags_for(remote_write: bool, remote_read: bool) -> int:
    return (FLAG_REMOTE_WRITE if remote_write else 0) | (FLAG_REMOTE_READ if remote_read else 0)
