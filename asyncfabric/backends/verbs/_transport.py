"""The pyverbs transport: RC queue pairs per peer, set up over a per-domain UD queue pair.

Threading: none of ours touches verbs. Every verbs call runs on the event-loop thread: the
engine's ``notify_fd`` is an epoll fd over each domain's completion-channel fd (found in
/proc/self/fd, pyverbs 44 has no accessor) plus an eventfd that a small ticker thread rings
for timers (connection-setup retries, peer_timeout). pyverbs' blocking calls hold the GIL, so a
progress thread blocked in ``get_cq_event`` would freeze the whole interpreter: hence the fd.

What is Python and what is native: posting builds one pyverbs SendWR per chunk or page and
posts them as one chained list per queue pair and batch (one ``ibv_post_send``); only the
last WR of a chain is signaled, so completion work is per chain. A write, paged write or read
is one chain (as long as the send queue has room); a ``write_many`` batch is, per peer and
domain, chains of at most :attr:`VerbsTransport.chain_wrs` WRs (``ASYNCFABRIC_VERBS_CHAIN``),
so a failed chain names the entries it carried and credits come back as chains end. Every
WR of a chain carries the chain's id: an error completion of any of them ends the chain with
the real status. Receive completions of
WriteImm are counted in Python (one dict update per immediate) and their receive buffers are
reposted as one chained list per poll batch. The libfabric backend does all of this natively.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import pyverbs.enums as e  # noqa: E402  (imported by the package only when pyverbs exists)
from pyverbs.addr import AH, GID, AHAttr, GlobalRoute  # noqa: E402
from pyverbs.cq import CQ, CompChannel  # noqa: E402
from pyverbs.device import Context  # noqa: E402
from pyverbs.mr import MR  # noqa: E402
from pyverbs.pd import PD  # noqa: E402
from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr  # noqa: E402
from pyverbs.srq import SRQ, SrqAttr, SrqInitAttr  # noqa: E402
from pyverbs.wr import SGE, RecvWR, SendWR  # noqa: E402

from ..._errors import BackendUnavailable, PeerUnreachable, RemoteAccessError, TransferError
from ...transport import status as st
from ...transport.contract import (
    PagedWrite,
    PolicyNs,
    Registration,
    Remote,
    Target,
    Transport,
    WriteBatch,
)
from ...transport.counters import CounterTable
from ...transport.counting import plan_chunks
from ...transport.events import Event, EventQueue
from ._device import DeviceChoice, discover

# Queue-pair attributes, set deliberately (docs/backends/verbs.md explains each).
QP_TIMEOUT = 14  # local ACK timeout 4.096 us * 2^14 = 67 ms per try
QP_RETRY_CNT = 7  # transport retries: a dead peer is declared after ~8 tries (~0.5 s)
QP_RNR_RETRY = 7  # 7 = retry forever on RNR: a live receiver that is slow is not an error
QP_MIN_RNR_TIMER = 12  # 0.64 ms between RNR retries
SQ_DEPTH = 512
CHAIN_WRS = 16  # WRs per post_send chain of a batch, unless ASYNCFABRIC_VERBS_CHAIN says
SRQ_DEPTH = 1024
UD_SLOTS = 64
SEND_SLOTS = 64
UD_QKEY = 0x41464231
GRH = 40
CM_RETRY_S = 0.2
CTRL_TICK_S = 0.05

# status codes reported for failed transfers (negative, like the libfabric backend's)
ST_SETUP_TIMEOUT = -110  # ETIMEDOUT: the peer never answered connection setup
ST_PEER_LOST = -104  # ECONNRESET: the connection to the peer broke
ST_STALLED = -62  # ETIME: batches in flight saw no completion within peer_timeout
ST_WC = -1000  # -1000 - ibv_wc_status

_ADDR = struct.Struct("!BBHB3x16sI")  # version, port, lid, mtu, gid, UD QPN
_CM = struct.Struct("!BB2xII28s")  # kind, version, rc qpn, psn, sender's domain address
CM_REQ, CM_REP = 1, 2
ADDR_VERSION = 1

_K_SRQ, _K_UD_RECV, _K_UD_SEND, _K_SIG = 1, 2, 3, 4
_KSHIFT = 56
_KMASK = (1 << _KSHIFT) - 1

OP_WRITE = e.IBV_WR_RDMA_WRITE
OP_WRITE_IMM = e.IBV_WR_RDMA_WRITE_WITH_IMM
OP_SEND = e.IBV_WR_SEND
OP_READ = e.IBV_WR_RDMA_READ


def _chain_env() -> int:
    """``ASYNCFABRIC_VERBS_CHAIN``: WRs per ``post_send`` chain of a batch (read once)."""
    v = os.environ.get("ASYNCFABRIC_VERBS_CHAIN", "")
    try:
        n = int(v) if v else CHAIN_WRS
    except ValueError:
        n = 0
    if not 1 <= n <= SQ_DEPTH:
        raise BackendUnavailable(
            f"ASYNCFABRIC_VERBS_CHAIN={v!r}: give a number of work requests, 1..{SQ_DEPTH}"
        )
    return n


def _fd_links() -> dict[str, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the directory fd of this very listing
            continue
    return out


def _find_channel_fd(before: dict[str, str]) -> int:
    """The fd a CompChannel just opened: new in /proc/self/fd, preferably an rdma event file."""
    new = [(n, ln) for n, ln in _fd_links().items() if before.get(n) != ln]
    for n, ln in new:
        if "infiniband" in ln:
            return int(n)
    return int(new[0][0]) if len(new) == 1 else -1


class VerbsRemote(Remote):
    __slots__ = ("bases", "keys")

    def __init__(self, peer: int, ndom: int, target: Target) -> None:
        super().__init__(peer, ndom, target)
        self.bases, self.keys = target.bases, target.keys


def _errno_of(status: int) -> int:
    """This backend's status as the contract's negative errno (transport.status)."""
    if status > ST_WC:
        return status  # already an errno: ETIMEDOUT, ECONNRESET, ETIME
    wcs = ST_WC - status
    if wcs == e.IBV_WC_REM_ACCESS_ERR:
        return st.ACCESS_DENIED
    if wcs in (e.IBV_WC_RETRY_EXC_ERR, e.IBV_WC_RNR_RETRY_EXC_ERR, e.IBV_WC_WR_FLUSH_ERR):
        return st.PEER_RESET
    return st.IO_ERROR


class _Op:
    """One transfer's work on one peer: per domain, the WRs still to post (``specs``).

    A spec is ``(opcode, local addr, length, lkey, remote addr, rkey, imm_be, entry)``
    (``entry``: the batch entry it belongs to, -1 outside batches) or ``(OP_SEND, data)``.
    ``chain`` caps the WRs of one post (0: what the send queue has room for); ``group`` is
    the batch this op is one peer's part of."""

    __slots__ = ("token", "specs", "outstanding", "status", "slot", "chain", "group")

    def __init__(self, token: int, ndom: int) -> None:
        self.token = token
        self.specs: list[deque] = [deque() for _ in range(ndom)]
        self.outstanding = 0
        self.status = 0
        self.slot = -1
        self.chain = 0
        self.group: _Group | None = None


