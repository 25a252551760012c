"""Transfer statuses and the one table that turns them into exceptions.

A status is 0 (success) or a negative errno. Transports report libfabric's
errnos as they are (POSIX values, and libfabric's own from 256 up) and map
anything else of theirs (a verbs work-completion status, a socket error) onto
the nearest errno below before it leaves them, so every backend fails a
transfer with the same exception for the same cause.
"""

from __future__ import annotations

import errno as _e
import os

from .._errors import PeerUnreachable, RemoteAccessError, TransferError

OK = 0
# libfabric's own errno values (rdma/fi_errno.h)
FI_ETOOSMALL = 257
FI_ETRUNC = 265
FI_EKEYREJECTED = _e.EKEYREJECTED  # 129 on Linux

PEER_EXITED = -_e.ESRCH
"""The peer's process is gone (same-host process watch)."""
PEER_TIMEOUT = -_e.ETIMEDOUT
"""The peer took or completed nothing within the engine's ``peer_timeout``."""
PEER_STALLED = -_e.ETIME
"""Transfers in flight saw no completion within ``peer_timeout``."""
PEER_LOCKED = -_e.ENOLCK
"""The peer's shared-memory queue lock stayed held for ``peer_timeout`` (a process died holding it)."""
PEER_RESET = -_e.ECONNRESET
"""The connection to the peer broke."""
ACCESS_DENIED = -_e.EACCES
"""The target refused the access (revoked key, no remote-write permission)."""
IO_ERROR = -_e.EIO
"""The transport failed the transfer for a reason of its own (device copy, CQ error)."""
CANCELED = -_e.ECANCELED
"""The transport cancelled it (a broken connection's queued work)."""

PEER_ERRNOS = frozenset(
    {
        _e.ESRCH,
        _e.ECONNABORTED,
        _e.ESHUTDOWN,
        _e.ECONNRESET,
        _e.ENOTCONN,
        _e.ETIMEDOUT,
        _e.ETIME,
        _e.ENOLCK,
        _e.ECONNREFUSED,
        _e.EHOSTDOWN,
        _e.EHOSTUNREACH,
        _e.EPIPE,
        _e.EIO,
        _e.ECANCELED,
        FI_ETRUNC,
    }
)
ACCESS_ERRNOS = frozenset({_e.EACCES, _e.EPERM, FI_EKEYREJECTED, FI_ETOOSMALL})

# What to tell the user, per errno with a cause worth naming.
_HINTS = {
    _e.ESRCH: (
        PeerUnreachable,
        "the peer's process has exited; its pending transfers failed and new ones are refused "
        "(connect to a live engine)",
    ),
    _e.ESHUTDOWN: (
        PeerUnreachable,
        "the peer is an engine of this process that was closed; its pending transfers failed "
        "and new ones are refused (connect to a live engine)",
    ),
    _e.ETIMEDOUT: (
        PeerUnreachable,
        "the peer took or completed nothing within the engine's peer_timeout (is the peer's "
        "engine still open, is the link up?); a later transfer may succeed once it is "
        "reachable again",
    ),
    _e.ETIME: (
        PeerUnreachable,
        "the peer acknowledged nothing within the engine's peer_timeout; it died or its link "
        "is down",
    ),
    _e.ENOLCK: (
        PeerUnreachable,
        "the peer's shared-memory queue lock stayed held for the engine's peer_timeout: a "
        "process that died while posting to it (or the peer itself, dying) holds it for good; "
        "nothing can be posted to that peer again: restart it and connect to its new engine",
    ),
    _e.ECONNRESET: (
        PeerUnreachable,
        "the connection to the peer broke; reopen both engines",
    ),
}


def describe(status: int) -> str:
    """The errno's text (libfabric's own values included)."""
    en = -status if status < 0 else status
    if en >= 256:
        names = {FI_ETOOSMALL: "buffer or key too small", FI_ETRUNC: "message truncated"}
        return names.get(en, f"libfabric error {en}")
    return os.strerror(en)


def status_error(status: int, what: str, detail: str | None = None) -> TransferError:
    """The exception for a failed transfer: ``what`` failed with ``status``.

    ``detail``: the transport's own text for the status (its strerror), when it has one.
    """
    en = -status if status < 0 else status
    text = detail or describe(status)
    hint = _HINTS.get(en)
    if hint is not None:
        cls, msg = hint
        return cls(f"{what} failed: {msg} ({text})", en)
    if en in ACCESS_ERRNOS:
        return RemoteAccessError(f"{what} was refused by the target: {text}", en)
    if en in PEER_ERRNOS:
        return PeerUnreachable(f"{what} failed, the peer is unreachable: {text}", en)
    return TransferError(f"{what} failed: {text} (errno {en})", en)
