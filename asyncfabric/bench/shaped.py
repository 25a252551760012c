"""A rate-limited link between benchmark ranks: one network namespace a rank, a bridge.

``asyncfabric bench allreduce --link-rate 10gbit`` runs every rank in its own network
namespace, each joined by a veth pair to a bridge in a "switch" namespace, and limits
every port with ``tc`` (a token bucket, ``tbf``) on both of its ends: a rank sends at
most ``rate`` (its end's egress) and receives at most ``rate`` (the switch end's egress),
a full-duplex NIC of that speed::

    rank 0 [eth0 10.214.X.1] <=tbf=> [p0]-+
    rank 1 [eth0 10.214.X.2] <=tbf=> [p1]-+- br0 [10.214.X.254] (switch namespace)
    ...                                   |

Loopback tcp is not bandwidth-bound (the kernel's copies run on the cores that compute);
this is. The kernel still copies every byte on the same cores: the shaped link adds a
bound, it does not take the copies away.

Requirements: root (CAP_SYS_ADMIN, CAP_NET_ADMIN), iproute2's ``ip`` and ``tc``, and a
kernel with veth, bridge and sch_tbf. :func:`shaped_available` says why not.

A process enters a namespace with :func:`enter` (``setns``; the calling thread and the
threads it starts later). Everything is removed on exit, on exceptions too; namespaces
left by a killed process (names ``afl{pid}...``) are removed on the next entry.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import subprocess
from types import TracebackType

from ..testing.netns import NetnsError, _ip, _pid_alive, netns_available

__all__ = ["ShapedLink", "shaped_available", "parse_rate", "enter", "NetnsError"]

_CLONE_NEWNET = 0x40000000
_IFACE = "eth0"  # every rank's interface: the same name in every namespace
_PREFIX = "afl"


def parse_rate(text: str) -> int:
    """Bits per second of ``10gbit``, ``2.5gbit``, ``800mbit``, ``1e9`` (``tc``'s units)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kmgt]?)(bit|bps)?\s*", text.lower())
    if not m:
        raise ValueError(f"not a rate: {text!r} (examples: 2.5gbit, 800mbit)")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2)]
    if m.group(3) == "bps":  # tc: bps is bytes a second
        value *= 8
    if not 1e6 <= value <= 1e12:
        raise ValueError(f"rate {text!r} out of range (1 Mbit/s to 1 Tbit/s)")
    return int(value)


def _run(argv: list[str]) -> None:
    try:
        proc = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(argv)}: {exc}") from exc
    if proc.returncode:
        raise NetnsError(f"{' '.join(argv)} failed (rc={proc.returncode}): {proc.stderr.strip()}")


