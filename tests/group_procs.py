"""Processes for the group tests: an embedded store server and group members."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

SECRET = "group-test-secret-0123456789"


def env(secret: str = SECRET) -> dict[str, str]:
    return {**os.environ, "ASYNCFABRIC_STORE_SECRET": secret}


class StoreProc:
    """``asyncfabric store serve`` in a child process (the CLI, as users run it)."""

    def __init__(self, listen: str = "127.0.0.1:0", prefix: list[str] | None = None) -> None:
        self.listen = listen
        self.prefix = prefix or []
        self.p: subprocess.Popen[str] | None = None
        self.url = ""
        self.start()

    def start(self) -> None:
        self.p = subprocess.Popen(
            [
                *self.prefix,
                sys.executable,
                "-m",
                "asyncfabric",
                "store",
                "serve",
                "--listen",
                self.listen,
            ],
            env=env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        r, _, _ = select.select([self.p.stdout], [], [], 60)
        line = self.p.stdout.readline() if r else ""
        if "serving" not in line:
            self.p.kill()
            raise RuntimeError(f"store did not start: {line!r} {self.p.stderr.read()!r}")
        self.url = line.split()[-1]
        host, _, port = self.url[len("af://") :].rpartition(":")
        self.listen = f"{host}:{port}"  # a restart comes back on the same port

    def kill(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
            self.p.wait(10)

    def close(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


class Node:
    """A group member process (asyncfabric.testing.group_node)."""

    def __init__(self, store: str, group: str, name: str, provider: str, node: str = "",
                 ttl: float = 2.0, prefix: list[str] | None = None, spawn=None) -> None:  # fmt: skip
        argv = [
            sys.executable, "-m", "asyncfabric.testing.group_node", "--store", store,
            "--group", group, "--name", name, "--provider", provider, "--ttl", str(ttl),
        ]  # fmt: skip
        if node:
            argv += ["--node", node]
        kw = dict(env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.name = name
        self.p = spawn(argv, **kw) if spawn else subprocess.Popen([*(prefix or []), *argv], **kw)
        assert self._read(90) == "ready"

    def _read(self, timeout: float):
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            raise TimeoutError(f"{self.name} gave no answer within {timeout} s")
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited (rc={self.p.poll()})")
        status, value = json.loads(line)
        if status != "ok":
            raise RuntimeError(value)
        return value

    def call(self, *cmd, timeout: float = 60):
        self.p.stdin.write(json.dumps(list(cmd)) + "\n")
        self.p.stdin.flush()
        return self._read(timeout)

    def kill(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.call("exit", timeout=20)
            except (RuntimeError, TimeoutError, OSError):
                pass
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def wait_until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout} s")
        time.sleep(0.05)


class EtcdProc:
    """A dedicated etcd (not the shared one) that a test may kill and restart on the
    same ports and data dir, as an etcd member restarts."""

    def __init__(self, tmp) -> None:
        import shutil
        import socket

        self.exe = shutil.which("etcd")
        if self.exe is None:
            raise RuntimeError("no etcd binary")

        def free() -> int:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                return s.getsockname()[1]

        self.data = str(tmp / "etcd-data")
        self.log = tmp / "etcd.log"
        self.cu, self.pu = f"http://127.0.0.1:{free()}", f"http://127.0.0.1:{free()}"
        self.url = "etcd://" + self.cu[len("http://") :]
        self.p: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        from asyncfabric.testing.etcd import _healthy

        with open(self.log, "ab") as log:
            self._spawn(log)
        wait_until(lambda: _healthy(self.cu, ()), 30, "etcd health")
        assert self.p.poll() is None, self.log.read_text()[-2000:]

    def _spawn(self, log) -> None:
        self.p = subprocess.Popen(
            [self.exe, "--name", "r", "--data-dir", self.data, "--listen-client-urls", self.cu,
             "--advertise-client-urls", self.cu, "--listen-peer-urls", self.pu,
             "--initial-advertise-peer-urls", self.pu, "--initial-cluster", f"r={self.pu}",
             "--log-level", "error"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip

    def kill(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
            self.p.wait(10)

    close = kill
