"""Tests for asyncfabric.testing.netns (two-host network-namespace topology).

Skipped, with the reason from netns_available(), where namespaces cannot be
created (not root, no iproute2, restricted container...).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

try:
    from asyncfabric.testing.netns import NetnsError, TwoHosts, netns_available
except ImportError:  # running pytest without the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from asyncfabric.testing.netns import NetnsError, TwoHosts, netns_available

_reason = netns_available()
pytestmark = pytest.mark.skipif(_reason is not None, reason=str(_reason))

PORT = 45678  # private to our namespaces, cannot clash with the host

# Echo server: accepts connections forever, echoes 4 bytes each.
SERVER = (
    "import socket, sys\n"
    "l = socket.socket()\n"
    "l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "l.bind((sys.argv[1], int(sys.argv[2])))\n"
    "l.listen()\n"
    "while True:\n"
    "    c, _ = l.accept()\n"
    "    c.sendall(c.recv(4))\n"
    "    c.close()\n"
)
# Client: exit 0 and print the echo on success, exit 1 with the error otherwise.
CLIENT = (
    "import socket, sys\n"
    "try:\n"
    "    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))\n"
    "    s.sendall(b'ping')\n"
    "    print(s.recv(4).decode())\n"
    "except OSError as e:\n"
    "    print(type(e).__name__, e)\n"
    "    sys.exit(1)\n"
)


def _netns_list() -> str:
    return subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout


def _connect(h: TwoHosts, timeout: float = 2.0) -> subprocess.CompletedProcess[str]:
    """Connect from ns_a to the echo server at addr_b."""
    return subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            h.ns_a,
            sys.executable,
            "-c",
            CLIENT,
            h.addr_b,
            str(PORT),
            str(timeout),
        ],
        capture_output=True,
        text=True,
        timeout=timeout + 10,
    )


def _start_server(h: TwoHosts) -> subprocess.Popen[bytes]:
    srv = h.run(h.ns_b, [sys.executable, "-c", SERVER, h.addr_b, str(PORT)])
    assert h.wait_listening(h.ns_b, PORT, timeout=10), "echo server did not start"
    return srv


def test_create_addresses_and_reach() -> None:
    with TwoHosts() as h:
        names = _netns_list()
        assert h.ns_a in names and h.ns_b in names
        assert h.addr_a.startswith("10.213.") and h.addr_a.endswith(".1")
        assert h.addr_b == h.addr_a[:-1] + "2"
        assert f"{h.addr_a}/24" in h.check_output(
            h.ns_a, ["ip", "-br", "addr", "show", "dev", h.veth_a]
        )
        assert f"{h.addr_b}/24" in h.check_output(
            "b", ["ip", "-br", "addr", "show", "dev", h.veth_b]
        )
        # the addresses exist only inside our namespaces
        host_addrs = subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True).stdout
        assert h.addr_a not in host_addrs and h.addr_b not in host_addrs
        # loopback is up inside
        assert "LOOPBACK,UP" in h.check_output("a", ["ip", "link", "show", "lo"])
        _start_server(h)
        r = _connect(h)
        assert r.returncode == 0 and r.stdout.strip() == "ping", r.stdout + r.stderr


@pytest.mark.parametrize("side", ["both", "a", "b"])
def test_link_down_and_up(side: str) -> None:
    with TwoHosts() as h:
        _start_server(h)
        assert _connect(h).returncode == 0
        h.link_down(side)  # type: ignore[arg-type]
        r = _connect(h, timeout=1.0)
        assert r.returncode == 1, f"connect should fail with the link down ({side}): {r.stdout}"
        h.link_up()
        r = _connect(h)
        assert r.returncode == 0 and r.stdout.strip() == "ping", r.stdout + r.stderr


def test_cleanup_on_exit_and_on_exception() -> None:
    with TwoHosts() as h:
        srv = _start_server(h)
        names = (h.ns_a, h.ns_b)
    assert srv.poll() is not None, "process started with run() must be terminated on exit"
    listed = _netns_list()
    assert all(n not in listed for n in names)

    with pytest.raises(RuntimeError, match="boom"):
        with TwoHosts() as h2:
            names = (h2.ns_a, h2.ns_b)
            raise RuntimeError("boom")
    listed = _netns_list()
    assert all(n not in listed for n in names)


def test_two_topologies_coexist() -> None:
    with TwoHosts() as h1, TwoHosts() as h2:
        assert {h1.ns_a, h1.ns_b}.isdisjoint({h2.ns_a, h2.ns_b})
        assert h1.addr_a != h2.addr_a
        _start_server(h1)
        _start_server(h2)
        assert _connect(h1).returncode == 0
        assert _connect(h2).returncode == 0


def test_run_requires_active() -> None:
    h = TwoHosts()
    with pytest.raises(NetnsError):
        h.run("a", ["true"])
