"""`asyncfabric bench group` runs end to end (tiny sizes; numbers come from real runs)."""

from __future__ import annotations

import json

from asyncfabric.bench.cli import main


def test_bench_group_runs(tmp_path, capsys):
    out = tmp_path / "g.json"
    args = ["group", "--members", "3", "--lookups", "5", "--stores", "embedded"]
    assert main([*args, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["store"] for r in rows] == ["embedded"]
    assert rows[0]["members"] == 3 and rows[0]["lookup_p50_us"] > 0
    assert "join_all_s" in capsys.readouterr().out
