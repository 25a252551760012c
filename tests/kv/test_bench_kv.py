"""`asyncfabric bench kv` runs end to end (tiny layout, no timing claims)."""

from __future__ import annotations

import json


def test_bench_kv_small(tmp_path, capsys):
    from asyncfabric.bench.kv import main

    out = tmp_path / "kv.json"
    rc = main(["--tokens", "64,200", "--layers", "2", "--reps", "1", "--impls",
               "kv,af-batch,af-paged", "--json", str(out)])  # fmt: skip
    assert rc == 0
    d = json.loads(out.read_text())
    got = {(r["impl"], r["tokens"]) for r in d["rows"]}
    assert got == {(i, t) for i in ("kv", "af-batch", "af-paged") for t in (64, 200)}
    for r in d["rows"]:
        assert r["ms"] > 0 and r["bytes"] == -(-r["tokens"] // 16) * 2 * 64 * 1024
    assert "kv" in capsys.readouterr().out
