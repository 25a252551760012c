"""The command line reports a failure as one line and a non-zero exit status.

Real processes throughout (``python -m asyncfabric ...``): a bad provider, bad
arguments, the demo's receiver SIGKILLed mid-run, the receiver failing by itself,
Ctrl-C. Every wait has a deadline, and every process group started here is
killed at the end, so no test can hang or leave a process behind.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

CLI = [sys.executable, "-m", "asyncfabric"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OPENBLAS_NUM_THREADS": "1"}
TRACEBACK = "Traceback (most recent call last)"


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env=ENV,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def one_error_line(err: str) -> str:
    got = lines(err)
    assert len(got) == 1, f"expected one line on stderr, got {len(got)}:\n{err}"
    assert TRACEBACK not in err
    return got[0]


def _providers() -> set[str]:
    r = cli("info", timeout=60)
    assert r.returncode == 0, r.stderr
    out: set[str] = set()
    for ln in lines(r.stdout):
        _, _, provs = ln.partition(": ")
        out |= {p.strip() for p in provs.split(",")}
    return out


@pytest.fixture(scope="module")
def shm() -> None:
    if "shm" not in _providers():
        pytest.skip("the libfabric shm provider is not usable here (asyncfabric info)")


class Demo:
    """``asyncfabric demo`` in a process group of its own; stdout read line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*CLI, "demo", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=ENV, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self._out: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._err: list[str] = []
        self._err_reader = threading.Thread(target=self._read_err, daemon=True)
        self._err_reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for ln in self.proc.stdout:
            self._out.put(ln)
        self._out.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self._err.append(self.proc.stderr.read())

    def receiver_pid(self, timeout: float = 90) -> int:
        """The pid on the demo's first line (the receiver is up and connected then)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                ln = self._out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no 'receiver pid' line within {timeout} s")
            if ln is None:
                pytest.fail(f"the demo ended before its first line:\n{self.stderr()}")
            self.stdout.append(ln)
            m = re.search(r"receiver pid (\d+)", ln)
            if m:
                return int(m.group(1))

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._err_reader.join(10)
        self._reader.join(10)
        return rc

    def stderr(self) -> str:
        return "".join(self._err)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the writer and its receiver
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


@pytest.fixture
def demos():
    started: list[Demo] = []

    def start(*args: str) -> Demo:
        d = Demo(*args)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


# ---------------------------------------------------------------- bad provider, bad arguments


def test_demo_unknown_provider_is_one_line():
    r = cli("demo", "--provider", "nosuch")
    assert r.returncode == 1, r.stderr
    line = one_error_line(r.stderr)
    assert line.startswith("asyncfabric demo: BackendUnavailable: unknown provider 'nosuch'")
    assert r.stdout == ""  # nothing started: no receiver pid line


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where):
    args = ["demo", "--provider", "nosuch"]
    r = cli(*(["--debug", *args] if where == "before" else [*args, "--debug"]))
    assert r.returncode == 1
    assert TRACEBACK in r.stderr
    assert "BackendUnavailable" in r.stderr
    assert lines(r.stderr)[-1].startswith("asyncfabric demo: BackendUnavailable: ")


def test_receiver_role_failure_is_one_line():
    # what the demo's receiver process prints for the writer to relay
    r = cli("demo", "--role", "receiver", "--provider", "nosuch")
    assert r.returncode == 1
    assert one_error_line(r.stderr).startswith("asyncfabric demo: BackendUnavailable: ")


@pytest.mark.parametrize(
    "args, says",
    [
        (["demo", "--gib", "x"], "argument --gib: invalid float value: 'x'"),
        (["demo", "--pings", "0"], "must be positive"),
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
        (["nosuchcommand"], "unknown command 'nosuchcommand'"),
    ],
)
def test_usage_errors_are_one_line_exit_2(args, says):
    r = cli(*args)
    assert r.returncode == 2, r.stderr
    line = one_error_line(r.stderr)
    assert says in line and "--help" in line


@pytest.mark.parametrize(
    "args, rc, says",
    [
        (["nosuite"], 2, "unknown suite 'nosuite'"),
        ([], 2, "the following arguments are required: suites"),
        (["write", "--impls", "mpi"], 2, "unknown --impls mpi"),
        (["write", "--sizes", "4Q"], 2, "not a size"),
        (["write", "--device", "gpu0"], 2, "asyncfabric bench: error: "),
        (["write", "--quick", "--provider", "nosuch"], 1, "BackendUnavailable: unknown provider"),
    ],
)
def test_bench_bad_option_values_are_one_line(args, rc, says):
    r = cli("bench", *args, "--no-progress")
    assert r.returncode == rc, r.stderr
    line = one_error_line(r.stderr)
    assert line.startswith("asyncfabric bench: ") and says in line, line


# ---------------------------------------------------------------- failures mid-run


@pytest.mark.parametrize("delay", [0.2, 1.5])
def test_receiver_sigkilled_mid_run(shm, demos, delay):
    # 64 GiB in 16 MiB writes: minutes of work, so the kill lands mid-run
    d = demos("--gib", "64", "--buffer-mib", "16", "--timeout", "60")
    pid = d.receiver_pid()
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    rc = d.wait(timeout=20)
    took = time.monotonic() - t0
    assert rc == 1, d.stderr()
    line = one_error_line(d.stderr())
    assert re.match(r"asyncfabric demo: (PeerUnreachable|TransferError): ", line), line
    assert f"{pid}" in line and "SIGKILL" in line, line
    assert took < 20


def test_receiver_side_failure_is_relayed_as_one_line(shm, demos):
    # Stop the writer for longer than the receiver waits: the receiver fails by itself
    # (ImmTimeout, its own one-line report), and the writer relays that line.
    d = demos("--gib", "64", "--buffer-mib", "16", "--timeout", "3")
    d.receiver_pid()
    time.sleep(0.3)
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(6)
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    rc = d.wait(timeout=30)
    assert rc == 1, d.stderr()
    line = one_error_line(d.stderr())
    assert line.startswith("asyncfabric demo: ReceiverFailed: the receiver process"), line
    assert "ImmTimeout" in line, line


def test_ctrl_c_exits_130_quietly(shm, demos):
    d = demos("--gib", "64", "--buffer-mib", "16")
    d.receiver_pid()
    time.sleep(0.5)
    os.killpg(d.proc.pid, signal.SIGINT)  # what Ctrl-C does: the writer and its receiver
    rc = d.wait(timeout=20)
    assert rc == 130, d.stderr()
    assert lines(d.stderr()) == []


def test_demo_still_works(shm):
    r = cli("demo", "--gib", "0.0625", "--buffer-mib", "16", "--pings", "50")
    assert r.returncode == 0, r.stderr
    assert "all verified" in r.stdout, r.stdout
    assert r.stderr == ""
