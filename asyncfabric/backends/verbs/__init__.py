"""Verbs backend on pyverbs: RC queue pairs per peer, WriteImm, SRQ-backed immediate counting.

Engine spec: ``"pyverbs"`` (first ACTIVE device) or ``"pyverbs:DEVICE[:PORT]"``. See
docs/backends/verbs.md for the design, the connection setup, and what runs in Python.
"""

from __future__ import annotations

from ..._errors import BackendUnavailable
from ...abc import Backend, Transport

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

    def providers(self) -> list[str]:
        if _IMPORT_ERROR:
            return []
        try:
            from ._device import discover

            return [discover("").name]
        except Exception:
            return []

    def open(
        self, provider: str, *, domains: int, node: str | None, ctrl_max: int, hmem: bool
    ) -> Transport:
        if _IMPORT_ERROR:
            raise BackendUnavailable(_IMPORT_ERROR)
        # hmem asks for device-memory registration where the transport offers it; this
        # backend registers host memory only (Transport.hmem stays False), so the engine
        # stages CUDA tensors through pinned host memory.
        from ._transport import VerbsTransport

        return VerbsTransport(provider, domains=domains, ctrl_max=ctrl_max)
