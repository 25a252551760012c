"""Two-host test topologies built from Linux network namespaces.

Failure tests for the libfabric ``tcp`` provider need two "hosts" whose link
can be cut and restored without touching the real network.  This module builds
them from network namespaces joined by a veth pair::

    ns_a [veth a: 10.213.X.1/24] <====> [veth b: 10.213.X.2/24] ns_b

Both veth ends are created directly inside their namespaces, so nothing
(no interface, no address, no route) ever appears in the caller's network
namespace; the 10.213.X.0/24 addresses exist only inside ours.

Usage::

    from asyncfabric.testing.netns import TwoHosts, netns_available

    reason = netns_available()
    if reason is not None:
        pytest.skip(reason)
    with TwoHosts() as hosts:
        srv = hosts.run(hosts.ns_b, ["fi_pingpong", "-p", "tcp", "-s", hosts.addr_b])
        cli = hosts.run(hosts.ns_a, ["fi_pingpong", "-p", "tcp", hosts.addr_b])
        ...
        hosts.link_down()      # cut the cable
        hosts.link_up()        # and plug it back in

Requirements: root (CAP_SYS_ADMIN + CAP_NET_ADMIN) and iproute2's ``ip``.
Everything is torn down on exit, including on exceptions; processes started
with :meth:`TwoHosts.run` that are still alive are terminated first (a process
left running inside a namespace would keep it, and its veth end, alive).
If a test process is SIGKILLed, its namespaces are left behind; they are
removed by :func:`cleanup_stale`, which :class:`TwoHosts` calls on entry.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal

__all__ = ["netns_available", "cleanup_stale", "TwoHosts", "NetnsError", "Side"]

Side = Literal["a", "b", "both"]

_IP_TIMEOUT_S = 10.0
_counter = itertools.count()
_counter_lock = threading.Lock()


class NetnsError(RuntimeError):
    """An ``ip`` command needed to build or drive the topology failed."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; raise NetnsError with its stderr if it fails and check is set."""
    try:
        proc = subprocess.run(
            ["ip", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_IP_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        if check:
            raise NetnsError(f"ip {' '.join(args)}: {exc}") from exc
        return subprocess.CompletedProcess(["ip", *args], 1, "", str(exc))
    if check and proc.returncode != 0:
        raise NetnsError(
            f"ip {' '.join(args)} failed (rc={proc.returncode}): {proc.stderr.strip()}"
        )
    return proc


@functools.lru_cache(maxsize=1)
def netns_available() -> str | None:
    """Return None if network namespaces + veth pairs can be created here.

    Otherwise return a human-readable reason, suitable for ``pytest.skip``.
    The check is done once per process (cached): it needs root and ``ip``,
    then really creates a throwaway namespace with a veth pair inside it.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN/CAP_NET_ADMIN); not running as root"
    if shutil.which("ip") is None:
        return "iproute2 'ip' command not found"
    probe = f"afprobe{os.getpid()}"
    res = _ip("netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"'ip netns add' failed: {(res.stderr or res.stdout).strip()}"
    try:
        res = _ip(
            "-n", probe, "link", "add", "pa", "type", "veth", "peer", "name", "pb", check=False
        )
        if res.returncode != 0:
            return f"cannot create a veth pair: {(res.stderr or res.stdout).strip()}"
        res = _ip("netns", "exec", probe, "ip", "link", "set", "lo", "up", check=False)
        if res.returncode != 0:
            return f"'ip netns exec' failed: {(res.stderr or res.stdout).strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(prefix: str = "af") -> list[str]:
    """Delete namespaces named by :class:`TwoHosts` whose owning process is gone.

    Names have the form ``{prefix}{pid}n{k}{a|b}``; a namespace is deleted only
    when no process with that pid exists.  Returns the names deleted.
    """
    res = _ip("netns", "list", check=False)
    if res.returncode != 0:
        return []
    pat = re.compile(rf"^{re.escape(prefix)}(\d+)n\d+[ab]$")
    removed: list[str] = []
    for line in res.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = pat.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            if _ip("netns", "del", name, check=False).returncode == 0:
                removed.append(name)
    return removed


class TwoHosts:
    """Context manager: two network namespaces joined by a veth pair.

    Attributes (valid inside the ``with`` block):

    * ``ns_a``, ``ns_b``: namespace names (use with ``ip netns exec`` or :meth:`run`)
    * ``veth_a``, ``veth_b``: the veth ends (``veth_a`` lives in ``ns_a``, ...)
    * ``addr_a``, ``addr_b``: ``10.213.X.1`` and ``10.213.X.2`` (prefix /24)

    ``X`` is derived from the pid (and a per-process counter) so that two
    topologies never share a subnet; as every address lives only inside its own
    namespaces, a coincidence would be harmless anyway.

    ``tcp_retries2``: if given, set ``net.ipv4.tcp_retries2`` in both namespaces
    (the setting is per network namespace, so the host is unaffected). With the
    kernel default of 15 an established TCP connection whose link is cut keeps
    retransmitting for ~15 minutes before the socket errors with ETIMEDOUT; a
    value like 3-5 makes a cut link surface as an error within seconds.
    """

    def __init__(self, prefix: str = "af", *, tcp_retries2: int | None = None) -> None:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,7}", prefix):
            raise ValueError("prefix must be 1-8 alphanumeric characters starting with a letter")
        self.prefix = prefix
        with _counter_lock:
            k = next(_counter)
        pid = os.getpid()
        self.ns_a = f"{prefix}{pid}n{k}a"
        self.ns_b = f"{prefix}{pid}n{k}b"
        # Interface names: IFNAMSIZ is 16 (15 chars); they only exist inside our namespaces.
        self.veth_a = f"{prefix}-a"
        self.veth_b = f"{prefix}-b"
        x = (pid + k) % 254 + 1
        self.subnet = f"10.213.{x}.0/24"
        self.addr_a = f"10.213.{x}.1"
        self.addr_b = f"10.213.{x}.2"
        self.tcp_retries2 = tcp_retries2
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._active = False

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> TwoHosts:
        reason = netns_available()
        if reason is not None:
            raise NetnsError(f"network namespaces unavailable: {reason}")
        cleanup_stale(self.prefix)
        try:
            for ns in (self.ns_a, self.ns_b):
                _ip("netns", "add", ns)
                self._created.append(ns)
            _ip(
                "link",
                "add",
                self.veth_a,
                "netns",
                self.ns_a,
                "type",
                "veth",
                "peer",
                "name",
                self.veth_b,
                "netns",
                self.ns_b,
            )
            for ns, dev, addr in (
                (self.ns_a, self.veth_a, self.addr_a),
                (self.ns_b, self.veth_b, self.addr_b),
            ):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", dev, "up")
                if self.tcp_retries2 is not None:
                    self._sysctl(ns, "net.ipv4.tcp_retries2", str(self.tcp_retries2))
        except BaseException:
            self.close()
            raise
        self._active = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Terminate processes started with :meth:`run`, then delete both namespaces
        (which destroys the veth pair). Idempotent; never raises for ``ip`` failures."""
        self._active = False
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        for p in self._procs:
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                try:
                    p.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    pass
        self._procs.clear()
        while self._created:
            _ip("netns", "del", self._created.pop(), check=False)

    # -- link control ------------------------------------------------------

    def _ends(self, side: Side) -> list[tuple[str, str]]:
        ends = {"a": [(self.ns_a, self.veth_a)], "b": [(self.ns_b, self.veth_b)]}
        if side == "both":
            return ends["a"] + ends["b"]
        if side not in ends:
            raise ValueError(f"side must be 'a', 'b' or 'both', not {side!r}")
        return ends[side]

    def link_down(self, side: Side = "both") -> None:
        """Cut the link: ``ip link set <veth> down`` on side a, b, or both.

        Downing either end drops the carrier on both (veth semantics); downing
        one end only leaves the other side's interface administratively up but
        with NO-CARRIER. On a downed side the connected /24 route disappears,
        so local sends there fail with EHOSTUNREACH/ENETUNREACH instead of
        being silently lost.
        """
        for ns, dev in self._ends(side):
            _ip("-n", ns, "link", "set", dev, "down")

    def link_up(self, side: Side = "both") -> None:
        """Restore the link (``ip link set <veth> up``); addresses are kept across down/up."""
        for ns, dev in self._ends(side):
            _ip("-n", ns, "link", "set", dev, "up")

    # -- running things inside -------------------------------------------

    @staticmethod
    def _sysctl(ns: str, key: str, value: str) -> None:
        _ip("netns", "exec", ns, "sysctl", "-q", "-w", f"{key}={value}")

    def sysctl(self, ns: str, key: str, value: str | int) -> None:
        """Set a per-namespace sysctl (e.g. ``net.ipv4.tcp_retries2``) inside ``ns``."""
        if not self._active:
            raise NetnsError("TwoHosts is not active (use it as a context manager)")
        self._sysctl(self._ns_name(ns), key, str(value))

    def wait_listening(self, ns: str, port: int, timeout: float = 10.0) -> bool:
        """Poll ``ss`` inside ``ns`` until some TCP socket listens on ``port``.

        Does not connect (so it does not consume a one-shot ``accept``).
        Returns False on timeout.
        """
        deadline = time.monotonic() + timeout
        while True:
            out = self.check_output(ns, ["ss", "-Hltn", f"sport = :{port}"], timeout=timeout)
            if out.strip():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _ns_name(self, ns: str) -> str:
        return {"a": self.ns_a, "b": self.ns_b}.get(ns, ns)

    def run(self, ns: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside namespace ``ns`` (a name, or ``"a"``/``"b"``) via
        ``ip netns exec``; extra keyword arguments go to :class:`subprocess.Popen`.

        The process is tracked and terminated on exit if still running.
        """
        if not self._active:
            raise NetnsError("TwoHosts is not active (use it as a context manager)")
        p: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", self._ns_name(ns), *argv], **popen_kwargs
        )
        self._procs.append(p)
        return p

    def check_output(self, ns: str, argv: Sequence[str], timeout: float = 30.0) -> str:
        """Run ``argv`` inside ``ns`` to completion and return its stdout (text);
        raise :class:`subprocess.CalledProcessError` on a non-zero exit."""
        return subprocess.run(
            ["ip", "netns", "exec", self._ns_name(ns), *argv],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        ).stdout

    def __repr__(self) -> str:
        return (
            f"TwoHosts({self.ns_a}:{self.veth_a}={self.addr_a} <-> "
            f"{self.ns_b}:{self.veth_b}={self.addr_b}, active={self._active})"
        )
