"""Ctrl-C reaches Python in a process that opened an engine.

libfabric's first provider lookup installs C-level SIGINT handlers (one of them calls
exit(1)); the libfabric backend gives SIGINT back to Python after it. Before that, the
script below exited with status 1 and never saw KeyboardInterrupt.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from asyncfabric.transport import registry

SCRIPT = textwrap.dedent(
    """
    import os, signal, time
    import asyncfabric as af

    async def main():
        async with af.Engine("shm"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)

    try:
        af.run(main())
    except KeyboardInterrupt:
        print("interrupted cleanly")
    """
)


@pytest.mark.skipif(
    "shm" not in registry.backends()["libfabric"].providers(), reason="no shm provider"
)
def test_ctrl_c_raises_keyboard_interrupt():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "interrupted cleanly" in r.stdout
