"""fp8 dispatch's error against the unquantized MoE layer, in one process (no transport:
tests/moe/test_fp8.py shows the fabric result equals ``reference(..., quant="fp8")`` bit for
bit). Prints one line per shape; docs/moe.md quotes them.

    .venv/bin/python benchmarks/moe_fp8_error.py
"""

from __future__ import annotations

import torch

from asyncfabric.moe import reference


def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
    return rows * (1.0 + e / 8) - e / 64


def main() -> None:
    torch.manual_seed(0)
    shapes = [(7168, 128, 256, 8, torch.bfloat16), (7168, 128, 256, 1, torch.bfloat16),
              (7168, 128, 256, 8, torch.float32), (60, 24, 16, 4, torch.float32)]  # fmt: skip
    for H, T, E, k, dt in shapes:
        x = torch.randn(T, H).to(dt)
        idx = torch.rand(T, E).argsort(1)[:, :k]
        w = torch.rand(T, k)
        w = w / w.sum(1, keepdim=True)
        a = reference(x, idx, w, expert).float()
        b = reference(x, idx, w, expert, quant="fp8").float()
        rel = float((a - b).norm() / a.norm())
        worst = float(((a - b).abs().amax(1) / a.abs().amax(1)).max())
        print(f"hidden {H} tokens {T} experts {E} top-{k} {str(dt)[6:]}: relative L2 error "
              f"{rel:.4f}, worst token max|err|/max|y| {worst:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
