"""What the all-reduce needs of a tensor: its address, length and dtype code.

Accepts contiguous torch tensors (CPU; CUDA tensors go through a host copy, see
allreduce.py) and numpy arrays. The dtype codes are the native kernels' (_kernels.c).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

F32, F16, BF16 = 0, 1, 2
ITEMSIZE = {F32: 4, F16: 2, BF16: 2}
NAMES = {F32: "float32", F16: "float16", BF16: "bfloat16"}


@dataclass(frozen=True)
class Flat:
    """A tensor seen as flat memory: where it is, how many values, which dtype."""

    ptr: int
    numel: int
    dtype: int
    shape: tuple[int, ...]
    obj: Any  # keeps the tensor alive while its memory is used

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


def _torch_dtype(t: Any) -> int | None:
    import torch

    return {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16}.get(t.dtype)


def flat(t: Any, what: str = "tensor") -> Flat:
    """``t`` as a :class:`Flat`; raises TypeError/ValueError naming what is wrong."""
    if isinstance(t, np.ndarray):
        code = {np.dtype(np.float32): F32, np.dtype(np.float16): F16}.get(t.dtype)
        if code is None:
            raise TypeError(
                f"{what} has dtype {t.dtype}; all_reduce takes float32 or float16 numpy "
                "arrays (bfloat16: pass a torch tensor)"
            )
        if not t.flags.c_contiguous:
            raise ValueError(f"{what} is not contiguous; pass np.ascontiguousarray(...) of it")
        if not t.flags.writeable:
            raise ValueError(f"{what} is read-only; all_reduce writes the sum into it")
        return Flat(int(t.ctypes.data), int(t.size), code, tuple(t.shape), t)
    mod = type(t).__module__
    if mod.startswith("torch"):
        code = _torch_dtype(t)
        if code is None:
            raise TypeError(
                f"{what} has dtype {t.dtype}; all_reduce takes float32, float16 or bfloat16"
            )
        if not t.is_contiguous():
            raise ValueError(f"{what} is not contiguous; pass .contiguous() of it")
        if t.device.type != "cpu":
            raise ValueError(f"{what} is on {t.device}; this path takes CPU tensors")
        return Flat(int(t.data_ptr()), int(t.numel()), code, tuple(t.shape), t)
    raise TypeError(
        f"{what} is a {type(t).__name__}; all_reduce takes a torch tensor or a numpy array"
    )
