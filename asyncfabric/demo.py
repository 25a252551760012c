"""Two-process loopback demo: move >= 1 GiB of verified data, then measure latency.

    asyncfabric demo [--provider shm] [--gib 1] [--buffer-mib 64] [--pings 2000] [--timeout 60]

The parent (writer) starts a receiver process, reads the receiver's descriptor
from its stdout (the out-of-band exchange), introduces itself with a control
message, then writes rounds of fresh random data with an immediate. The
receiver awaits its counter for the expected number of immediates, hashes what
landed and sends the digest back; the writer compares. Finally 8-byte WriteImm
ping-pongs measure the round-trip latency through both event loops.

A failure on either side ends the demo with one line on stderr (the receiver's
own error line is relayed by the writer) and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import signal
import statistics
import sys
import time

import numpy as np

import asyncfabric as af

from ._cli import CliParser

IMM_DATA, IMM_PING, IMM_PONG = 1, 2, 3
GRACE_S = 2.0  # how long the writer may take to fail by itself once the receiver is gone
PREFIX = "asyncfabric demo: "  # how the receiver's one-line error report begins


class ReceiverFailed(af.AsyncFabricError):
    """The demo's receiver process failed; the message carries the receiver's own error."""


def _digest(buf: np.ndarray) -> bytes:
    return hashlib.blake2b(memoryview(buf), digest_size=16).digest()


async def receiver(
    provider: str, buffer_bytes: int, rounds: int, pings: int, timeout: float
) -> None:
    async with af.Engine(provider, **_kw(provider)) as eng:
        dst = np.zeros(buffer_bytes, np.uint8)
        with eng.register(dst) as region:
            print(bytes(region.descriptor()).hex(), flush=True)  # out-of-band: stdout
            writer_desc = af.Descriptor.from_bytes(await eng.recv(timeout=timeout))
            data = eng.counter(IMM_DATA)
            for _ in range(rounds):
                await data.wait(region.expected_imms(), timeout=timeout)
                await eng.send(
                    writer_desc, b"landed"
                )  # every immediate counted: all bytes are here
                await eng.send(writer_desc, _digest(dst))
            ping = eng.counter(IMM_PING)
            for _ in range(pings):
                await ping.wait(1, timeout=timeout)
                await eng.write_imm(writer_desc, IMM_PONG)
            await eng.recv(timeout=timeout)  # the writer's goodbye


class _Receiver:
    """The receiver process, seen from the writer: its stderr is kept (its error line)."""

    def __init__(self, proc: asyncio.subprocess.Process, debug: bool) -> None:
        self.proc, self.pid, self._debug = proc, proc.pid, debug
        self.lines: collections.deque[str] = collections.deque(maxlen=64)
        self._drain = asyncio.ensure_future(self._read_stderr())

    @classmethod
    async def start(cls, args: list[str], debug: bool) -> _Receiver:
        cmd = [sys.executable, "-m", "asyncfabric", *(["--debug"] if debug else []), "demo"]
        proc = await asyncio.create_subprocess_exec(
            *cmd, "--role", "receiver", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        return cls(proc, debug)

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while True:
            try:
                raw = await self.proc.stderr.readline()
            except ValueError:  # a line over the stream's limit: keep reading after it
                continue
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip()
            if self._debug:
                print(line, file=sys.stderr, flush=True)  # its traceback, as it comes
            if line:
                self.lines.append(line)

    async def exited(self, within: float) -> bool:
        """Whether the process has ended (waiting up to ``within`` seconds for it)."""
        try:
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), within)
        except asyncio.TimeoutError:
            return False
        try:
            await asyncio.wait_for(asyncio.shield(self._drain), 1)  # its last words
        except asyncio.TimeoutError:
            pass
        return True

    def _how(self) -> str:
        rc = self.proc.returncode
        if rc is not None and rc < 0:
            try:
                return f"was killed by {signal.Signals(-rc).name}"
            except ValueError:
                return f"was killed by signal {-rc}"
        return f"exited with status {rc}"

    def error(self, when: str) -> af.AsyncFabricError:
        """The error to report for a receiver that ended (``when``: in which step)."""
        rc = self.proc.returncode
        said = next((ln for ln in reversed(self.lines) if ln.startswith(PREFIX)), None)
        if rc is not None and rc > 0 and said:
            exc: af.AsyncFabricError = ReceiverFailed(
                f"the receiver process (pid {self.pid}) failed {when}: {said[len(PREFIX) :]}"
            )
        else:
            last = f" (its last output: {self.lines[-1]})" if self.lines and rc else ""
            exc = af.PeerUnreachable(
                f"the receiver process (pid {self.pid}) {self._how()} {when}{last}; "
                "run the demo again"
            )
        exc._demo_receiver = True  # type: ignore[attr-defined]  # says it all: no note
        return exc

    async def watch(self, body: asyncio.Future[int], when: str) -> int:
        """Await ``body``; if the receiver ends first, fail it in bounded time.

        The engine fails transfers to a peer whose process exited at once, but a
        wait for a control message does not know where it comes from: give the body
        GRACE_S to fail by itself, then cancel it and report the receiver's end.
        When both failed, the receiver's own error is the cause, unless it was
        killed: then the writer's error (PeerUnreachable) says it best, with a note.
        """
        gone = asyncio.ensure_future(asyncio.shield(self.proc.wait()))
        try:
            await asyncio.wait({body, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not body.done():
                await asyncio.wait({body}, timeout=GRACE_S)
            if not body.done():
                body.cancel()
                await asyncio.gather(body, return_exceptions=True)
                await self.exited(1)
                raise self.error(when)
            exc = body.exception()
            if exc is None:
                return body.result()
            if (
                isinstance(exc, Exception)
                and not getattr(exc, "_demo_receiver", False)
                and await self.exited(GRACE_S)
            ):
                rc = self.proc.returncode
                if rc is not None and rc > 0:
                    raise self.error(when) from exc
                notes = getattr(exc, "__notes__", None)
                if notes is None:
                    notes = exc.__notes__ = []  # type: ignore[attr-defined]
                notes.append(f"the receiver process {self.pid} {self._how()}")
            raise exc
        finally:
            gone.cancel()
            if not body.done():
                body.cancel()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._drain.cancel()
        await asyncio.gather(self._drain, return_exceptions=True)


async def writer(
    provider: str, gib: float, buffer_bytes: int, pings: int, timeout: float, debug: bool = False
) -> int:
    rounds = max(1, int(gib * (1 << 30) // buffer_bytes))
    # the writer's engine first: a provider that is unknown or unusable fails here, alone
    async with af.Engine(provider, **_kw(provider)) as eng:
        rx = await _Receiver.start(
            ["--provider", provider, "--buffer-mib", str(buffer_bytes >> 20),
             "--rounds", str(rounds), "--pings", str(pings), "--timeout", str(timeout)],
            debug,
        )  # fmt: skip
        try:
            line = await rx.watch(
                asyncio.ensure_future(_read_line(rx, timeout)), "before sending its descriptor"
            )
            remote = af.Descriptor.from_bytes(bytes.fromhex(line.decode().strip()))
            print(f"asyncfabric demo: {eng.backend}:{eng.provider}, receiver pid {rx.pid}",
                  flush=True)  # fmt: skip
            bad = await rx.watch(
                asyncio.ensure_future(_drive(eng, remote, buffer_bytes, rounds, pings, timeout)),
                "during the demo",
            )
            if not await rx.exited(timeout):
                raise af.ImmTimeout(
                    f"the receiver process (pid {rx.pid}) did not exit within {timeout} s "
                    "after the demo (raise --timeout on a loaded machine)"
                )
            if rx.proc.returncode:
                raise rx.error("after the demo")
            return 1 if bad else 0
        finally:
            await rx.stop()


async def _read_line(rx: _Receiver, timeout: float) -> bytes:
    assert rx.proc.stdout is not None
    try:
        line = await asyncio.wait_for(rx.proc.stdout.readline(), timeout)
    except asyncio.TimeoutError:
        raise af.ImmTimeout(
            f"the receiver process (pid {rx.pid}) sent no descriptor within {timeout} s "
            "(raise --timeout on a loaded machine)"
        ) from None
    if not line:  # it exited before its descriptor: say how, with its own error line
        await rx.exited(timeout)
        raise rx.error("before sending its descriptor")
    return line


async def _drive(
    eng: af.Engine, remote: af.Descriptor, buffer_bytes: int, rounds: int, pings: int,
    timeout: float,
) -> int:  # fmt: skip
    """The writer's side of the demo; returns the number of rounds that came back corrupt."""
    src = np.empty(buffer_bytes, np.uint8)
    pong_buf = np.zeros(64, np.uint8)
    rng = np.random.default_rng()
    with eng.register(src) as region, eng.register(pong_buf) as pong_region:
        await eng.send(remote, bytes(pong_region.descriptor()))
        moved, busy, bad = 0, 0.0, 0
        for r in range(rounds):
            src[:] = rng.integers(0, 256, buffer_bytes, dtype=np.uint8)
            want = _digest(src)
            t0 = time.perf_counter()
            await eng.write(region, remote, imm=IMM_DATA)
            landed = await eng.recv(timeout=timeout)  # the receiver counted every immediate
            busy += time.perf_counter() - t0
            if landed != b"landed":
                raise ReceiverFailed(
                    f"the receiver answered {landed[:40]!r} instead of b'landed' "
                    "(is another process sending to this engine?)"
                )
            got = await eng.recv(timeout=timeout)  # its digest of what landed
            moved += buffer_bytes
            if got != want:
                bad += 1
                print(f"round {r}: DIGEST MISMATCH", file=sys.stderr)
        gbps = moved / busy / 1e9
        print(
            f"moved {moved / (1 << 30):.2f} GiB in {rounds} writes of "
            f"{buffer_bytes >> 20} MiB ({remote.expected_imms(buffer_bytes)} immediates each): "
            f"{gbps:.2f} GB/s (write until the receiver's counter fired), "
            f"{'all verified' if not bad else f'{bad} rounds CORRUPT'}",
            flush=True,
        )
        pong = eng.counter(IMM_PONG)
        rtts = []
        for _ in range(pings):
            t0 = time.perf_counter()
            await eng.write_imm(remote, IMM_PING)
            await pong.wait(1, timeout=timeout)
            rtts.append((time.perf_counter() - t0) * 1e6)
        rtts.sort()
        p50 = statistics.median(rtts)
        p99 = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))]
        print(
            f"latency: {pings} WriteImm ping-pongs, round trip p50 {p50:.1f} us, "
            f"p99 {p99:.1f} us (one way ~{p50 / 2:.1f} us)",
            flush=True,
        )
        await eng.send(remote, b"bye")
    return bad


