"""Command line: ``asyncfabric demo`` and ``asyncfabric bench`` (also ``python -m asyncfabric``).

A failure is reported as one line on stderr, ``asyncfabric CMD: ErrorClass: message``,
and a non-zero exit status; ``--debug`` (before or after the command) adds the traceback.
"""

from __future__ import annotations

import sys

from ._cli import (
    EXIT_FAILED,
    EXIT_USAGE,
    USAGE,
    guarded,
)


def _info() -> int:
    from .transport.registry import backends

    for name, b in sorted(backends().items()):
        provs = b.providers()
        print(f"{name}: {', '.join(provs) or '(no provider usable here)'}")
    return 0


BENCH_EXTRA = ("rich", "matplotlib")  # pip install 'asyncfabric[bench]'


def _bench(rest: list[str]) -> int:
    try:
        from .bench.cli import main as bench

        return bench(rest)
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in BENCH_EXTRA:
            raise
        print(
            f"asyncfabric bench: unavailable (no module named {exc.name!r}); "
            "install it with: pip install 'asyncfabric[bench]'",
            file=sys.stderr,
        )
        return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # --debug is global: before the command, or anywhere after it (not after a "--")
    end = args.index("--") if "--" in args else len(args)
    debug = "--debug" in args[:end]
    args = [a for i, a in enumerate(args) if a != "--debug" or i >= end]
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = args[0], args[1:]
    if cmd == "demo":

        def demo() -> int:
            from .demo import main as demo_main

            return demo_main(rest, debug=debug)

        return guarded(cmd, demo, debug=debug)
    if cmd == "bench":
        return guarded(cmd, lambda: _bench(rest), debug=debug)
    if cmd == "store":

        def store() -> int:
            from .store.cli import main as store_main

            return store_main(rest)

        return guarded(cmd, store, debug=debug)
    if cmd == "info":
        return guarded(cmd, _info, debug=debug)
    print(
        f"asyncfabric: error: unknown command {cmd!r} (choose from demo, bench, store, info; "
        "see asyncfabric --help)",
        file=sys.stderr,
    )
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
