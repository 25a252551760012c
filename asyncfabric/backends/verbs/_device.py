"""Verbs device discovery: which device, port and GID index an engine uses, and the link facts.

Selection, in order: the provider string (``"pyverbs:DEVICE"`` or ``"pyverbs:DEVICE:PORT"``),
then ``ASYNCFABRIC_VERBS_DEVICE`` / ``ASYNCFABRIC_VERBS_PORT``, then the first device with an
ACTIVE port. The GID index is ``ASYNCFABRIC_VERBS_GID_INDEX`` when set, else the first RoCE v2
GID holding an IPv4-mapped address, else the first RoCE v2 GID, else index 0 (InfiniBand).
``ASYNCFABRIC_VERBS_MTU`` (256..4096) caps the path MTU below the port's active MTU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..._errors import BackendUnavailable

IBV_PORT_ACTIVE = 4
MTU_BYTES = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}
# ibv_port_attr.active_speed -> Gb/s per lane; active_width -> lanes
_SPEED_GBPS = {1: 2.5, 2: 5.0, 4: 10.0, 8: 10.0, 16: 14.0, 32: 25.0, 64: 50.0, 128: 100.0}
_WIDTH_LANES = {1: 1, 2: 4, 4: 8, 8: 12, 16: 2}


@dataclass(frozen=True)
class DeviceChoice:
    name: str
    port: int
    gid_index: int
    gid: bytes  # 16 bytes
    gid_type: str  # "RoCE v2", "IB/RoCE v1", ...
    lid: int
    mtu: int  # ibv_mtu enum (1..5)
    link_gbps: float
    max_msg_size: int
    link_layer: str

    @property
    def mtu_bytes(self) -> int:
        return MTU_BYTES.get(self.mtu, 0)


def _gid_type(name: str, port: int, idx: int, ctx) -> str:
    p = Path(f"/sys/class/infiniband/{name}/ports/{port}/gid_attrs/types/{idx}")
    try:
        return p.read_text().strip()
    except OSError:
        pass
    try:  # pyverbs: 0 IB/RoCE v1, 2 RoCE v2 (ibv_gid_type_sysfs)
        t = ctx.query_gid_type(port, idx)
        return "RoCE v2" if int(t) == 2 else "IB/RoCE v1"
    except Exception:
        return "unknown"


def _gid_bytes(gid) -> bytes:
    text = gid.gid if hasattr(gid, "gid") else str(gid)
    return bytes.fromhex(text.replace(":", ""))


def pick_gid(name: str, port: int, ctx, tbl_len: int, want: int | None) -> tuple[int, bytes, str]:
    if want is not None:
        if not 0 <= want < max(tbl_len, 1):
            raise BackendUnavailable(
                f"ASYNCFABRIC_VERBS_GID_INDEX={want} is outside {name} port {port}'s GID table "
                f"(0..{tbl_len - 1}); list GIDs with `show_gids` or `ibv_devinfo -v`"
            )
        g = _gid_bytes(ctx.query_gid(port, want))
        return want, g, _gid_type(name, port, want, ctx)
    found: list[tuple[int, int, bytes, str]] = []
    for i in range(min(tbl_len, 256)):
        try:
            g = _gid_bytes(ctx.query_gid(port, i))
        except Exception:
            continue
        if not any(g):
            continue
        t = _gid_type(name, port, i, ctx)
        v4 = g[:12] == b"\0" * 10 + b"\xff\xff"
        rank = 0 if (t == "RoCE v2" and v4) else 1 if t == "RoCE v2" else 2
        found.append((rank, i, g, t))
    if not found:
        raise BackendUnavailable(
            f"{name} port {port} has no valid GID; give its netdev an IP address "
            "(RoCE) or check the subnet manager (InfiniBand)"
        )
    rank, i, g, t = min(found)
    return i, g, t


def discover(spec: str) -> DeviceChoice:
    """Open nothing for long: query the chosen device and port and return the facts."""
    import pyverbs.device as d

    name, _, port_s = (spec or os.environ.get("ASYNCFABRIC_VERBS_DEVICE", "")).partition(":")
    port_s = port_s or os.environ.get("ASYNCFABRIC_VERBS_PORT", "")
    gid_env = os.environ.get("ASYNCFABRIC_VERBS_GID_INDEX")
    mtu_env = os.environ.get("ASYNCFABRIC_VERBS_MTU")
    try:
        port_want = int(port_s) if port_s else None
        gid_want = int(gid_env) if gid_env else None
        mtu_cap = int(mtu_env) if mtu_env else None
    except ValueError as exc:
        raise BackendUnavailable(
            f"bad verbs setting ({exc}): ports, GID index and MTU are integers"
        ) from None
    names = [
        x.name.decode() if isinstance(x.name, bytes) else str(x.name) for x in d.get_device_list()
    ]
    if not names:
        raise BackendUnavailable(
            "no RDMA device found (ibv_get_device_list is empty); on a machine without one, "
            "SoftRoCE gives one: `rdma link add rxe0 type rxe netdev eth0`"
        )
    if name and name not in names:
        raise BackendUnavailable(
            f"RDMA device {name!r} not found; devices here: {', '.join(names)}"
        )
    for dev in [name] if name else names:
        ctx = d.Context(name=dev)
        try:
            nports = ctx.query_device().phys_port_cnt
            for port in [port_want] if port_want else range(1, nports + 1):
                if not 1 <= port <= nports:
                    raise BackendUnavailable(f"{dev} has ports 1..{nports}, not {port}")
                pa = ctx.query_port(port)
                if pa.state != IBV_PORT_ACTIVE:
                    if name and port_want:
                        raise BackendUnavailable(
                            f"{dev} port {port} is not ACTIVE (state {pa.state}); check the link "
                            "(`ibv_devinfo`, `rdma link`)"
                        )
                    continue
                idx, gid, gtype = pick_gid(dev, port, ctx, pa.gid_tbl_len, gid_want)
                mtu = int(pa.active_mtu)
                if mtu_cap:
                    inv = {v: k for k, v in MTU_BYTES.items()}
                    if mtu_cap not in inv:
                        raise BackendUnavailable(
                            f"ASYNCFABRIC_VERBS_MTU={mtu_cap}: use 256, 512, 1024, 2048 or 4096"
                        )
                    mtu = min(mtu, inv[mtu_cap])
                gbps = _SPEED_GBPS.get(int(pa.active_speed), 0.0) * _WIDTH_LANES.get(
                    int(pa.active_width), 1
                )
                ll = {1: "InfiniBand", 2: "Ethernet"}.get(int(pa.link_layer), "unknown")
                return DeviceChoice(
                    dev, port, idx, gid, gtype, int(pa.lid), mtu, gbps, int(pa.max_msg_sz), ll
                )
        finally:
            ctx.close()
    raise BackendUnavailable(
        f"no ACTIVE port on {name or ', '.join(names)}; check `ibv_devinfo` (cable, link, "
        "subnet manager) or pick another device with pyverbs:DEVICE[:PORT]"
    )
