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


def test_bench_moe_reduced_impls(capsys):
    rc = main(["--ep", "2", "--experts", "8", "--hidden", "64", "--tokens", "8",
               "--prefill-tokens", "0", "--iters", "2", "--warmup", "1",
               "--impls", "ll-exact,ll-red,ll-red-bf16,gloo,gloo-red"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    for impl in ("asyncfabric-ll-red-bf16", "gloo-red"):
        assert impl in out
    assert " step " in out


def test_gloo_reduced_baseline_sums_like_the_reference():
    """The gloo-red baseline does the same pre-reduced sum as combine="reduced" (so the
    comparison is fair), not the top-k order one."""
    import multiprocessing as mp
    import socket

    from .ranks import gloo_reduced_baseline

    W = 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=gloo_reduced_baseline, args=(r, W, port, q)) for r in range(W)]
    for p in ps:
        p.start()
    try:
        got = dict(q.get(timeout=120) for _ in ps)
    finally:
        for p in ps:
            p.join(timeout=30)
    for r in range(W):
        assert got[r] and all(eq for eq, _ in got[r]), got
        assert not all(top for _, top in got[r]), "the orders should differ at top-5"
