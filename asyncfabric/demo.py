"""Two-process loopback demo: move >= 1 GiB of verified data, then measure latency.

    asyncfabric demo [--provider shm] [--gib 1] [--buffer-mib 64] [--pings 2000] [--timeout 60]

The parent (writer) starts a receiver process, reads the receiver's descriptor
from its stdout (the out-of-band exchange) and introduces itself with a control
message. Bulk: rounds of fresh random data, each posted as one ``Batch`` of
1 MiB writes with an immediate (``await eng.write_many(batch)``); the receiver
awaits its counter for the expected number of immediates, acknowledges with a
zero-byte write, hashes what landed and sends the digest back; the writer
compares. A few rounds go as one plain ``await eng.write()`` per 1 MiB instead,
for comparison. The clock runs from the post until the acknowledgement only,
and only while both sides are idle otherwise: filling, hashing and the digest's
trip happen outside it, and one warm-up round goes first. Latency: 8-byte
WriteImm ping-pongs through both event loops, on engines opened with
``ProgressPolicy.latency()`` and on the default-policy engines.

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

IMM_DATA, IMM_PING, IMM_PONG, IMM_LANDED = 1, 2, 3, 4
ENTRY = 1 << 20  # one write of the batch (the bulk rounds' unit)
PLAIN_BYTES = 256 << 20  # how much the plain-write comparison moves
WARM_PINGS = 100  # untimed ping-pongs before each timed series
GRACE_S = 2.0  # how long the writer may take to fail by itself once the receiver is gone
PREFIX = "asyncfabric demo: "  # how the receiver's one-line error report begins


class ReceiverFailed(af.AsyncFabricError):
    """The demo's receiver process failed; the message carries the receiver's own error."""


def _digest(buf: np.ndarray) -> bytes:
    return hashlib.blake2b(memoryview(buf), digest_size=16).digest()


def _fill(buf: np.ndarray, rng: np.random.Generator) -> None:
    """Fresh random bytes into ``buf`` (a multiple of 8 bytes long)."""
    buf.view(np.uint64)[:] = rng.bit_generator.random_raw(buf.nbytes // 8)


async def receiver(
    provider: str, buffer_bytes: int, rounds: int, pings: int, timeout: float
) -> None:
    async with af.Engine(provider, **_kw(provider)) as eng:
        dst = np.ones(buffer_bytes, np.uint8)  # every page touched now, not by the first write
        with eng.register(dst) as region:
            print(bytes(region.descriptor()).hex(), flush=True)  # out-of-band: stdout
            writer_desc = af.Descriptor.from_bytes(await eng.recv(timeout=timeout))
            data = eng.counter(IMM_DATA)
            per_round = (buffer_bytes // ENTRY) * region.descriptor().expected_imms(ENTRY)
            for _ in range(rounds):  # the warm-up round, the batch rounds and the plain ones
                await data.wait(per_round, timeout=timeout)
                # every immediate counted: all bytes are here
                await eng.write_imm(writer_desc, IMM_LANDED, timeout=timeout)
                await eng.send(writer_desc, _digest(dst), timeout=timeout)
            await _pong(eng, writer_desc, pings, timeout)  # the default policy
            async with af.Engine(
                provider, progress=af.ProgressPolicy.latency(), **_kw(provider)
            ) as fast:
                with fast.register(np.zeros(64, np.uint8)) as mine:
                    await eng.send(writer_desc, bytes(mine.descriptor()), timeout=timeout)
                    fast_writer = af.Descriptor.from_bytes(await fast.recv(timeout=timeout))
                    await _pong(fast, fast_writer, pings, timeout)
            await eng.recv(timeout=timeout)  # the writer's goodbye


async def _pong(eng: af.Engine, to: af.Descriptor, pings: int, timeout: float) -> None:
    ping = eng.counter(IMM_PING)
    for _ in range(WARM_PINGS + pings):
        await ping.wait(1, timeout=timeout)
        await eng.write_imm(to, IMM_PONG, timeout=timeout)


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
    plain = max(1, min(rounds, PLAIN_BYTES // buffer_bytes))
    # the writer's engine first: a provider that is unknown or unusable fails here, alone
    async with af.Engine(provider, **_kw(provider)) as eng:
        rx = await _Receiver.start(
            ["--provider", provider, "--buffer-mib", str(buffer_bytes >> 20),
             "--rounds", str(1 + rounds + plain), "--pings", str(pings),
             "--timeout", str(timeout)],
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
                asyncio.ensure_future(
                    _drive(eng, provider, remote, buffer_bytes, rounds, plain, pings, timeout)
                ),
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
    eng: af.Engine, provider: str, remote: af.Descriptor, buffer_bytes: int, rounds: int,
    plain: int, pings: int, timeout: float,
) -> int:  # fmt: skip
    """The writer's side of the demo; returns the number of rounds that came back corrupt."""
    src = np.empty(buffer_bytes, np.uint8)
    pong_buf = np.zeros(64, np.uint8)
    rng = np.random.default_rng()
    n = buffer_bytes // ENTRY
    with eng.register(src) as region, eng.register(pong_buf) as pong_region:
        await eng.send(remote, bytes(pong_region.descriptor()), timeout=timeout)
        offs = np.arange(n, dtype=np.uint64) * np.uint64(ENTRY)
        batch = af.Batch().add_many(region, remote, offs, offs, ENTRY, imm=IMM_DATA)
        pieces = [
            (region[a : a + ENTRY], remote[a : a + ENTRY]) for a in range(0, buffer_bytes, ENTRY)
        ]
        landed = eng.counter(IMM_LANDED)

        async def post_batch() -> None:
            try:
                await eng.write_many(batch, timeout=timeout)
            except af.BatchError as exc:
                # every entry failed the same way (the receiver is gone): that is the error
                first = exc.failures[min(exc.failures)]
                if len(exc.failures) == len(batch) and all(
                    type(e) is type(first) for e in exc.failures.values()
                ):
                    raise first from exc
                raise

        async def post_plain() -> None:
            for s, d in pieces:
                await eng.write(s, d, imm=IMM_DATA, timeout=timeout)

        # the warm-up round first, then the plain rounds spread among the batch rounds
        order = sorted([(i / rounds, True) for i in range(rounds)]
                       + [((j + 0.5) / plain, False) for j in range(plain)])  # fmt: skip
        schedule = [post_batch] + [post_batch if b else post_plain for _, b in order]
        busy = {post_batch: 0.0, post_plain: 0.0}
        bad = 0
        _fill(src, rng)
        want = _digest(src)
        for r, post in enumerate(schedule):
            t0 = time.perf_counter()
            await post()
            await landed.wait(1, timeout=timeout)  # the receiver counted every immediate
            if r:  # round 0 warms up: first posts, the peer's first touch of the pages
                busy[post] += time.perf_counter() - t0
            sent = want
            if r + 1 < len(schedule):  # the next round's data, while the receiver hashes
                _fill(src, rng)
                want = _digest(src)
            got = await eng.recv(timeout=timeout)  # its digest of what landed: it is idle again
            if len(got) != len(sent):
                raise ReceiverFailed(
                    f"the receiver answered {got[:40]!r} instead of a digest "
                    "(is another process sending to this engine?)"
                )
            if got != sent:
                bad += 1
                print(f"round {r}: DIGEST MISMATCH", file=sys.stderr)
        verdict = "all verified" if not bad else f"{bad} of {len(schedule)} rounds CORRUPT"
        mib = ENTRY >> 20
        print(
            f"bulk: {_size(rounds * buffer_bytes)} in {_n(rounds, 'round')} of write_many "
            f"({_n(n, 'write')} of {mib} MiB per call): "
            f"{rounds * buffer_bytes / busy[post_batch] / 1e9:.1f} GB/s, {verdict}",
            flush=True,
        )
        print(
            f"      the same as one plain await write() per {mib} MiB "
            f"({_size(plain * buffer_bytes)}, {_n(plain, 'round')} among them): "
            f"{plain * buffer_bytes / busy[post_plain] / 1e9:.1f} GB/s",
            flush=True,
        )
        d50, d99 = await _ping(eng, remote, pings, timeout)
        fast_remote = af.Descriptor.from_bytes(await eng.recv(timeout=timeout))
        async with af.Engine(
            provider, progress=af.ProgressPolicy.latency(), **_kw(provider)
        ) as fast:
            with fast.register(np.zeros(64, np.uint8)) as mine:
                await fast.send(fast_remote, bytes(mine.descriptor()), timeout=timeout)
                f50, f99 = await _ping(fast, fast_remote, pings, timeout)
        print(
            f"latency: {pings} WriteImm ping-pongs (ProgressPolicy.latency()): "
            f"RTT p50 {f50:.1f} us, p99 {f99:.1f} us; default policy: "
            f"p50 {d50:.1f} us, p99 {d99:.1f} us",
            flush=True,
        )
        await eng.send(remote, b"bye", timeout=timeout)
    return bad


