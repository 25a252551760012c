"""A rank that dies mid-layer fails the others' dispatch/combine within the bound."""

from __future__ import annotations

import pytest

from asyncfabric.testing.ranks import spawn_views

from . import ranks

TIMEOUT = 3.0


@pytest.mark.parametrize(
    "mode,combine",
    [("low_latency", "exact"), ("low_latency", "reduced"), ("high_throughput", "exact")],
)
def test_rank_killed_between_dispatch_and_combine(mode, combine):
    out = spawn_views(3, ranks.dies_mid_layer, (2, TIMEOUT, mode, combine), timeout=120)
    assert out[2][0] == "dead"
    for kind, res in out[:2]:
        assert kind == "ok", res
        assert res["error"] == "RankLost", res
        assert 2 in res["ranks"], res
        assert res["after_s"] < TIMEOUT + 2.0, res


def test_rank_killed_before_dispatch():
    out = spawn_views(3, ranks.dies_before_layer, (1, TIMEOUT), timeout=120)
    assert out[1][0] == "dead"
    for kind, res in (out[0], out[2]):
        assert kind == "ok", res
        assert res["error"] == "RankLost", res
        assert 1 in res["ranks"], res
        assert res["after_s"] < TIMEOUT + 2.0, res