def _kw(provider: str) -> dict:
    return {"node": "127.0.0.1"} if provider.startswith("tcp") else {}


def main(argv: list[str] | None = None, *, debug: bool = False) -> int:
    p = CliParser(prog="asyncfabric demo", description=__doc__.splitlines()[0])
    p.add_argument("--provider", default="shm", help="libfabric provider (default: shm)")
    p.add_argument("--gib", type=float, default=1.0, help="GiB of data to move (default: 1)")
    p.add_argument("--buffer-mib", type=int, default=64, help="size of one write (default: 64)")
    p.add_argument("--pings", type=int, default=2000, help="latency round trips (default: 2000)")
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds either side waits for the other at each step (default: 60)",
    )
    p.add_argument(
        "--role", choices=["writer", "receiver"], default="writer", help=argparse.SUPPRESS
    )
    p.add_argument("--rounds", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.buffer_mib <= 0 or a.gib <= 0 or a.pings <= 0 or a.timeout <= 0:
        p.error("--gib, --buffer-mib, --pings and --timeout must be positive")
    if a.role == "receiver":
        af.run(receiver(a.provider, a.buffer_mib << 20, a.rounds, a.pings, a.timeout))
        return 0
    return af.run(writer(a.provider, a.gib, a.buffer_mib << 20, a.pings, a.timeout, debug))


if __name__ == "__main__":  # python -m asyncfabric.demo: the same as `asyncfabric demo`
    import runpy

    sys.argv[1:1] = ["demo"]
    runpy.run_module("asyncfabric", run_name="__main__")
