"""Command line: ``asyncfabric demo`` and ``asyncfabric bench`` (also ``python -m asyncfabric``)."""

from __future__ import annotations

import sys

USAGE = """usage: asyncfabric COMMAND [ARGS]

commands:
  demo     two-process loopback demo on the shm provider (moves 1 GiB, verifies it)
  bench    benchmark runner (asyncfabric bench --help)
  info     the providers usable on this machine
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = args[0], args[1:]
    if cmd == "demo":
        from .demo import main as demo

        return demo(rest)
    if cmd == "bench":
        try:
            from .bench.cli import main as bench
        except ImportError as exc:
            print(f"asyncfabric bench is unavailable: {exc}", file=sys.stderr)
            return 2
        return bench(rest)
    if cmd == "info":
        from .backends import backends

        for name, b in sorted(backends().items()):
            print(f"{name}: {', '.join(b.providers()) or '(no provider usable here)'}")
        return 0
    print(f"unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
