"""Hold a shm endpoint's queue lock from another process, as a process that died inside
its critical section would have left it (tests of the core's lock guard, ``qlock.c``).

libfabric 1.17's shm provider keeps a process-shared spin lock in each endpoint's
region (``struct smr_region``: version byte 4 at offset 0, the lock at offset 24). A
:class:`QueueLockHolder` maps the region of a process's engine and takes that lock in a
child process of its own, which then holds it until :meth:`QueueLockHolder.unlock` or
:meth:`QueueLockHolder.kill`.
"""

from __future__ import annotations

import glob
import subprocess
import sys

_HOLDER = r"""
import ctypes, mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 4096)
if m[0] != 4:
    print("layout", flush=True)
    sys.exit(0)
lock = ctypes.addressof(ctypes.c_char.from_buffer(m)) + 24
libc = ctypes.CDLL(None)
libc.pthread_spin_lock(ctypes.c_void_p(lock))
print("locked", flush=True)
if sys.stdin.readline().strip() == "unlock":
    libc.pthread_spin_unlock(ctypes.c_void_p(lock))
    print("unlocked", flush=True)
    sys.stdin.readline()
"""


class UnknownLayout(RuntimeError):
    """The region is not libfabric 1.17's: the core's lock guard is off there too."""


def region_of(pid: int) -> str:
    """The one shm region of process ``pid``'s engine (engines name them af-<ns>-<pid>-...)."""
    found = glob.glob(f"/dev/shm/af-*-{pid}-*")
    if len(found) != 1:
        raise RuntimeError(
            f"expected one shm region of process {pid}, found {found}: open exactly one "
            "shm engine with one domain in that process"
        )
    return found[0]


class QueueLockHolder:
    """A child process that holds the queue lock of ``pid``'s shm region."""

    def __init__(self, pid: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, region_of(pid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        said = self.proc.stdout.readline().strip()
        if said == "layout":
            raise UnknownLayout("the shm region is not libfabric 1.17's")
        if said != "locked":
            raise RuntimeError(f"the lock holder said {said!r}, not 'locked'")

    def unlock(self) -> None:
        """Let go (the holder stays alive until :meth:`kill`)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("unlock\n")
        self.proc.stdin.flush()
        said = self.proc.stdout.readline().strip()
        if said != "unlocked":
            raise RuntimeError(f"the lock holder said {said!r}, not 'unlocked'")

    def kill(self) -> None:
        """SIGKILL the holder: the lock stays held, as a dead process leaves it."""
        self.proc.kill()
        self.proc.wait()
