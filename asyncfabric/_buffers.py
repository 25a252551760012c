"""Turning user buffers (bytes-like, numpy, torch host or GPU tensors) into pointer, size and
memory kind: shared by the engine and the transports, so neither needs the other."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._errors import RegionError


@dataclass(frozen=True, slots=True)
class BufferInfo:
    ptr: int
    nbytes: int
    readonly: bool
    owner: Any  # keeps the memory alive while registered
    device: str = "cpu"
    device_index: int = -1


def buffer_info(obj: Any) -> BufferInfo:
    """Describe the memory behind ``obj``; raise a clear error for what cannot be registered."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return _tensor_info(obj)
    if isinstance(obj, np.ndarray):
        if not obj.flags.c_contiguous:
            raise RegionError(
                f"numpy array with shape {obj.shape} and strides {obj.strides} is not "
                "C-contiguous; register np.ascontiguousarray(arr) instead"
            )
        arr = obj
    else:
        try:
            mv = memoryview(obj)
        except TypeError:
            raise TypeError(
                f"cannot register {type(obj).__name__}: asyncfabric takes bytes-like objects "
                "(bytearray, memoryview, mmap), numpy arrays and torch tensors"
            ) from None
        if not mv.c_contiguous:
            raise RegionError("memoryview is not C-contiguous; copy it into a bytearray first")
        arr = np.frombuffer(mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv, np.uint8)
    if arr.nbytes == 0:
        raise RegionError("cannot register an empty buffer (0 bytes)")
    return BufferInfo(
        ptr=int(arr.__array_interface__["data"][0]),
        nbytes=int(arr.nbytes),
        readonly=not arr.flags.writeable,
        owner=obj,
    )


def _tensor_info(t: Any) -> BufferInfo:
    if not t.is_contiguous():
        raise RegionError(
            f"tensor with shape {tuple(t.shape)} and stride {tuple(t.stride())} is not "
            "contiguous; register tensor.contiguous() instead"
        )
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        raise RegionError("cannot register an empty tensor (0 bytes)")
    dev = t.device
    return BufferInfo(
        ptr=int(t.data_ptr()),
        nbytes=int(nbytes),
        readonly=False,
        owner=t,
        device=dev.type,
        device_index=-1 if dev.index is None else int(dev.index),
    )