async def _ping(
    eng: af.Engine, remote: af.Descriptor, pings: int, timeout: float
) -> tuple[float, float]:
    """Round trips of one immediate each way: (p50, p99) in microseconds."""
    pong = eng.counter(IMM_PONG)
    rtts = []
    for i in range(WARM_PINGS + pings):
        t0 = time.perf_counter()
        await eng.write_imm(remote, IMM_PING, timeout=timeout)
        await pong.wait(1, timeout=timeout)
        if i >= WARM_PINGS:
            rtts.append((time.perf_counter() - t0) * 1e6)
    rtts.sort()
    return statistics.median(rtts), rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))]


def _size(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):.2f} GiB" if nbytes >= 1 << 30 else f"{nbytes >> 20} MiB"


def _n(k: int, what: str) -> str:
    return f"{k} {what}" if k == 1 else f"{k} {what}s"


def _kw(provider: str) -> dict:
    return {"node": "127.0.0.1"} if provider.startswith("tcp") else {}


def main(argv: list[str] | None = None, *, debug: bool = False) -> int:
    p = CliParser(prog="asyncfabric demo", description=__doc__.splitlines()[0])
    p.add_argument("--provider", default="shm", help="libfabric provider (default: shm)")
    p.add_argument("--gib", type=float, default=1.0, help="GiB of data to move (default: 1)")
    p.add_argument(
        "--buffer-mib",
        type=int,
        default=64,
        help="MiB per round, written as 1 MiB writes (default: 64)",
    )
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
