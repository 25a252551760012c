"""Where the benchmark's buffers live: ``--device cpu`` (host numpy, the default) or CUDA.

``cuda`` means the sender on GPU 0 and the receiver on GPU 1 (GPU 0 too when only
one is visible); ``cuda:N`` puts both on GPU N; ``A,B`` names the sender's and
the receiver's device (``cuda:0,cuda:1``, ``cpu,cuda:1``). Only the ``write``
and ``pingpong`` suites take CUDA buffers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GPU_SUITES = ("write", "pingpong")
_ONE = re.compile(r"^(cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Devices:
    tx: str
    rx: str

    @property
    def cuda(self) -> bool:
        return self.tx != "cpu" or self.rx != "cpu"

    def label(self, cuda_path: str = "") -> str:
        if not self.cuda:
            return "cpu"
        return f"{self.tx}->{self.rx}" + (f" {cuda_path}" if cuda_path else "")


def parse_device(text: str) -> Devices:
    """``cpu``, ``cuda``, ``cuda:N`` or ``SENDER,RECEIVER``; ValueError names what is wrong."""
    parts = [p.strip().lower() for p in (text or "cpu").split(",")]
    if len(parts) > 2 or not all(_ONE.match(p) for p in parts):
        raise ValueError(
            f"--device {text!r}: use cpu, cuda, cuda:N, or SENDER,RECEIVER such as cuda:0,cuda:1"
        )
    if len(parts) == 1:
        return Devices("cuda", "cuda") if parts[0] == "cuda" else Devices(parts[0], parts[0])
    return Devices(parts[0], parts[1])


def resolve(d: Devices, ngpu: int) -> Devices:
    """Give a bare ``cuda`` its GPU: sender on 0, receiver on 1 (0 with one GPU)."""
    tx = "cuda:0" if d.tx == "cuda" else d.tx
    rx = ("cuda:1" if ngpu > 1 else "cuda:0") if d.rx == "cuda" else d.rx
    return Devices(tx, rx)


def unavailable(d: Devices) -> str | None:
    """Why these devices cannot be used here (None when they can)."""
    if not d.cuda:
        return None
    try:
        import torch
    except ImportError:
        return "--device cuda needs torch with CUDA (pip install torch); skipped"
    if not torch.cuda.is_available():
        return "--device cuda: no CUDA device visible (torch.cuda.is_available() is False); skipped"
    n = torch.cuda.device_count()
    for x in (d.tx, d.rx):
        if x.startswith("cuda:") and int(x[5:]) >= n:
            return f"--device: {x} does not exist ({n} CUDA device(s) visible); skipped"
    return None