@functools.lru_cache(maxsize=1)
def shaped_available() -> str | None:
    """None if a shaped link can be built here, else why not (for errors and skips)."""
    reason = netns_available()
    if reason is not None:
        return reason
    if shutil.which("tc") is None:
        return "iproute2 'tc' command not found (it shapes the link)"
    probe = f"{_PREFIX}probe{os.getpid()}"
    if _ip("netns", "add", probe, check=False).returncode:
        return "'ip netns add' failed"
    try:
        for argv in (
            ["ip", "-n", probe, "link", "add", "prba", "type", "veth", "peer", "name", "prbb"],
            ["ip", "-n", probe, "link", "add", "prbr", "type", "bridge"],
            [
                "tc",
                "-n",
                probe,
                "qdisc",
                "add",
                "dev",
                "prba",
                "root",
                "tbf",
                "rate",
                "1gbit",
                "burst",
                "256kb",
                "limit",
                "1mb",
            ],  # fmt: skip
        ):
            try:
                _run(argv)
            except NetnsError as exc:
                return f"cannot build a shaped link: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def enter(ns: str) -> None:
    """Move the calling thread (and the threads it starts afterwards) into network
    namespace ``ns`` (as ``ip netns exec`` does, without its mount namespace)."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into network namespace {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _cleanup_stale() -> None:
    res = _ip("netns", "list", check=False)
    pat = re.compile(rf"^{_PREFIX}(\d+)n\d+(s|r\d+)$")
    for line in res.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = pat.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            _ip("netns", "del", name, check=False)


_count = 0


class ShapedLink:
    """Context manager: ``ranks`` namespaces on a bridge, every port limited to ``rate``
    bits a second each way.

    Inside: ``ns[i]`` (rank i's namespace), ``addr[i]`` (its address on ``iface``),
    ``switch_ns`` and ``switch_addr`` (the bridge's address, for a store all ranks reach).
    """

    def __init__(self, ranks: int, rate: int, *, burst: int | None = None, mtu: int = 9000) -> None:
        global _count
        if not 1 <= ranks <= 250:
            raise ValueError("ranks must be from 1 to 250")
        self.ranks, self.rate = ranks, rate
        # tbf's bucket: at least 1 ms at the rate (the timer's granularity stays well under
        # it) and at least 256 KiB (a 64 KiB GSO packet must fit); the queue 20 ms more
        self.burst = burst or max(256 << 10, rate // 8 // 1000)
        self.limit = self.burst + rate // 8 // 50
        _count += 1
        pid = os.getpid()
        self.switch_ns = f"{_PREFIX}{pid}n{_count}s"
        self.ns = [f"{_PREFIX}{pid}n{_count}r{i}" for i in range(ranks)]
        x = (pid + _count) % 254 + 1
        self.addr = [f"10.214.{x}.{i + 1}" for i in range(ranks)]
        self.switch_addr = f"10.214.{x}.254"
        self.iface = _IFACE
        self.mtu = mtu  # jumbo frames, as data-centre NICs run
        self._created: list[str] = []

    def _tbf(self, ns: str, dev: str) -> None:
        _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", str(self.rate),
              "burst", str(self.burst), "limit", str(self.limit)])  # fmt: skip

    def __enter__(self) -> ShapedLink:
        reason = shaped_available()
        if reason is not None:
            raise NetnsError(f"a shaped link needs root, ip and tc: {reason}")
        _cleanup_stale()
        try:
            sw = self.switch_ns
            _ip("netns", "add", sw)
            self._created.append(sw)
            _ip("-n", sw, "link", "add", "br0", "type", "bridge")
            _ip("-n", sw, "addr", "add", f"{self.switch_addr}/24", "dev", "br0")
            _ip("-n", sw, "link", "set", "lo", "up")
            _ip("-n", sw, "link", "set", "br0", "mtu", str(self.mtu), "up")
            for i, (ns, addr) in enumerate(zip(self.ns, self.addr)):
                port = f"p{i}"
                _ip("netns", "add", ns)
                self._created.append(ns)
                _ip("link", "add", self.iface, "netns", ns, "type", "veth",
                    "peer", "name", port, "netns", sw)  # fmt: skip
                _ip("-n", sw, "link", "set", port, "master", "br0")
                _ip("-n", sw, "link", "set", port, "mtu", str(self.mtu), "up")
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", self.iface)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", self.iface, "mtu", str(self.mtu), "up")
                self._tbf(ns, self.iface)  # what rank i sends
                self._tbf(sw, port)  # what rank i receives
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Delete every namespace (which deletes the veths, the bridge and the qdiscs).
        Idempotent, never raises. Processes still inside keep their namespace alive:
        end them first."""
        while self._created:
            _ip("netns", "del", self._created.pop(), check=False)

    def qdisc_stats(self) -> list[str]:
        """``tc -s qdisc`` of every rank's interface (sent bytes, drops, overlimits)."""
        out = []
        for ns in self.ns:
            res = subprocess.run(["tc", "-n", ns, "-s", "qdisc", "show", "dev", self.iface],
                                 capture_output=True, text=True, timeout=10)  # fmt: skip
            out.append(f"{ns}: {' '.join(res.stdout.split())}")
        return out
