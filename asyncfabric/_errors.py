"""The exceptions asyncfabric raises. Each message says what went wrong and what to do."""

from __future__ import annotations


class AsyncFabricError(Exception):
    """Base class of every asyncfabric error."""


class BackendUnavailable(AsyncFabricError):
    """The asked-for backend or provider does not exist or cannot run on this machine."""


class EngineClosed(AsyncFabricError):
    """The engine was closed; open a new one."""


class RegionError(AsyncFabricError, ValueError):
    """A local buffer or region cannot be used as given (unregistered, out of range, ...)."""


class DescriptorError(AsyncFabricError, ValueError):
    """Descriptor or address bytes are malformed, truncated, or for another transport."""


class TransferError(AsyncFabricError):
    """The transport failed a transfer. ``errno`` holds the provider's error number."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class PeerUnreachable(TransferError):
    """The peer could not be reached or went away; its pending transfers failed."""


class BatchError(TransferError):
    """Entries of a batch (``write_many``, ``scatter``, ``barrier``) failed; the rest landed.

    ``failures`` maps each failed entry's index (its place in the batch) to its
    exception; ``errno`` is the first failure's."""

    def __init__(self, message: str, failures: dict[int, Exception], errno: int = 0) -> None:
        super().__init__(message, errno)
        self.failures = failures


class Unsupported(TransferError):
    """The transport cannot do this operation (a one-sided read where it has none)."""


class RemoteAccessError(TransferError):
    """The target refused the access (revoked key, no remote-write permission)."""


class ImmTimeout(AsyncFabricError, TimeoutError):
    """A wait did not finish within its timeout."""


class TriggerDisarmed(AsyncFabricError):
    """A triggered write was disarmed before it fired: nothing of it was posted."""
