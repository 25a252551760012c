"""Two hosts made of network namespaces and a veth pair, the tcp provider between them:
transfers work, a cut link fails transfers in bounded time (no hang), and after the
link comes back a new transfer succeeds."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time

import pytest

from asyncfabric.backends.libfabric import LibfabricBackend
from asyncfabric.testing.netns import TwoHosts, netns_available

PEER_TIMEOUT = 2.0

pytestmark = pytest.mark.skipif(
    "tcp" not in LibfabricBackend().providers(), reason="libfabric has no tcp provider here"
)


class Node:
    def __init__(self, hosts: TwoHosts, ns: str, addr: str) -> None:
        self.p = hosts.run(
            ns,
            [
                sys.executable,
                "-m",
                "asyncfabric.testing.netns_node",
                "tcp",
                addr,
                str(PEER_TIMEOUT),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._read(60) == "ready"

    def _read(self, timeout: float):
        import select

        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            raise TimeoutError(f"node gave no answer within {timeout} s")
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"node exited (rc={self.p.poll()})")
        status, value = json.loads(line)
        if status != "ok":
            raise RuntimeError(value)
        return value

    def call(self, *cmd, timeout: float = 60):
        self.p.stdin.write(json.dumps(list(cmd)) + "\n")
        self.p.stdin.flush()
        return self._read(timeout)


@pytest.fixture
def hosts():
    reason = netns_available()
    if reason is not None:
        pytest.skip(f"network namespaces not permitted here: {reason}")
    with TwoHosts(tcp_retries2=5) as h:
        yield h


def test_link_cut_and_restore(hosts):
    a = Node(hosts, hosts.ns_a, hosts.addr_a)
    b = Node(hosts, hosts.ns_b, hosts.addr_b)
    n = 1 << 20
    desc = b.call("alloc", n)

    # across the veth: a writes, b counts and checks the bytes
    a.call("write", desc, n, 1, 30)
    b.call("wait", 1, 1, 30)
    assert b.call("digest", n) == hashlib.sha256(bytes([0x5A]) * n).hexdigest()

    # cut the cable mid-transfer: writes fail with PeerUnreachable within a bound
    hosts.link_down()
    t_cut = time.monotonic()
    err = None
    sent = 0
    while time.monotonic() - t_cut < PEER_TIMEOUT + 20:
        try:
            a.call("write", desc, 65536, 2, PEER_TIMEOUT + 10, timeout=PEER_TIMEOUT + 30)
            sent += 1
        except RuntimeError as exc:
            err = str(exc)
            break
    took = time.monotonic() - t_cut
    print(
        f"\n[link-cut] first failure {took * 1e3:.0f} ms after the cut ({sent} writes done first)"
    )
    assert err is not None, "no transfer failed while the link was down"
    assert err.startswith("PeerUnreachable"), err
    assert took <= PEER_TIMEOUT + 3.0

    # the link comes back: a new transfer succeeds
    hosts.link_up()
    t_up = time.monotonic()
    deadline = t_up + 30
    while True:
        try:
            a.call("write", desc, n, 3, 10)
            b.call("wait", 3, 1, 20)
            break
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    print(f"[link-cut] transfer after link up done in {(time.monotonic() - t_up) * 1e3:.0f} ms")
    a.call("exit")
    b.call("exit")
