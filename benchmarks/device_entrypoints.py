"""Make the checkout's plugins visible without installing it (the GPU device machine).

The backends and wrappers are found through entry points, which only an installed
distribution declares. On the device machine the package runs from the checkout on
PYTHONPATH, so this writes a minimal ``asyncfabric-0.dist-info`` (METADATA and
entry_points.txt, read from pyproject.toml) into the directory given, which must be on
sys.path too. Usage: python3 benchmarks/device_entrypoints.py /tmp/site
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib

root = Path(__file__).resolve().parent.parent
project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
dist = Path(sys.argv[1]) / "asyncfabric-0.dist-info"
dist.mkdir(parents=True, exist_ok=True)
(dist / "METADATA").write_text("Metadata-Version: 2.1\nName: asyncfabric\nVersion: 0\n")
lines = []
for group, eps in project.get("entry-points", {}).items():
    lines.append(f"[{group}]")
    lines += [f"{name} = {target}" for name, target in eps.items()]
    lines.append("")
(dist / "entry_points.txt").write_text("\n".join(lines))
print(f"entry points of {len(project.get('entry-points', {}))} groups in {dist}")
