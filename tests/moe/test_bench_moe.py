"""`asyncfabric bench moe` runs end to end on tiny shapes (the numbers are not checked here:
speed is the benchmark's business, not a unit test's)."""

from __future__ import annotations

import json

from asyncfabric.bench.moe import main


def test_bench_moe_tiny(tmp_path, capsys):
    out = tmp_path / "moe.json"
    rc = main(["--ep", "2", "--experts", "8", "--hidden", "64", "--tokens", "8",
               "--prefill-tokens", "32", "--iters", "2", "--prefill-iters", "1", "--warmup", "1",
               "--json", str(out)])  # fmt: skip
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    got = {(r["impl"], r["phase"], r["op"]) for r in rows}
    for impl in ("asyncfabric-ll", "asyncfabric-ht", "gloo"):
        assert (impl, "decode", "dispatch") in got and (impl, "decode", "combine") in got
    assert ("asyncfabric-ht", "prefill", "combine") in got and (
        "gloo",
        "prefill",
        "dispatch",
    ) in got
    assert all(r["p50_us"] > 0 and r["samples"] == 2 * (2 if r["phase"] == "decode" else 1)
               for r in rows)  # fmt: skip
    assert "xchg p50" in capsys.readouterr().out


def test_bench_moe_fp8_impls(capsys):
    rc = main(["--ep", "2", "--experts", "8", "--hidden", "64", "--tokens", "8",
               "--prefill-tokens", "16", "--iters", "1", "--prefill-iters", "1", "--warmup", "1",
               "--impls", "ll-fp8,ht-fp8"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "asyncfabric-ll-fp8" in out and "asyncfabric-ht-fp8" in out
