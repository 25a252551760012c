"""pytest plugin of the conformance suite: the ``--af-conformance=SPEC[,SPEC]`` option.

Registered as the ``pytest11`` entry point ``asyncfabric.testing.conformance.plugin``
(named after this module, so ``-p asyncfabric.testing.conformance.plugin`` and
autoloading never register it twice). Inert unless a run asks for specs: it adds
the option and, when specs are named, a header line; it defines no fixture and
touches no test outside the suite. See :mod:`asyncfabric.testing.conformance`.
"""

from __future__ import annotations

from typing import Any

from . import ENV, OPTION, requested


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("asyncfabric", "asyncfabric backend conformance")
    group.addoption(
        OPTION,
        dest="af_conformance",
        default=None,
        metavar="SPEC[,SPEC]",
        help=(
            "engine specs the asyncfabric conformance suite runs against (e.g. 'mybackend' or "
            f"'shm,tcp'); default: ${ENV}, else the transports usable here. Run the suite with "
            "--pyargs asyncfabric.testing.conformance"
        ),
    )


def pytest_report_header(config: Any) -> str | None:
    named = requested(config.getoption("af_conformance", None))
    if named is None:
        return None
    specs, source = named
    return f"asyncfabric conformance: {', '.join(specs)} (named by {source})"
