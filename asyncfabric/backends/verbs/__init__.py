"""Verbs backend on pyverbs: RC queue pairs per peer, WriteImm, SRQ-backed immediate counting.

Engine spec: ``"pyverbs"`` (first ACTIVE device) or ``"pyverbs:DEVICE[:PORT]"``. See
docs/backends/verbs.md for the design, the connection setup, and what runs in Python.
"""

from __future__ import annotations

from ..._errors import BackendUnavailable
from ...transport.contract import Backend, Transport

try:
    import pyverbs.device as _pvdev
except ImportError as exc:  # pragma: no cover - depends on the machine
    _pvdev = None
    _IMPORT_ERROR: str | None = (
        f"pyverbs is not importable ({exc}); install rdma-core's python3-pyverbs and put its "
        "package directory on PYTHONPATH (scripts/softroce/run-in-guest.sh does this)"
    )
else:
    _IMPORT_ERROR = None


class VerbsBackend(Backend):
    name = "pyverbs"
    needs = "rdma-core's python3-pyverbs and an ACTIVE RDMA port (ConnectX, SoftRoCE)"

    def auto(self, *, local_only: bool, nvlink: bool) -> list[tuple[int, str]]:
        # libfabric's verbs;ofi_rxm is the fast path; pyverbs is what remains without it
        return [] if local_only else [(25, p) for p in self.providers()]

    def providers(self) -> list[str]:
        if _IMPORT_ERROR:
            return []
        try:
            from ._device import discover

            return [discover("").name]
        except Exception:
            return []

    def open(
        self, provider: str, *, domains: int, node: str | None, ctrl_max: int, cuda: str = "auto"
    ) -> Transport:
        if _IMPORT_ERROR:
            raise BackendUnavailable(_IMPORT_ERROR)
        # This backend registers host memory only (Transport.hmem stays False), so the
        # staged wrapper (backends/staged) moves GPU tensors through pinned host memory.
        from ._transport import VerbsTransport

        return VerbsTransport(provider, domains=domains, ctrl_max=ctrl_max)
