"""examples/moe_layer.py runs: one MoE layer over 4 processes equals the local layer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "moe_layer.py"


def test_moe_layer_example():
    p = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True,
                       timeout=240)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("rank ")]
    assert len(lines) == 4 and all("max |ep - local|" in ln for ln in lines), p.stdout
