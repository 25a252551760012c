"""This project's run of the backend conformance suite (asyncfabric.testing.conformance).

The tests live in the package, so third-party backends run the very same ones. Which
transports: ``ASYNCFABRIC_CONFORMANCE`` (or ``--af-conformance``), comma-separated engine
specs (``scripts/test-verbs.sh`` names ``libfabric:verbs;ofi_rxm,pyverbs`` in the SoftRoCE
guest); else ``CONFORMANCE_REQUIRED`` below, each of which must work here (or its tests
fail), plus whichever other defaults are usable (verbs on an RDMA host). ``example`` is the
third-party example backend in tests/example_backend (installed by scripts/setup.sh).
"""

from asyncfabric.testing.conformance.test_conformance import *  # noqa: F403

CONFORMANCE_REQUIRED = ("shm", "tcp", "example")