class _Group:
    """A batch in flight: its peers' ops count down to its one OpDone."""

    __slots__ = ("token", "wb", "left", "status")

    def __init__(self, token: int, wb: WriteBatch, left: int) -> None:
        self.token, self.wb, self.left = token, wb, left
        self.status = 0


class _Conn:
    """One RC queue pair to one peer domain."""

    __slots__ = (
        "dom", "addr", "qp", "qpn", "psn", "remote_qpn", "ready", "failed", "sq_used",
        "waitq", "ah", "peer_ud_qpn", "peer_gid", "peer_lid", "mtu", "next_req", "deadline",
        "busy", "last_progress",
    )  # fmt: skip

    def __init__(self, dom: _Dom, addr: bytes) -> None:
        ver, _port, lid, mtu, gid, udqpn = _ADDR.unpack(addr)
        self.dom, self.addr = dom, addr
        self.peer_gid, self.peer_lid, self.peer_ud_qpn = gid, lid, udqpn
        self.mtu = min(mtu, dom.dev.mtu)
        cap = QPCap(max_send_wr=SQ_DEPTH, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
        init = QPInitAttr(
            qp_type=e.IBV_QPT_RC, scq=dom.cq, rcq=dom.cq, srq=dom.srq, cap=cap, sq_sig_all=0
        )
        attr = QPAttr(port_num=dom.dev.port)
        attr.qp_access_flags = (
            e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_REMOTE_READ
        )
        self.qp = QP(dom.pd, init, attr)  # RESET -> INIT
        self.qpn = self.qp.qp_num
        self.psn = int.from_bytes(os.urandom(3), "little")
        self.remote_qpn = -1
        self.ready = False
        self.failed = 0
        self.sq_used = 0
        self.waitq: deque[_Op] = deque()
        self.ah = dom.make_ah(gid, lid)
        self.next_req = 0.0
        self.deadline = 0.0
        self.busy = 0  # signaled batches in flight
        self.last_progress = 0.0

    def connect(self, rqpn: int, rpsn: int) -> None:
        dev = self.dom.dev
        attr = QPAttr(port_num=dev.port)
        attr.path_mtu = self.mtu
        attr.dest_qp_num = rqpn
        attr.rq_psn = rpsn
        attr.sq_psn = self.psn
        attr.max_dest_rd_atomic = 1
        attr.max_rd_atomic = 1
        attr.min_rnr_timer = QP_MIN_RNR_TIMER
        attr.timeout = QP_TIMEOUT
        attr.retry_cnt = QP_RETRY_CNT
        attr.rnr_retry = QP_RNR_RETRY
        gr = GlobalRoute(dgid=GID(_gid_text(self.peer_gid)), sgid_index=dev.gid_index)
        attr.ah_attr = AHAttr(port_num=dev.port, is_global=1, gr=gr, dlid=self.peer_lid)
        self.qp.to_rts(attr)  # INIT -> RTR -> RTS
        self.remote_qpn = rqpn


def _gid_text(g: bytes) -> str:
    h = g.hex()
    return ":".join(h[i : i + 4] for i in range(0, 32, 4))


class _Dom:
    """One device context: PD, completion channel + CQ, SRQ, UD setup QP, control buffers."""

    def __init__(self, t: VerbsTransport, index: int, dev: DeviceChoice, ctrl_max: int) -> None:
        self.t, self.index, self.dev = t, index, dev
        self.ctx = Context(name=dev.name)
        self.pd = PD(self.ctx)
        before = _fd_links()
        self.chan = CompChannel(self.ctx)
        self.chan_fd = _find_channel_fd(before)
        if self.chan_fd < 0:
            raise BackendUnavailable(
                "cannot find the verbs completion channel's file descriptor in /proc/self/fd"
            )
        fl = fcntl.fcntl(self.chan_fd, fcntl.F_GETFL)
        fcntl.fcntl(self.chan_fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
        ncqe = min(SRQ_DEPTH + UD_SLOTS * 2 + 8 * SQ_DEPTH, 32767)
        self.cq = CQ(self.ctx, ncqe, None, self.chan, 0)
        self.cq.req_notify()
        self.srq = SRQ(self.pd, SrqInitAttr(SrqAttr(max_wr=SRQ_DEPTH, max_sge=1)))
        self.ctrl_max = ctrl_max
        lw = e.IBV_ACCESS_LOCAL_WRITE
        self.rx = MR(self.pd, SRQ_DEPTH * ctrl_max, lw)
        self.tx = MR(self.pd, SEND_SLOTS * ctrl_max, lw)
        self.tx_free = list(range(SEND_SLOTS))
        self.zero_sge = SGE(self.tx.buf, 0, self.tx.lkey)  # pyverbs needs one SGE per WR
        self.ud_rx = MR(self.pd, UD_SLOTS * (GRH + 64), lw)
        self.ud_tx = MR(self.pd, UD_SLOTS * 64, lw)
        self.ud_tx_free = list(range(UD_SLOTS))
        self.ud_pending: deque[tuple[_Conn, bytes]] = deque()
        cap = QPCap(max_send_wr=UD_SLOTS, max_recv_wr=UD_SLOTS, max_send_sge=1, max_recv_sge=1)
        init = QPInitAttr(qp_type=e.IBV_QPT_UD, scq=self.cq, rcq=self.cq, cap=cap, sq_sig_all=1)
        attr = QPAttr(port_num=dev.port)
        attr.qkey = UD_QKEY
        attr.pkey_index = 0
        self.ud = QP(self.pd, init, attr)
        if self.ud.qp_state != e.IBV_QPS_RTS:
            attr = QPAttr(port_num=dev.port)
            attr.sq_psn = 0
            self.ud.to_rts(attr)
        self._post_srq(range(SRQ_DEPTH))
        self._post_ud_recv(range(UD_SLOTS))
        self.address = _ADDR.pack(ADDR_VERSION, dev.port, dev.lid, dev.mtu, dev.gid, self.ud.qp_num)
        self.conns: dict[bytes, _Conn] = {}  # peer domain address -> conn
        self.sig: dict[int, tuple[_Op, _Conn, int]] = {}
        self.ahs: dict[tuple[bytes, int], AH] = {}

    def make_ah(self, gid: bytes, lid: int) -> AH:
        ah = self.ahs.get((gid, lid))
        if ah is None:
            gr = GlobalRoute(dgid=GID(_gid_text(gid)), sgid_index=self.dev.gid_index)
            attr = AHAttr(port_num=self.dev.port, is_global=1, gr=gr, dlid=lid)
            ah = self.ahs[(gid, lid)] = AH(self.pd, attr=attr)
        return ah

    def _post_srq(self, slots) -> None:
        base, n = self.rx.buf, self.ctrl_max
        lkey = self.rx.lkey
        # pyverbs links the C structs but does not keep the Python objects alive: hold them all
        # until the post returns, or a freed middle WR is posted as garbage.
        wrs = [
            RecvWR(wr_id=(_K_SRQ << _KSHIFT) | s, num_sge=1, sg=[SGE(base + s * n, n, lkey)])
            for s in slots
        ]
        for a, b in zip(wrs, wrs[1:]):
            a.next_wr = b
        if wrs:
            self.srq.post_recv(wrs[0])

    def _post_ud_recv(self, slots) -> None:
        for s in slots:
            sz = GRH + 64
            wr = RecvWR(
                wr_id=(_K_UD_RECV << _KSHIFT) | s,
                num_sge=1,
                sg=[SGE(self.ud_rx.buf + s * sz, sz, self.ud_rx.lkey)],
            )
            self.ud.post_recv(wr)

    def cm_send(self, conn: _Conn, kind: int) -> None:
        msg = _CM.pack(kind, ADDR_VERSION, conn.qpn, conn.psn, self.address)
        if not self.ud_tx_free:
            self.ud_pending.append((conn, msg))
            return
        s = self.ud_tx_free.pop()
        self.ud_tx.write(msg, len(msg), s * 64)
        wr = SendWR(
            wr_id=(_K_UD_SEND << _KSHIFT) | s,
            opcode=OP_SEND,
            num_sge=1,
            sg=[SGE(self.ud_tx.buf + s * 64, len(msg), self.ud_tx.lkey)],
            send_flags=e.IBV_SEND_SIGNALED,
        )
        wr.set_wr_ud(conn.ah, conn.peer_ud_qpn, UD_QKEY)
        self.ud.post_send(wr)


class VerbsTransport(Transport):
    backend = "pyverbs"
    chain_wrs: int = _chain_env()
    """WRs per ``post_send`` chain of a ``write_many`` batch, each chain signaled once."""

    def __init__(self, spec: str, *, domains: int, ctrl_max: int) -> None:
        dev = discover(spec)
        self.dev = dev
        self.provider = dev.name
        self.ndomains = domains
        self.max_msg_size = dev.max_msg_size
        self.inject_size = 0
        self.ctrl_max = ctrl_max
        self._closed = False
        self._events = EventQueue()
        self._ctr = CounterTable()
        self._mrs: dict[int, list[MR]] = {}
        self._next_mr = 1
        self._peers: list[list[_Conn]] = []
        self._next_sig = 1
        self._stats = dict.fromkeys(
            ("completions", "imms", "posts", "batches", "cq_events", "wakeups", "cq_errors"), 0
        )
        self._tick = threading.Event()
        self._ep = select.epoll()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._efd, select.EPOLLIN)
        self._doms: list[_Dom] = []
        try:
            for i in range(domains):
                d = _Dom(self, i, dev, ctrl_max)
                self._doms.append(d)
                self._ep.register(d.chan_fd, select.EPOLLIN)
        except BaseException:
            self.close()
            raise
        self._chan_fds = {d.chan_fd: d for d in self._doms}
        self._timed = 0  # conns waiting on setup; the ticker runs while > 0
        self._busy = 0  # conns with batches in flight (watched for stalls)
        self._post_timeout = 5.0
        self._ticker = threading.Thread(target=self._tick_loop, daemon=True, name="af-verbs-tick")
        self._spin_ns = 0

    # ------------------------------------------------------------ lifecycle

    @property
    def addresses(self) -> list[bytes]:
        return [d.address for d in self._doms]

    @property
    def notify_fd(self) -> int:
        return self._ep.fileno()

    def start(self, policy: PolicyNs) -> None:
        self._post_timeout = policy.post_timeout_ns / 1e9 if policy.post_timeout_ns else 1e9
        self._spin_ns = policy.spin_ns
        self._ticker.start()

    def _tick_loop(self) -> None:
        while not self._closed:
            if self._timed or self._busy:
                time.sleep(CTRL_TICK_S)
                if not self._closed:
                    os.eventfd_write(self._efd, 1)
            else:
                self._tick.wait(1.0)
                self._tick.clear()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._tick.set()
        # Queue pairs to ERROR so the device flushes what is outstanding, then a short drain so
        # nothing is destroyed under the device's feet; pyverbs closes children with the context.
        for d in self._doms:
            for c in d.conns.values():
                try:
                    c.qp.modify(QPAttr(qp_state=e.IBV_QPS_ERR), e.IBV_QP_STATE)
                except Exception:
                    pass
        end = time.monotonic() + 0.2
        while time.monotonic() < end and any(d.sig for d in self._doms):
            for d in self._doms:
                try:
                    n, wcs = d.cq.poll(64)
                except Exception:
                    n = 0
                for wc in wcs if n else ():
                    k = wc.wr_id >> _KSHIFT
                    if k == _K_SIG:
                        d.sig.pop(wc.wr_id & _KMASK, None)
        for d in self._doms:
            try:
                d.ctx.close()
            except Exception:
                pass
        self._doms.clear()
        self._ep.close()
        os.close(self._efd)

    # ------------------------------------------------------------ peers (connection setup)

    def add_peer(self, addresses: Sequence[bytes]) -> int:
        conns = []
        for d, a in zip(self._doms, addresses):
            a = bytes(a)
            if len(a) != _ADDR.size or a[0] != ADDR_VERSION:
                raise PeerUnreachable(
                    "the peer's verbs address is malformed or from another version; is the peer "
                    "an asyncfabric pyverbs engine of the same version?"
                )
            c = d.conns.get(a) or self._new_conn(d, a)
            if not c.ready and not c.failed:
                self._start_setup(c)
            conns.append(c)
        self._peers.append(conns)
        return len(self._peers) - 1

    def _new_conn(self, d: _Dom, a: bytes) -> _Conn:
        try:
            c = _Conn(d, a)
        except Exception as exc:
            raise PeerUnreachable(f"cannot create a queue pair for the peer: {exc}") from None
        d.conns[a] = c
        return c

    def _start_setup(self, c: _Conn) -> None:
        if c.deadline:
            return
        now = time.monotonic()
        c.deadline = now + self._post_timeout
        c.next_req = now + CM_RETRY_S
        self._timed += 1
        self._tick.set()
        c.dom.cm_send(c, CM_REQ)

    def _on_cm(self, d: _Dom, data: bytes) -> None:
        try:
            kind, ver, qpn, psn, addr = _CM.unpack_from(data, GRH)
        except struct.error:
            return
        if ver != ADDR_VERSION:
            return
        c = d.conns.get(addr) or self._new_conn(d, addr)
        if c.failed:
            return
        if c.remote_qpn < 0:
            c.connect(qpn, psn)
        elif c.remote_qpn != qpn:
            return  # a stale message for an older queue pair
        if kind == CM_REQ:
            d.cm_send(c, CM_REP)
        elif kind == CM_REP and not c.ready:
            c.ready = True
            if c.deadline:
                c.deadline = 0.0
                self._timed -= 1
            self._pump(c)

    def _on_tick(self) -> None:
        now = time.monotonic()
        for d in self._doms:
            for c in list(d.conns.values()):
                if c.busy and not c.failed and now - c.last_progress > self._post_timeout:
                    # A dead peer's device may drop packets without the requester ever timing
                    # out (seen with rxe): fail what is in flight after peer_timeout of silence.
                    for op, c2, _, ents in d.sig.values():
                        if c2 is c:
                            op.status = op.status or ST_STALLED
                            self._fail_ents(op, ents, ST_STALLED)
                    self._fail_conn(c, ST_STALLED)
                    continue
                if not c.deadline or c.ready or c.failed:
                    continue
                if now >= c.deadline:
                    c.deadline = 0.0
                    self._timed -= 1
                    self._fail_conn(c, ST_SETUP_TIMEOUT)
                elif now >= c.next_req:
                    c.next_req = now + CM_RETRY_S
                    d.cm_send(c, CM_REQ)

    def _fail_conn(self, c: _Conn, status: int) -> None:
        if c.failed:
            return
        c.failed = status
        try:
            c.qp.modify(QPAttr(qp_state=e.IBV_QPS_ERR), e.IBV_QP_STATE)
        except Exception:
            pass
        while c.waitq:
            op = c.waitq.popleft()
            specs = op.specs[c.dom.index]
            if op.group is not None:
                self._fail_ents(op, [sp[7] for sp in specs], status)
            specs.clear()
            op.status = op.status or status
            self._maybe_done(op)

    def _fail_ents(self, op: _Op, ents: Any, status: int) -> None:
        """Batch entries ``ents`` of ``op`` failed with ``status`` (the first status stays)."""
        g = op.group
        if g is None or not ents:
            return
        st_, errs, code = g.wb.status, g.wb.errors, _errno_of(status)
        exc = None
        for i in ents:
            if not st_[i]:
                st_[i] = code
                if exc is None:
                    exc = self.error(status, "write")
                errs.setdefault(i, exc)

    # ------------------------------------------------------------ memory

    def register(
        self,
        ptr: int,
        nbytes: int,
        *,
        remote_write: bool,
        remote_read: bool,
        device: str = "cpu",
        device_index: int = -1,
        owner: Any = None,
    ) -> Registration:
        if device != "cpu":
            raise TransferError(f"the pyverbs backend registers host memory only, not {device}")
        access = e.IBV_ACCESS_LOCAL_WRITE
        if remote_write:
            access |= e.IBV_ACCESS_REMOTE_WRITE
        if remote_read:
            access |= e.IBV_ACCESS_REMOTE_READ
        mrs = []
        try:
            for d in self._doms:
                mrs.append(MR(d.pd, max(nbytes, 1), access, address=ptr))
        except Exception as exc:
            for m in mrs:
                m.close()
            raise TransferError(
                f"memory registration of {nbytes} bytes failed: {exc} (check `ulimit -l`)"
            ) from None
        h = self._next_mr
        self._next_mr += 1
        self._mrs[h] = mrs
        return Registration(h, tuple(m.rkey for m in mrs), tuple(ptr for _ in mrs), ptr, nbytes)

    def deregister(self, reg: Registration) -> None:
        for m in self._mrs.pop(reg.handle, ()):
            m.close()

    def remote(self, peer: int, ndom: int, target: Target) -> VerbsRemote:
        return VerbsRemote(peer, ndom, target)

    # ------------------------------------------------------------ posting

    def _conns(self, peer: int) -> list[_Conn]:
        conns = self._peers[peer]
        for c in conns:
            if c.failed:
                raise self.error(c.failed, "posting to this peer")
        return conns

    def _submit(self, op: _Op, conns: list[_Conn]) -> bool:
        for i, specs in enumerate(op.specs):
            if specs:
                c = conns[i]
                c.waitq.append(op)
                if c.ready and len(c.waitq) == 1:
                    self._pump(c)
        return False

    def post_write(
        self,
        token: int,
        dst: Remote,
        roff: int,
        src: Registration | None,
        soff: int,
        nbytes: int,
        imm: int,
        stream: Any = None,
    ) -> bool:
        r: VerbsRemote = dst  # type: ignore[assignment]
        conns, op = self._conns(r.peer), _Op(token, r.ndom)
        code = OP_WRITE if imm < 0 else OP_WRITE_IMM
        imm_be = socket.htonl(imm) if imm >= 0 else 0
        bases, keys = r.bases, r.keys
        if src is None or nbytes == 0:
            op.specs[0].append((code, 0, 0, 0, bases[0] + roff, keys[0], imm_be, -1))
        else:
            mrs = self._mrs[src.handle]
            ptr = src.ptr + soff
            for off, n, dd in plan_chunks(nbytes, r.chunk, r.ndom):
                op.specs[dd].append(
                    (code, ptr + off, n, mrs[dd].lkey, bases[dd] + roff + off, keys[dd], imm_be,
                     -1)
                )  # fmt: skip
        return self._submit(op, conns)

    def post_paged(self, op_: PagedWrite) -> bool:
        r: VerbsRemote = op_.dst  # type: ignore[assignment]
        conns, op = self._conns(r.peer), _Op(op_.token, r.ndom)
        code = OP_WRITE if op_.imm < 0 else OP_WRITE_IMM
        imm_be = socket.htonl(op_.imm) if op_.imm >= 0 else 0
        mrs, ptr, page = self._mrs[op_.src.handle], op_.src.ptr, op_.page
        bases, keys, ndom = r.bases, r.keys, r.ndom
        for i, (s, t) in enumerate(zip(op_.src_off.tolist(), op_.dst_off.tolist())):
            dd = i % ndom
            op.specs[dd].append(
                (code, ptr + s, page, mrs[dd].lkey, bases[dd] + t, keys[dd], imm_be, -1)
            )
        return self._submit(op, conns)

    def post_batch(self, batch: WriteBatch) -> bool:
        """Each peer's entries as one op: chains of at most ``chain_wrs`` WRs, one post each."""
        packed = batch.cache.get("pyverbs")
        if packed is None:
            packed = batch.cache["pyverbs"] = self._pack_batch(batch)
        runs = [(self._conns(peer), specs) for peer, specs in packed]  # refused: none posted
        g = _Group(batch.token, batch, len(runs))
        for conns, specs in runs:
            op = _Op(batch.token, 0)
            op.specs = [deque(s) for s in specs]
            op.chain, op.group = self.chain_wrs, g
            self._submit(op, conns)
        return False

    def _pack_batch(self, b: WriteBatch) -> list[tuple[int, list[list[tuple]]]]:
        """The batch's specs per peer and domain, in entry order (cached per compiled batch)."""
        peers: dict[int, list[list[tuple]]] = {}
        srcs, dsts = b.srcs, b.dsts
        cols = (b.src.tolist(), b.dst.tolist(), b.soff.tolist(), b.doff.tolist(),
                b.nbytes.tolist(), b.imm.tolist())  # fmt: skip
        for i, (si, di, so, do, n, imm) in enumerate(zip(*cols)):
            r: VerbsRemote = dsts[di]  # type: ignore[assignment]
            specs = peers.get(r.peer)
            if specs is None:
                specs = peers[r.peer] = [[] for _ in range(r.ndom)]
            code = OP_WRITE if imm < 0 else OP_WRITE_IMM
            imm_be = socket.htonl(imm) if imm >= 0 else 0
            bases, keys = r.bases, r.keys
            src = srcs[si]
            if src is None or n == 0:
                specs[0].append((code, 0, 0, 0, bases[0] + do, keys[0], imm_be, i))
                continue
            mrs, ptr = self._mrs[src.handle], src.ptr + so
            for off, ln, dd in plan_chunks(n, r.chunk, r.ndom):
                specs[dd].append(
                    (code, ptr + off, ln, mrs[dd].lkey, bases[dd] + do + off, keys[dd], imm_be, i)
                )
        return list(peers.items())

    def post_read(
        self, token: int, src: Remote, roff: int, dst: Registration, doff: int, nbytes: int
    ) -> bool:
        r: VerbsRemote = src  # type: ignore[assignment]
        conns, op = self._conns(r.peer), _Op(token, r.ndom)
        mrs, ptr, bases, keys = self._mrs[dst.handle], dst.ptr + doff, r.bases, r.keys
        for off, n, dd in plan_chunks(nbytes, r.chunk, r.ndom):
            op.specs[dd].append(
                (OP_READ, ptr + off, n, mrs[dd].lkey, bases[dd] + roff + off, keys[dd], 0, -1)
            )
        return self._submit(op, conns)

    def post_send(self, token: int, peer: int, data: bytes) -> bool:
        conns = self._conns(peer)
        op = _Op(token, 1)
        op.specs[0].append((OP_SEND, data))
        return self._submit(op, conns)

    def _pump(self, c: _Conn) -> None:
        """Post what fits in the send queue, one chained list per op and batch."""
        d = c.dom
        di = d.index
        while c.waitq and c.ready and not c.failed:
            room = SQ_DEPTH - c.sq_used
            if room <= 0:
                return
            op = c.waitq[0]
            specs = op.specs[di]
            sid = self._next_sig
            self._next_sig += 1
            ents: list[int] | None = None  # the batch entries this chain carries
            if specs[0][0] == OP_SEND:
                if not d.tx_free:
                    return
                slot = d.tx_free.pop()
                data = specs.popleft()[1]
                off = slot * d.ctrl_max
                if data:
                    d.tx.write(data, len(data), off)
                head = SendWR(
                    wr_id=(_K_SIG << _KSHIFT) | sid,
                    opcode=OP_SEND,
                    num_sge=1,
                    sg=[SGE(d.tx.buf + off, len(data), d.tx.lkey)],
                    send_flags=e.IBV_SEND_SIGNALED,
                )
                op.slot = slot
                k = 1
            else:
                k = min(room, len(specs), op.chain or room)
                head = prev = None
                keep = []  # see _post_srq: the chain's Python objects must outlive the post
                if op.group is not None:
                    ents = []
                wr_id = (_K_SIG << _KSHIFT) | sid  # on every WR: an error WC names the chain
                for j in range(k):
                    code, la, n, lkey, ra, rkey, imm_be, ent = specs.popleft()
                    wr = SendWR(
                        wr_id=wr_id,
                        opcode=code,
                        num_sge=1,
                        sg=[SGE(la, n, lkey) if n else d.zero_sge],
                        send_flags=e.IBV_SEND_SIGNALED if j == k - 1 else 0,
                    )
                    wr.set_wr_rdma(rkey, ra)
                    if code == OP_WRITE_IMM:
                        wr.imm_data = imm_be
                    if prev is None:
                        head = wr
                    else:
                        prev.next_wr = wr
                    prev = wr
                    keep.append(wr)
                    if ents is not None:
                        ents.append(ent)
            try:
                c.qp.post_send(head)
            except Exception as exc:
                op.status = op.status or ST_PEER_LOST
                if op.group is not None:
                    self._fail_ents(op, [*(ents or ()), *(sp[7] for sp in specs)], ST_PEER_LOST)
                specs.clear()
                c.waitq.popleft()
                self._maybe_done(op)
                self._fail_conn(c, ST_PEER_LOST)
                self._last_post_error = str(exc)
                return
            c.sq_used += k
            if not c.busy:
                c.last_progress = time.monotonic()
                self._busy += 1
                self._tick.set()
            c.busy += 1
            op.outstanding += 1
            d.sig[sid] = (op, c, k, ents)
            self._stats["posts"] += k
            self._stats["batches"] += 1
            if not specs:
                c.waitq.popleft()

    def _maybe_done(self, op: _Op) -> None:
        if op.outstanding == 0 and not any(op.specs):
            if not op.token:
                return
            g = op.group
            if g is None:
                err = self.error(op.status, "transfer") if op.status else None
                self._events.op_done(op.token, _errno_of(op.status), error=err)
            else:
                g.left -= 1
                if op.status and not g.status:
                    g.status = op.status
                if g.left == 0:  # the batch's one event; its failed entries are marked
                    err = self.error(g.status, "batch") if g.status else None
                    self._events.op_done(g.token, _errno_of(g.status), error=err)
            op.token = 0

    # ------------------------------------------------------------ completions

    def _poll(self, d: _Dom) -> int:
        """Poll one CQ until empty; returns the number of completions."""
        total = 0
        cq = d.cq
        srq_repost: list[int] = []
        while True:
            n, wcs = cq.poll(64)
            if n <= 0:
                break
            total += n
            for wc in wcs:
                k = wc.wr_id >> _KSHIFT
                idx = wc.wr_id & _KMASK
                if k == _K_SRQ:
                    if wc.status == 0:
                        if wc.opcode == e.IBV_WC_RECV_RDMA_WITH_IMM:
                            self._count(socket.ntohl(wc.imm_data))
                        elif wc.opcode == e.IBV_WC_RECV:
                            data = d.rx.read(wc.byte_len, idx * d.ctrl_max) if wc.byte_len else b""
                            self._events.message(bytes(data))
                    srq_repost.append(idx)
                elif k == _K_SIG:
                    ent = d.sig.pop(idx, None)
                    if ent is None:
                        continue
                    op, c, cnt, ents = ent
                    c.sq_used -= cnt
                    c.busy -= 1
                    if not c.busy:
                        self._busy -= 1
                    c.last_progress = time.monotonic()
                    op.outstanding -= 1
                    if op.slot >= 0:
                        d.tx_free.append(op.slot)
                        op.slot = -1
                    if wc.status != 0:
                        self._stats["cq_errors"] += 1
                        st = ST_WC - wc.status
                        op.status = op.status or st
                        self._fail_ents(op, ents, st)
                        # RC: any error completion moves the queue pair to ERROR
                        self._fail_conn(c, st)
                    self._maybe_done(op)
                    if c.waitq:
                        self._pump(c)
                elif k == _K_UD_RECV:
                    if wc.status == 0:
                        self._on_cm(d, d.ud_rx.read(wc.byte_len, idx * (GRH + 64)))
                    d._post_ud_recv([idx])
                elif k == _K_UD_SEND:
                    d.ud_tx_free.append(idx)
                    if d.ud_pending:
                        c2, _msg = d.ud_pending.popleft()
                        d.cm_send(c2, CM_REQ)
                elif wc.status not in (0, e.IBV_WC_WR_FLUSH_ERR):
                    self._stats["cq_errors"] += 1
            if n < 64:
                break
        if srq_repost and not self._closed:
            d._post_srq(srq_repost)
        self._stats["completions"] += total
        return total

    def _count(self, v: int) -> None:
        self._stats["imms"] += 1
        if self._ctr.arrive(v):
            self._events.counter_ready(v)

    def _service(self) -> None:
        """Consume completion-channel events and timer ticks; poll every CQ."""
        if self._closed:
            return
        for fd, _ in self._ep.poll(0):
            if fd == self._efd:
                try:
                    os.eventfd_read(self._efd)
                except BlockingIOError:
                    pass
                self._on_tick()
                continue
            d = self._chan_fds.get(fd)
            if d is None:
                continue
            try:
                d.chan.get_cq_event(d.cq)
                d.cq.ack_events(1)
                self._stats["cq_events"] += 1
            except Exception:
                pass  # nothing there (non-blocking fd); the poll below still runs
            d.cq.req_notify()
        got = sum(self._poll(d) for d in self._doms)
        # Like the libfabric progress thread: keep polling for spin_ns after the last
        # completion, so a stream of arrivals costs one loop wake-up, not one per completion.
        # Capped at 20 spins so a steady stream cannot hold the event loop.
        if got and self._spin_ns:
            now = time.perf_counter_ns()
            end, cap = now + self._spin_ns, now + 20 * self._spin_ns
            while (now := time.perf_counter_ns()) < end:
                if sum(self._poll(d) for d in self._doms):
                    end = min(now + self._spin_ns, cap)

    # ------------------------------------------------------------ counters

    def counter_arm(self, imm: int, want: int) -> bool:
        return self._ctr.arm(imm, want)

    def counter_give(self, imm: int, n: int) -> None:
        if self._ctr.give(imm, n):
            self._events.counter_ready(imm)
            os.eventfd_write(self._efd, 1)

    def counter_disarm(self, imm: int) -> None:
        self._ctr.disarm(imm)

    def counter_avail(self, imm: int) -> int:
        return self._ctr.avail(imm)

    def counters_live(self) -> int:
        return self._ctr.live()

    # ------------------------------------------------------------ events

    def pending_events(self) -> int:
        return len(self._events)

    def drain(self) -> list[Event]:
        if self._closed:
            return []
        self._stats["wakeups"] += 1
        self._service()
        return self._events.take()

    def spin(self, ns: int) -> bool:
        end = time.perf_counter_ns() + ns
        while True:
            for d in self._doms:
                self._poll(d)
            if self._events:
                return True
            if time.perf_counter_ns() >= end:
                return False

    def error(self, status: int, what: str) -> Exception:
        if status == ST_SETUP_TIMEOUT:
            return PeerUnreachable(
                f"{what} failed: the peer did not answer queue-pair setup within the engine's "
                f"peer_timeout ({self._post_timeout:g} s); is its engine open, on the same "
                "device/fabric, and is its event loop running?",
                110,
            )
        if status <= ST_WC:
            wcs = ST_WC - status
            text = _wc_text(wcs)
            if wcs == e.IBV_WC_REM_ACCESS_ERR:
                return RemoteAccessError(f"{what} was refused by the target: {text}", 13)
            if wcs in (e.IBV_WC_RETRY_EXC_ERR, e.IBV_WC_RNR_RETRY_EXC_ERR, e.IBV_WC_WR_FLUSH_ERR):
                return PeerUnreachable(
                    f"{what} failed, the peer stopped answering ({text}); it died or its link "
                    "is down",
                    104,
                )
            return TransferError(f"{what} failed: {text}", 5)
        if status == ST_STALLED:
            return PeerUnreachable(
                f"{what} failed: the peer acknowledged nothing within the engine's peer_timeout "
                f"({self._post_timeout:g} s); it died or its link is down",
                62,
            )
        if status == ST_PEER_LOST:
            return PeerUnreachable(
                f"{what} failed: the connection to the peer broke earlier; reopen both engines",
                104,
            )
        return TransferError(f"{what} failed (status {status})", -status)

    def stats(self) -> dict[str, int]:
        return dict(self._stats)


def _wc_text(status: int) -> str:
    try:
        from pyverbs.cq import WC

        return f"{WC.status_to_str(status)} (ibv_wc_status {status})"  # type: ignore[attr-defined]
    except Exception:
        return f"ibv_wc_status {status}"
