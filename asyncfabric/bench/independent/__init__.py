"""The independent baseline: ``af_indep.c``, a C program that uses only libfabric.

Nothing of asyncfabric is in it (no header, no code, no engine): it opens its own
FI_EP_RDM endpoint, CQ, AV and registration and moves the bytes the ``write``
and ``pingpong`` suites move with ``fi_writedata``, as ``fi_rma_bw -e rdm -o
writedata`` and a pingpong of writedata would. The runner's ``independent``
rows are what libfabric alone gets here, the bar for both ``asyncfabric`` and
``raw`` (``ratio_vs_independent``).

The program is compiled on first use (``build()``) with ``cc`` (or ``gcc``,
or ``$CC``) into a cache directory keyed by the source's hash,
``$XDG_CACHE_HOME/asyncfabric/independent/<hash>/af_indep`` (``~/.cache`` when
XDG_CACHE_HOME is unset). ``run_pair`` starts a sender and a receiver, relays
their address lines (``ADDR``, ``MR``) between them and returns their timings.
"""

from __future__ import annotations

import glob
import hashlib
import os
import selectors
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

# The program, every file of it. A literal: setup.py reads it (package data) without
# importing this module, as it reads the raw loop's in _raw_build.py.
FILES = ["af_indep.c"]
SOURCE = Path(__file__).resolve().parent / FILES[0]
CFLAGS = ["-O2", "-Wall", "-Wextra"]
INSTALL_HINT = "install libfabric's development headers: `apt-get install libfabric-dev`"
EXE = "af_indep"
# After one side fails, how long the other may take to finish on its own before it is
# killed (it may be done already, or waiting for a peer that is gone).
GRACE_S = 2.0


class IndependentError(RuntimeError):
    """The pair failed: ``returncodes`` (send, recv) and their ``stderr``."""

    def __init__(self, message: str, returncodes: tuple[int | None, int | None] = (None, None),
                 stderr: tuple[str, str] = ("", "")) -> None:  # fmt: skip
        super().__init__(message)
        self.returncodes = returncodes
        self.stderr = stderr


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "asyncfabric" / "independent"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name:
            path = shutil.which(name)
            if path:
                return path
    return None


def _libfabric_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for libfabric: $LIBFABRIC_HOME, else pkg-config, else -lfabric."""
    home = os.environ.get("LIBFABRIC_HOME")
    if home:
        libs = [d for d in (Path(home) / "lib64", Path(home) / "lib") if d.is_dir()]
        link = [f for d in libs for f in (f"-L{d}", f"-Wl,-rpath,{d}")]
        return [f"-I{Path(home) / 'include'}"], [*link, "-lfabric"]
    if shutil.which("pkg-config"):
        cf = subprocess.run(["pkg-config", "--cflags", "libfabric"], capture_output=True, text=True)
        lf = subprocess.run(["pkg-config", "--libs", "libfabric"], capture_output=True, text=True)
        if cf.returncode == 0 and lf.returncode == 0:
            return shlex.split(cf.stdout), shlex.split(lf.stdout) or ["-lfabric"]
    return [], ["-lfabric"]


def build() -> Path:
    """The compiled program (built now if the cache lacks it); RuntimeError says what is missing."""
    src = SOURCE.read_bytes()
    cflags, ldflags = _libfabric_flags()
    key = hashlib.sha256(src + repr((CFLAGS, cflags, ldflags)).encode()).hexdigest()[:16]
    exe = cache_dir() / key / EXE
    if exe.is_file() and os.access(exe, os.X_OK):
        return exe
    cc = _compiler()
    if cc is None:
        raise RuntimeError(
            "cannot build the independent baseline: no C compiler (cc or gcc) on PATH"
        )
    probe = subprocess.run(
        [cc, *cflags, "-E", "-x", "c", "-", "-o", os.devnull],
        input="#include <rdma/fabric.h>\n#include <rdma/fi_rma.h>\n",
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        raise RuntimeError(
            f"cannot build the independent baseline: libfabric's headers (rdma/fabric.h) are "
            f"missing; {INSTALL_HINT} (or set LIBFABRIC_HOME to a libfabric prefix)"
        )
    exe.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=EXE + ".", dir=exe.parent)
    os.close(fd)
    try:
        res = subprocess.run(
            [cc, *CFLAGS, *cflags, "-o", tmp, str(SOURCE), *ldflags],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            raise RuntimeError(
                f"cannot build the independent baseline ({cc} failed; is libfabric's library "
                f"installed? {INSTALL_HINT}):\n{res.stderr.strip()}"
            )
        os.chmod(tmp, 0o755)
        os.replace(tmp, exe)  # atomic: a concurrent build finds a whole file or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return exe


def available() -> tuple[bool, str]:
    """(True, path of the program) or (False, why it cannot be built here)."""
    try:
        return True, str(build())
    except (RuntimeError, OSError) as exc:
        return False, str(exc)


def default_cpus() -> tuple[int, int] | None:
    """The first two CPUs this process may run on, or None (no pinning) with fewer than two."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
        allowed = list(range(n))
    return (allowed[0], allowed[1]) if len(allowed) >= 2 else None


