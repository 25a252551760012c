"""What every command line of asyncfabric shares: one-line failures and exit statuses.

A failure is reported as one line on stderr, ``asyncfabric CMD: ErrorClass: message``,
and a non-zero exit status; ``--debug`` adds the traceback. ``asyncfabric.__main__``,
``asyncfabric.demo`` and ``asyncfabric.bench.cli`` all use it.
"""

from __future__ import annotations

import argparse
import builtins
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

USAGE = """usage: asyncfabric [--debug] COMMAND [ARGS]

commands:
  demo     two-process loopback demo on the shm provider (moves 1 GiB, verifies it)
  bench    benchmark runner (asyncfabric bench --help)
  store    the embedded group store (asyncfabric store serve --listen HOST:PORT)
  info     the providers usable on this machine

options:
  --debug  print the traceback of a failure (also accepted after COMMAND)

exit status: 0 success, 1 the run failed, 2 bad command line, 130 interrupted
"""

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def one_line(text: str) -> str:
    """``text`` with its lines joined and runs of whitespace collapsed."""
    return " ".join(text.split())


def _ours(exc: BaseException) -> bool:
    """Whether ``exc`` is an :class:`asyncfabric.AsyncFabricError` (told by name: this must
    work even when importing the package is what failed)."""
    return any(c.__name__ == "AsyncFabricError" for c in type(exc).__mro__)


def _leaf(exc: BaseException) -> BaseException:
    """The exception to name: the first asyncfabric error inside an exception group, if any."""
    group = getattr(builtins, "BaseExceptionGroup", None)  # Python 3.11+
    while group is not None and isinstance(exc, group) and exc.exceptions:
        subs = exc.exceptions
        exc = next((e for e in subs if _ours(e)), subs[0])
    return exc


def describe(exc: BaseException) -> str:
    """``ErrorClass: message (notes)`` on one line."""
    exc = _leaf(exc)
    msg = one_line(str(exc))
    notes = [one_line(str(n)) for n in getattr(exc, "__notes__", None) or ()]
    if notes:
        msg += "; " + "; ".join(notes)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def report(cmd: str, exc: BaseException, *, debug: bool) -> int:
    """Print ``exc`` as one line (with its traceback under ``debug``); return the exit status."""
    if isinstance(_leaf(exc), KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    # an asyncfabric error's message says what to do; anything else may be a bug
    expected = debug or _ours(_leaf(exc))
    hint = "" if expected else " (run with --debug for the traceback)"
    print(f"asyncfabric {cmd}: {describe(exc)}{hint}", file=sys.stderr, flush=True)
    return EXIT_FAILED


def guarded(cmd: str, fn: Callable[[], int], *, debug: bool) -> int:
    """Run ``fn`` and turn whatever it raises into one line and an exit status."""
    try:
        return fn()
    except SystemExit as exc:  # argparse (usage errors: 2), or a command's own exit
        code = exc.code
        if code is None or isinstance(code, int):
            return code or 0
        print(f"asyncfabric {cmd}: {code}", file=sys.stderr)
        return EXIT_FAILED
    except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt too: exit 130 quietly
        if not isinstance(_leaf(exc), (Exception, KeyboardInterrupt)):
            raise  # GeneratorExit and the like are not ours to report
        return report(cmd, exc, debug=debug)
