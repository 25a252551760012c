"""Groups across hosts: members in two network namespaces (the netns rig), talking tcp
through a store that lives on host a, on the embedded store and on etcd."""

from __future__ import annotations

import os
import time

import pytest
from group_procs import Node, StoreProc

from asyncfabric.backends.libfabric import LibfabricBackend
from asyncfabric.testing.etcd import EtcdUnavailable, start_etcd
from asyncfabric.testing.netns import TwoHosts, netns_available

TTL = 2.0
T = 60.0

pytestmark = pytest.mark.skipif(
    "tcp" not in LibfabricBackend().providers(), reason="libfabric has no tcp provider here"
)


@pytest.fixture
def hosts():
    reason = netns_available()
    if reason is not None:
        pytest.skip(f"network namespaces not permitted here: {reason}")
    with TwoHosts() as h:
        yield h


@pytest.mark.parametrize("kind", ["embedded", "etcd"])
def test_members_on_two_hosts(hosts, kind):
    ns_prefix = ["ip", "netns", "exec", hosts.ns_a]
    if kind == "embedded":
        store = StoreProc(f"{hosts.addr_a}:0", prefix=ns_prefix)
        url, stop = store.url, store.close
    else:
        pytest.importorskip("aetcd", reason="the etcd extra is not installed")
        try:
            ctx = start_etcd(host=hosts.addr_a, prefix=ns_prefix)
            url = ctx.__enter__()
        except EtcdUnavailable as exc:
            pytest.skip(f"etcd store tests skipped: {exc}")

        def stop():
            ctx.__exit__(None, None, None)

    group = f"hosts-{os.urandom(3).hex()}"
    nodes = []

    def node(name, ns, addr):
        n = Node(url, group, name, "tcp", addr, ttl=TTL,
                 spawn=lambda argv, **kw: hosts.run(ns, argv, **kw))  # fmt: skip
        nodes.append(n)
        return n

    try:
        a = node("a", hosts.ns_a, hosts.addr_a)
        b = node("b", hosts.ns_b, hosts.addr_b)
        c = node("c", hosts.ns_b, hosts.addr_b)
        for n in (a, b, c):
            assert n.call("wait_members", 3, T, timeout=T + 5) == ["a", "b", "c"]
        # one-sided writes across the veth, both ways, found through the store
        a.call("write", "b", 0xB0, 0x21, T, timeout=T + 5)
        assert b.call("wait_inbox", 0x21, T, timeout=T + 5) == [0xB0]
        c.call("write", "a", 0xA0, 0x22, T, timeout=T + 5)
        assert a.call("wait_inbox", 0x22, T, timeout=T + 5) == [0xA0]
        # a graceful leave on host b, seen on host a
        b.call("leave", timeout=T)
        assert a.call("wait_event", "Left", "b", T, timeout=T + 5)[:3] == ["Left", "b", "left"]
        # a member on host b killed: host a sees it expire within TTL + 1 s
        t_kill = time.monotonic()
        c.kill()
        ev = a.call("wait_event", "Left", "c", T, timeout=T + 5)
        assert ev[:3] == ["Left", "c", "expired"]
        assert ev[4] - t_kill <= TTL + 1.0
    finally:
        for n in nodes:
            n.close()
        stop()
