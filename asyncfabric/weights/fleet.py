"""Finding the trainers and receivers of one weight-update instance through a group.

Each member says what it is in its join metadata (:func:`receiver_meta`,
:func:`sender_meta`) and publishes its descriptors (:func:`publish_receiver`,
:func:`publish_sender`). Trainers read the group before each update
(:meth:`Fleet.receivers`): descriptors are looked up only for members not seen
before, and a sender recomputes its binding only when the set changed, so an
inference fleet may grow or shrink between updates.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import asyncfabric as af

from .endpoints import ReceiverInfo, SenderInfo
from .errors import LayoutError
from .receiver import Receiver
from .sender import Sender


def receiver_meta(rx: Receiver, instance: str = "weights") -> dict[str, Any]:
    """Join metadata for a receiver (``af.join(..., meta=receiver_meta(rx))``)."""
    return {"weights": instance, "role": "receiver", "index": rx.index, "rank": rx.rank,
            "layout": rx.layout.key}  # fmt: skip


def sender_meta(tx: Sender, instance: str = "weights") -> dict[str, Any]:
    """Join metadata for a trainer rank."""
    return {"weights": instance, "role": "sender", "rank": tx.rank}


async def publish_receiver(group: Any, rx: Receiver, instance: str = "weights") -> None:
    """Publish the receiver's two buffers (revoked when it leaves)."""
    info = rx.info
    await group.publish(f"{instance}/buf0", info.buffers[0])
    await group.publish(f"{instance}/buf1", info.buffers[1])


async def publish_sender(group: Any, tx: Sender, instance: str = "weights") -> None:
    """Publish the trainer rank's acknowledgement target."""
    await group.publish(f"{instance}/ack", tx.info.ack)


class Fleet:
    """The members of one instance in ``group``; ``layouts``: the inference layouts
    receivers may name (by key)."""

    def __init__(self, group: Any, layouts: Iterable[Any], instance: str = "weights") -> None:
        self.group = group
        self.instance = instance
        self.layouts = {lay.key: lay for lay in layouts}
        self._rx: dict[tuple[str, float], ReceiverInfo] = {}
        self._tx: dict[tuple[str, float], SenderInfo] = {}

    def _ours(self, role: str) -> list[Any]:
        ms = [m for m in self.group.members.values()
              if m.meta.get("weights") == self.instance and m.meta.get("role") == role]  # fmt: skip
        return sorted(ms, key=lambda m: m.name)

    async def receivers(self, *, timeout: float = 5.0) -> tuple[ReceiverInfo, ...]:
        """The receivers in the group now (looking up only the new ones)."""
        out = []
        seen = set()
        for m in self._ours("receiver"):
            key = (m.name, m.joined)
            seen.add(key)
            info = self._rx.get(key)
            if info is None:
                lay = self.layouts.get(m.meta["layout"])
                if lay is None:
                    raise LayoutError(
                        f"receiver {m.name} uses layout {m.meta['layout']}, which this trainer "
                        "was not given; pass every inference layout to Fleet(layouts=...)"
                    )
                b0 = await self.group.lookup(m.name, f"{self.instance}/buf0", timeout=timeout)
                b1 = await self.group.lookup(m.name, f"{self.instance}/buf1", timeout=timeout)
                info = self._rx[key] = ReceiverInfo(
                    m.name, int(m.meta["index"]), int(m.meta["rank"]), lay, (b0, b1)
                )
            out.append(info)
        for k in [k for k in self._rx if k not in seen]:
            del self._rx[k]
        return tuple(out)

    async def senders(self, *, timeout: float = 5.0) -> tuple[SenderInfo, ...]:
        """The trainer ranks in the group now."""
        out = []
        for m in self._ours("sender"):
            key = (m.name, m.joined)
            info = self._tx.get(key)
            if info is None:
                d: af.Descriptor = await self.group.lookup(
                    m.name, f"{self.instance}/ack", timeout=timeout
                )
                info = self._tx[key] = SenderInfo(m.name, int(m.meta["rank"]), d)
            out.append(info)
        return tuple(out)
