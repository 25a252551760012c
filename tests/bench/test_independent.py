"""The independent baseline (asyncfabric/bench/independent): af_indep.c, libfabric alone.

It builds warning-free, moves the bytes it says it moves (the receiver checks
them, and a spoiled pattern is caught), returns timings in the shape the
runner uses, and is skipped with a message where it cannot be built.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from asyncfabric.backends.libfabric import LibfabricBackend
from asyncfabric.bench import cli, independent, schema
from asyncfabric.bench.runner import Runner

HAVE = set(LibfabricBackend().providers())
OK, WHY = independent.available()
needs_program = pytest.mark.skipif(not OK, reason=f"af_indep cannot be built here: {WHY}")
needs_shm = pytest.mark.skipif("shm" not in HAVE, reason="libfabric shm provider not available")
PROVIDERS = [p for p in ("shm", "tcp") if p in HAVE]


@needs_program
def test_program_builds_warning_free(tmp_path):
    cc = independent._compiler()
    assert cc
    cflags, ldflags = independent._libfabric_flags()
    out = tmp_path / "af_indep"
    res = subprocess.run(
        [cc, "-O2", "-Wall", "-Wextra", "-Werror", *cflags, "-o", str(out),
         str(independent.SOURCE), *ldflags],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == ""
    exe = independent.build()
    assert exe.is_file() and os.access(exe, os.X_OK)
    assert independent.build() == exe  # cached: same path, no rebuild
    # nothing of ours in it: libfabric's headers and the C library only
    src = independent.SOURCE.read_text()
    includes = [ln.split()[1] for ln in src.splitlines() if ln.startswith("#include")]
    libc = {"<errno.h>", "<inttypes.h>", "<sched.h>", "<stdarg.h>", "<stdint.h>", "<stdio.h>",
            "<stdlib.h>", "<string.h>", "<time.h>", "<unistd.h>"}  # fmt: skip
    assert includes and all(i.startswith("<rdma/") or i in libc for i in includes), includes


@needs_program
def test_cache_dir_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    exe = independent.build()
    assert exe.is_relative_to(tmp_path / "asyncfabric" / "independent")
    assert exe.name == "af_indep" and len(exe.parent.name) == 16


@needs_program
@pytest.mark.parametrize("provider", PROVIDERS or ["none"])
def test_small_bw_run(provider):
    if provider == "none":
        pytest.skip("no libfabric provider")
    r = independent.run_pair(provider, "bw", 64 << 10, 200, window=64, repeats=1)
    assert len(r["rep_s"]) == 1 and r["rep_s"][0] > 0
    assert r["times_ns"][0] > 0
    assert r["verified"] is True
    assert r["provider"].split(";")[0] == provider
    assert 1 <= r["window"] <= 64


@needs_program
@needs_shm
def test_small_pingpong_run():
    r = independent.run_pair("shm", "pingpong", 8, 50, repeats=2)
    assert len(r["rtts_ns"]) == 100 == r["rtt_count"]
    assert r["rtt_p99_us"] >= r["rtt_p50_us"] > 0
    assert r["verified"] is True
    # the C program's percentiles are schema.percentile's
    us = [t / 1e3 for t in r["rtts_ns"]]
    assert schema.percentile(us, 50) == pytest.approx(r["rtt_p50_us"], rel=0.01, abs=0.01)


@needs_program
@needs_shm
@pytest.mark.parametrize("mode", ["bw", "pingpong"])
def test_corrupted_bytes_are_caught(mode):
    with pytest.raises(independent.IndependentError) as ei:
        independent.run_pair("shm", mode, 64 << 10, 20, repeats=1, corrupt=True)
    assert ei.value.returncodes == (0, 3)
    assert "verification failed" in str(ei.value)
    assert "byte 32768" in ei.value.stderr[1]


@needs_program
def test_libfabric_errors_name_the_call():
    with pytest.raises(independent.IndependentError) as ei:
        independent.run_pair("no_such_provider_here", "bw", 4096, 10)
    assert ei.value.returncodes == (2, 2)
    assert "fi_getinfo failed" in str(ei.value)


@needs_program
def test_bad_usage_exits_2():
    res = subprocess.run([str(independent.build()), "--role", "both"], capture_output=True,
                         text=True)  # fmt: skip
    assert res.returncode == 2 and "--role is send or recv" in res.stderr


def _no_compiler(monkeypatch, tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no cached build either
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("LIBFABRIC_HOME", raising=False)


def test_no_compiler_is_a_clear_error(monkeypatch, tmp_path):
    _no_compiler(monkeypatch, tmp_path)
    with pytest.raises(RuntimeError, match="no C compiler"):
        independent.build()
    ok, why = independent.available()
    assert not ok and "no C compiler" in why


def test_missing_headers_say_what_to_install(monkeypatch, tmp_path):
    _no_compiler(monkeypatch, tmp_path)
    fake = tmp_path / "bin" / "cc"  # a compiler that finds no rdma/fabric.h
    fake.write_text("#!/bin/sh\necho 'fatal error: rdma/fabric.h: No such file' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match="apt-get install libfabric-dev"):
        independent.build()


def test_runner_skips_independent_when_it_cannot_build(monkeypatch, tmp_path):
    _no_compiler(monkeypatch, tmp_path)
    r = Runner("shm", ("asyncfabric", "raw", "independent"))  # no workers before __aenter__
    assert r.independent is False
    assert "no C compiler" in r.skipped["independent"]
    assert {"impl": "independent", "reason": r.skipped["independent"]} in r.skipped_list()


def test_runner_skips_independent_where_it_does_not_apply():
    assert "--connect" in Runner("shm", ("independent",), connect="h:1").skipped["independent"]
    assert "not verbs" in Runner("verbs", ("independent",)).skipped["independent"]


def _row(**kw):
    base = dict(suite="write", impl="asyncfabric", backend="libfabric", provider="shm",
                size_bytes=1024, iters=10, times_ns=[2_000_000], bytes_per_rep=10240,
                ops_per_rep=10)  # fmt: skip
    base.update(kw)
    return schema.make_row(**base)


def test_ratio_vs_independent():
    af, raw = _row(times_ns=[4_000_000]), _row(impl="raw", times_ns=[2_000_000])
    ind = _row(impl="independent", times_ns=[1_000_000])
    other = _row(size_bytes=2048)  # another point: no independent row there
    pa = _row(suite="pingpong", times_ns=[1], rtts_ns=[4000, 4000])
    pi = _row(suite="pingpong", impl="independent", times_ns=[1], rtts_ns=[1000, 1000])
    rows = [af, raw, ind, other, pa, pi]
    schema.add_ratios(rows)
    assert af["ratio_vs_independent"] == pytest.approx(0.25)
    assert raw["ratio_vs_independent"] == pytest.approx(0.5)
    assert af["ratio_vs_raw"] == pytest.approx(0.5)  # unchanged
    assert ind["ratio_vs_independent"] is None and ind["ratio_vs_raw"] is None
    assert other["ratio_vs_independent"] is None
    assert pa["ratio_vs_independent"] == pytest.approx(0.25)
    for r in rows:
        schema.validate_row(r)
    assert "ratio_vs_independent" in schema.FIELD_NAMES and "independent" in schema.IMPLS


@needs_program
@needs_shm
def test_bench_runs_independent_next_to_the_others(tmp_path, capsys):
    js = tmp_path / "out.json"
    rc = cli.main(["write", "pingpong", "--quick", "--sizes", "64K", "--iters", "40",
                   "--impls", "asyncfabric,raw,independent", "--no-progress",
                   "--json", str(js)])  # fmt: skip
    assert rc == 0
    doc = json.loads(js.read_text())
    rows = doc["rows"]
    for suite in ("write", "pingpong"):
        by = {r["impl"]: r for r in rows if r["suite"] == suite}
        assert set(by) == {"asyncfabric", "raw", "independent"}, suite
        ind = by["independent"]
        assert ind["gbps"] > 0 and ind["lat_p50_us"] > 0 and ind["provider"] == "shm"
        assert ind["ratio_vs_independent"] is None and ind["ratio_vs_raw"] is None
        assert by["asyncfabric"]["ratio_vs_independent"] > 0
        assert by["raw"]["ratio_vs_independent"] > 0
        assert by["asyncfabric"]["ratio_vs_raw"] > 0
    assert not [s for s in doc["skipped"] if s["impl"] == "independent"]
    assert "vs indep" in capsys.readouterr().out
