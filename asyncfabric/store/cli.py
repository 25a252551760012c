"""``asyncfabric store serve --listen HOST:PORT``: run the embedded store as a process.

The secret never goes on the command line (other users can read it in ``ps``):
it comes from ``$ASYNCFABRIC_STORE_SECRET`` or ``--secret-file``.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from .._cli import CliParser


def main(argv: list[str]) -> int:
    p = CliParser(
        prog="asyncfabric store",
        description="Run the embedded group store (members connect to af://HOST:PORT).",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve the embedded store until interrupted")
    s.add_argument("--listen", default="127.0.0.1:7400", help="HOST:PORT (port 0: any free)")
    s.add_argument(
        "--secret-file",
        help="file holding the shared secret (default: $ASYNCFABRIC_STORE_SECRET)",
    )
    a = p.parse_args(argv)
    from .server import split_hostport

    try:
        split_hostport(a.listen, "--listen")
    except ValueError as exc:
        p.error(str(exc))
    return asyncio.run(_serve(a.listen, a.secret_file))


async def _serve(listen: str, secret_file: str | None) -> int:
    from . import serve

    srv = await serve(listen, secret_file=secret_file)
    # one line a supervisor (or a test) can read: where members connect
    print(f"asyncfabric store: serving {srv.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await srv.aclose()
    print("asyncfabric store: stopped", file=sys.stderr, flush=True)
    return 0
