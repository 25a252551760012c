"""Start a throwaway etcd on 127.0.0.1 (random free ports, a temp data dir) for tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence


class EtcdUnavailable(RuntimeError):
    """No etcd binary here, or it would not start."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str, prefix: Sequence[str]) -> bool:
    if not prefix:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                return b"true" in r.read()
        except OSError:
            return False
    probe = (
        "import sys, urllib.request\n"
        "try: ok = b'true' in urllib.request.urlopen(sys.argv[1] + '/health', timeout=1).read()\n"
        "except OSError: ok = False\n"
        "sys.exit(0 if ok else 1)"
    )
    r = subprocess.run([*prefix, sys.executable, "-c", probe, url], capture_output=True, timeout=20)
    return r.returncode == 0


@contextlib.contextmanager
def start_etcd(
    timeout: float = 30.0, *, host: str = "127.0.0.1", prefix: Sequence[str] = ()
) -> Iterator[str]:
    """Run ``etcd`` until the block ends; yields its ``etcd://HOST:PORT`` URL.

    ``prefix`` runs it (and its health checks) under a wrapper, such as
    ``ip netns exec NS`` for an etcd on another "host" of a network-namespace rig."""
    exe = shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)
    if exe is None:
        raise EtcdUnavailable(
            "no etcd binary (install Debian's etcd-server: apt-get install etcd-server)"
        )
    client, peer = _free_port(), _free_port()  # free here; a fresh namespace has them all
    with tempfile.TemporaryDirectory(prefix="af-etcd-") as data:
        cu, pu = f"http://{host}:{client}", f"http://{host}:{peer}"
        proc = subprocess.Popen(
            [
                *prefix,
                exe,
                "--name", "af-test",
                "--data-dir", data,
                "--listen-client-urls", cu,
                "--advertise-client-urls", cu,
                "--listen-peer-urls", pu,
                "--initial-advertise-peer-urls", pu,
                "--initial-cluster", f"af-test={pu}",
                "--log-level", "error",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
                    raise EtcdUnavailable(f"etcd exited with {proc.returncode}: {err}")
                if _healthy(cu, prefix):
                    break
                if time.monotonic() > deadline:
                    raise EtcdUnavailable(f"etcd did not become healthy within {timeout} s")
                time.sleep(0.2)
            yield f"etcd://{host}:{client}"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
