"""The staged GPU path: CUDA memory on transports that cannot register it (docs/gpu.md).

A transport *wrapper* (entry point ``asyncfabric.wrappers: staged``): every
transport an engine opens passes through :class:`StagedWrapper`, which returns
a CUDA-native transport (cuda_ipc) unchanged and wraps any other in a
:class:`StagedTransport`. The engine knows nothing of CUDA: it registers a
tensor with ``device="cuda"``, and the wrapper registers it directly (the
provider has FI_HMEM and takes the registration) or gives it a host mirror.

A staged GPU region owns a pinned host *mirror* of its size, registered with the
inner transport; its registration is ``staged`` (the descriptor's FLAG_STAGED)
and carries the mirror's keys, and its ext starts with the stage id that
landing notices name.

Sender (staged source): every piece of the write (whole target chunks, about
:data:`PIECE_BYTES`) is copied device-to-host into the source's mirror on the
engine's copy stream, all pieces enqueued at once after the producer stream;
the network write of piece k is posted as soon as its copy's event completed,
so the copy of piece k+1 overlaps the write of piece k.

Receiver (staged target): pieces land in the target's mirror *without* the
immediate. Once a piece's write is complete at the sender, a landing notice (a
control message: stage id, offset, length, imm, count) follows; the receiver
copies that range host-to-device and only when the copy's event has completed
does it add ``count`` to the counter of ``imm``. The counting rule is unchanged
(pieces are whole multiples of the target's chunk_bytes, so the counts add up to
``expected_imms(n)``), and a counter never fires before the data is in GPU memory.

Control messages are framed (one byte: user message or landing notice), so the
wrapper advertises ``ctrl_max`` one less than its inner transport's
(``StagedWrapper.ctrl_overhead``; the registry opens the backend with room).

Failures: a failed device-to-host copy fails its write (``OpDone.error``, a
:class:`CopyFailed`); a failed host-to-device copy means a counter will never be
credited, so it is a :class:`~asyncfabric.transport.Fatal` that fails every wait.

No thread of ours waits on CUDA events: a CUDA host function (cudanote.c) rings
the transport's notify fd when a copy is done, and the follow-up (post the next
write, credit a counter) runs on the event-loop thread in the next drain, so
every transport call stays on the loop thread.

Whether a transport asks its provider for FI_HMEM at all is the backend's call
(libfabric: ``asyncfabric.backends.libfabric.wants_hmem``); this wrapper reads
the answer from ``inner.hmem``.
"""

from __future__ import annotations

from .copies import CopyFailed, CopyWaiter, StagedMemory, producer_stream
from .transport import (
    LANDING_NOTICE_BYTES,
    PIECE_BYTES,
    StagedRegistration,
    StagedRemote,
    StagedTransport,
    StagedWrapper,
)

__all__ = [
    "LANDING_NOTICE_BYTES",
    "PIECE_BYTES",
    "CopyFailed",
    "CopyWaiter",
    "StagedMemory",
    "StagedRegistration",
    "StagedRemote",
    "StagedTransport",
    "StagedWrapper",
    "producer_stream",
]