def _unlink_shm(pid: int) -> None:
    # af_indep names its shm regions afindep-<pid>-<random>: a killed one leaves its own
    for path in glob.glob(f"/dev/shm/afindep-{pid}-*"):
        try:
            os.unlink(path)
        except OSError:
            pass


class _Pipes:
    """Reads every stdout/stderr of the pair as it comes, so that no pipe ever fills."""

    def __init__(self, procs: list[subprocess.Popen[bytes]]) -> None:
        self.sel = selectors.DefaultSelector()
        self.out = [bytearray() for _ in procs]
        self.err = [bytearray() for _ in procs]
        for i, p in enumerate(procs):
            assert p.stdout is not None and p.stderr is not None
            os.set_blocking(p.stdout.fileno(), False)
            os.set_blocking(p.stderr.fileno(), False)
            self.sel.register(p.stdout, selectors.EVENT_READ, (self.out, i))
            self.sel.register(p.stderr, selectors.EVENT_READ, (self.err, i))

    def pump(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            bufs, i = key.data
            try:
                chunk = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if chunk:
                bufs[i] += chunk
            else:
                self.sel.unregister(key.fileobj)

    def open(self) -> bool:
        return bool(self.sel.get_map())

    def lines(self, i: int) -> list[str]:
        return self.out[i].decode(errors="replace").splitlines()

    def has(self, i: int, *tags: str) -> bool:
        """Whether side ``i`` has printed whole lines starting with every one of ``tags``."""
        text = bytes(self.out[i])
        whole = text[: text.rfind(b"\n") + 1].decode(errors="replace").splitlines()
        got = {ln.split(" ", 1)[0] for ln in whole}
        return all(t in got for t in tags)

    def stderr(self, i: int) -> str:
        return self.err[i].decode(errors="replace").strip()


def run_pair(
    provider: str,
    mode: str,
    size: int,
    iters: int,
    window: int = 64,
    repeats: int = 1,
    cpus: tuple[int, int] | None = (0, 1),
    node: str | None = None,
    *,
    warmup: int = 1,
    timeout_s: float = 600.0,
    stall_s: int = 60,
    corrupt: bool = False,
) -> dict[str, Any]:
    """Run a sender and a receiver of ``af_indep`` once; return their timings.

    ``mode`` "bw": ``rep_s`` (seconds per timed repeat, first post to the
    receiver's acknowledgement) and ``times_ns``; "pingpong": ``rtts_ns`` (every
    timed round trip), ``rtt_p50_us``, ``rtt_p99_us``. Also ``provider`` (as
    libfabric names it), ``window`` (after the provider's clamp), ``mr_mode``,
    ``rx_cq_data`` and ``verified`` (the receiver's buffer matched the pattern).
    ``cpus``: the CPUs the sender and the receiver pin themselves to (None: no
    pinning). ``node``: the address to bind (tcp; 127.0.0.1 when not given).
    ``stall_s``: each process gives up after this long without a completion.
    Raises :class:`IndependentError` (a RuntimeError) when either fails, with its
    exit status and stderr (exit status 3: the receiver's check failed).
    """
    if mode not in ("bw", "pingpong"):
        raise ValueError(f"mode is bw or pingpong, not {mode!r}")
    exe = build()
    if provider == "tcp" and node is None:
        node = "127.0.0.1"
    common = ["--provider", provider, "--mode", mode, "--size", str(int(size)),
              "--iters", str(int(iters)), "--window", str(int(window)),
              "--repeats", str(int(repeats)), "--warmup", str(int(warmup)),
              "--timeout", str(int(stall_s))]  # fmt: skip
    if node:
        common += ["--node", node]
    argvs = []
    for k, role in enumerate(("send", "recv")):
        argv = [str(exe), "--role", role, *common]
        argv += ["--cpu", str(cpus[k] if cpus else -1)]
        if corrupt and role == "send":
            argv.append("--corrupt")
        argvs.append(argv)
    procs = [
        subprocess.Popen(a, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for a in argvs
    ]
    pipes = _Pipes(procs)
    deadline = time.monotonic() + timeout_s
    relayed = [False, False]
    killed: set[int] = set()
    failed_at: float | None = None
    try:
        while True:
            # relay each side's ADDR and MR lines to the other, once both are whole
            for i in (0, 1):
                if not relayed[i] and pipes.has(i, "ADDR", "MR"):
                    mine = [ln for ln in pipes.lines(i) if ln.startswith(("ADDR ", "MR "))]
                    other = procs[1 - i].stdin
                    assert other is not None
                    try:
                        other.write(("\n".join(mine) + "\n").encode())
                        other.close()
                    except BrokenPipeError:
                        pass  # the other side is gone: its status says why
                    relayed[i] = True
            rcs = [p.poll() for p in procs]
            if all(rc is not None for rc in rcs) and not pipes.open():
                break
            failed = [i for i, rc in enumerate(rcs) if rc not in (None, 0)]
            t = time.monotonic()
            if failed and failed_at is None:
                failed_at = t
            late = t > deadline
            if late or (failed_at is not None and t - failed_at > GRACE_S):
                # one side failed (or the pair ran too long): the other would only wait
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        p.kill()
                        killed.add(i)
                for p in procs:
                    p.wait()
                while pipes.open():
                    pipes.pump(0.1)
                if late and not failed:
                    raise IndependentError(
                        f"independent baseline ({provider} {mode} {size} B) ran past "
                        f"{timeout_s:.0f} s and was killed",
                        (procs[0].returncode, procs[1].returncode),
                        (pipes.stderr(0), pipes.stderr(1)),
                    )
                break
            pipes.pump(0.05 if pipes.open() else 0.0)
            if not pipes.open():
                time.sleep(0.05)
    finally:
        for i, p in enumerate(procs):
            if p.poll() is None:
                p.kill()
                killed.add(i)
                p.wait()
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None and not f.closed:
                    try:
                        f.close()
                    except OSError:
                        pass
        for i in killed:
            _unlink_shm(procs[i].pid)
        pipes.sel.close()

    codes = (procs[0].returncode, procs[1].returncode)
    if codes != (0, 0):
        who = [f"{r} exited {rc}: {pipes.stderr(i) or '(no message)'}"
               for i, (r, rc) in enumerate(zip(("send", "recv"), codes))
               if rc != 0 and i not in killed]  # fmt: skip
        raise IndependentError(
            f"independent baseline ({provider} {mode} {size} B) failed: " + "; ".join(who),
            codes,
            (pipes.stderr(0), pipes.stderr(1)),
        )
    return _parse(pipes.lines(0), pipes.lines(1), mode=mode, size=size, iters=iters,
                  repeats=repeats, cpus=cpus)  # fmt: skip


def _parse(send: list[str], recv: list[str], **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = dict(kw)
    rep_s: list[float] = []
    for ln in send:
        tag, _, rest = ln.partition(" ")
        f = rest.split()
        if tag == "INFO":
            out["provider"], out["mr_mode"] = f[0], int(f[1], 16)
            out["rx_cq_data"], out["window"] = f[2] == "1", int(f[3])
        elif tag == "REP":
            rep_s.append(float(f[0]))
        elif tag == "RTT":
            out["rtt_p50_us"], out["rtt_p99_us"] = float(f[0]), float(f[1])
        elif tag == "RTTSUM":
            out["rtt_sum_s"], out["rtt_count"] = float(f[0]), int(f[1])
        elif tag == "RTTS":
            out["rtts_ns"] = [int(x) for x in f]
    out["verified"] = any(ln.startswith("VERIFY ok") for ln in recv)
    if kw["mode"] == "bw":
        out["rep_s"] = rep_s
        out["times_ns"] = [max(1, round(s * 1e9)) for s in rep_s]
        if len(rep_s) != kw["repeats"]:
            raise IndependentError(
                f"independent baseline: expected {kw['repeats']} REP lines, got {len(rep_s)}"
            )
    elif "rtts_ns" not in out:
        raise IndependentError("independent baseline: the sender printed no RTTS line")
    return out
