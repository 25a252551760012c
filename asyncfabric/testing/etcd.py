"""Start a throwaway etcd on 127.0.0.1 (random free ports, a temp data dir) for tests."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator


class EtcdUnavailable(RuntimeError):
    """No etcd binary here, or it would not start."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def start_etcd(timeout: float = 30.0) -> Iterator[str]:
    """Run ``etcd`` until the block ends; yields its ``etcd://127.0.0.1:PORT`` URL."""
    exe = shutil.which("etcd") or (
        "/usr/bin/etcd" if shutil.os.path.exists("/usr/bin/etcd") else None  # type: ignore[attr-defined]
    )
    if exe is None:
        raise EtcdUnavailable(
            "no etcd binary (install Debian's etcd-server: apt-get install etcd-server)"
        )
    client, peer = _free_port(), _free_port()
    with tempfile.TemporaryDirectory(prefix="af-etcd-") as data:
        cu, pu = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
        proc = subprocess.Popen(
            [
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
                try:
                    with urllib.request.urlopen(f"{cu}/health", timeout=1) as r:
                        if b"true" in r.read():
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise EtcdUnavailable(f"etcd did not become healthy within {timeout} s")
                time.sleep(0.2)
            yield f"etcd://127.0.0.1:{client}"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
