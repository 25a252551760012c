"""An example third-party asyncfabric backend (spec ``"example"``): a TEST transport only.

asyncfabric never ships a home-made transport to users: this one shows that a backend is a
thin plugin on the contract (asyncfabric.transport), and it passes the conformance suite.
Loopback TCP (127.0.0.1 only), one domain. A sender thread per peer sends one frame at a
time and waits for its ack, within peer_timeout; a reader thread per incoming connection
lands writes (key and bounds checked), counts their immediates and acks every frame
(-EACCES when refused). A write completes on its acks. A read is a frame asking for bytes,
acked with them (and copied where the reader's own frame said). Batches: the contract's
fallback (every entry through post_write).
"""

import contextlib
import ctypes
import queue
import secrets
import socket
import struct
import threading

import asyncfabric as af
import asyncfabric.transport as tp
from asyncfabric.transport import status as st

_H = struct.Struct("<BQQQqQ")  # kind, key (msg: nonce), offset, length, imm (ack: status), token
WRITE, MSG, ACK, READ = 1, 2, 3, 4
_ADDR = struct.Struct("<4sHQ")  # b"afx1", port, nonce


class ExampleBackend(tp.Backend):
    name, needs = "example", "nothing: loopback TCP sockets (a test backend)"

    def providers(self):
        return ["loopback"]

    def open(self, provider, *, domains, node, ctrl_max, cuda="auto"):
        if domains != 1 or provider not in ("", "loopback"):
            raise af.BackendUnavailable("the example backend has one domain, provider 'loopback'")
        return ExampleTransport(ctrl_max)


def _thread(target, *args):
    threading.Thread(target=target, args=args, daemon=True).start()


def _shut(s):
    if s is not None:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)  # wakes the threads blocked on it


class _Peer:
    def __init__(self, port, nonce):
        self.port, self.nonce, self.q, self.sock = port, nonce, queue.SimpleQueue(), None
        self.pending = {}  # token -> [frames not acked yet, first error]
        self.failed = 0


class ExampleTransport(tp.PythonTransport):  # counters, events, notify fd: from the base
    backend, provider, ndomains, inject_size, max_msg_size = "example", "loopback", 1, 0, 1 << 24
    addresses = None  # a plain attribute, set per instance, fulfils the contract
    remote = staticmethod(tp.Remote)  # the engine's view of a peer region is all we post with

    def __init__(self, ctrl_max):
        super().__init__()
        self.ctrl_max, self._closed, self._timeout, self._regs = ctrl_max, 0, 5, {}
        self._peers, self._conns = [], []  # outgoing (one per peer) and incoming connections
        self._ls, self._nonce = socket.create_server(("127.0.0.1", 0)), secrets.randbits(64)
        self.addresses = [_ADDR.pack(b"afx1", self._ls.getsockname()[1], self._nonce)]

    def start(self, policy):
        self._timeout = policy.post_timeout_ns / 1e9 or 1e9
        _thread(self._accept)

    def close(self):
        with self.lock:
            if self._closed:
                return
            self._closed = True
            self._regs.clear()  # nothing lands after this
        for p in self._peers:
            p.q.put(None)
        for s in [self._ls, *self._conns, *(p.sock for p in self._peers)]:
            _shut(s)
        self.close_notify()

    def add_peer(self, addresses):
        a = bytes(addresses[0])
        if len(a) != _ADDR.size or a[:4] != b"afx1":
            raise af.PeerUnreachable("the peer's address is not an example-backend address")
        self._peers.append(p := _Peer(*_ADDR.unpack(a)[1:]))
        _thread(self._send_loop, p)
        return len(self._peers) - 1

    def _send_loop(self, p):
        status = st.PEER_RESET  # the connection closed
        try:  # the socket's timeout is peer_timeout: for connecting, sending, each ack
            p.sock = socket.create_connection(("127.0.0.1", p.port), self._timeout)
            with p.sock as s, s.makefile("rb") as f:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while (frame := p.q.get()) is not None:
                    s.sendall(frame)
                    if len(ack := f.read(_H.size)) < _H.size:
                        break
                    kind, _, _, want, to, _ = _H.unpack_from(frame)
                    if n := _H.unpack(ack)[3]:  # a read's bytes: as many as, where, we asked
                        if kind != READ or n != want or len(data := f.read(n)) < n:
                            break
                        with self.lock:
                            if not self._closed:  # else the memory may be gone
                                ctypes.memmove(to, data, n)
                    self._acked(p, *_H.unpack(ack)[4:])
        except OSError as exc:  # refused, reset, ...; no errno: timed out
            status = -exc.errno if exc.errno else st.PEER_TIMEOUT
        self._fail(p, status)  # nothing happens if it was failed or closed already

    def _acked(self, p, status, token):
        with self.lock:
            if (ent := p.pending.get(token)) is not None:
                ent[0], ent[1] = ent[0] - 1, ent[1] or status
                if not ent[0]:
                    self.op_done(token, p.pending.pop(token)[1])

    def _fail(self, p, status):
        """The peer is lost: fail every op it owes acks for, and every later post to it."""
        with self.lock:
            if p.failed or self._closed:
                return
            p.failed = status
            for token, (_, first) in p.pending.items():
                self.op_done(token, first or status)
            p.pending.clear()
        p.q.put(None)
        _shut(p.sock)

    def _accept(self):
        with contextlib.suppress(OSError), self._ls:
            while True:
                self._conns.append(s := self._ls.accept()[0])
                _thread(self._serve, s)

    def _serve(self, s):
        """A peer's frames: land each write or message, then ack it."""
        with contextlib.suppress(OSError), s, s.makefile("rb") as f:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while len(hdr := f.read(_H.size)) == _H.size:
                kind, key, off, n, imm, token = _H.unpack(hdr)
                if kind == READ:
                    s.sendall(self._read(key, off, n, token))
                    continue
                if n > self.max_msg_size or len(data := f.read(n)) < n:
                    break
                s.sendall(_H.pack(ACK, 0, 0, 0, self._land(kind, key, off, imm, data), token))

    def _land(self, kind, key, off, imm, data):
        with self.lock:
            ptr, size, writable, _ = self._regs.get(key, (0, 0, False, False))
            if kind == MSG and key == self._nonce:  # the nonce: a message meant for us
                self.message(data)
            elif kind != WRITE or not writable or off + len(data) > size:
                return st.ACCESS_DENIED
            else:
                ctypes.memmove(ptr + off, data, len(data))
                if imm >= 0:
                    self.arrive(imm)
            return st.OK

    def _read(self, key, off, n, token):
        with self.lock:
            ptr, size, _, readable = self._regs.get(key, (0, 0, False, False))
            if not readable or n > self.max_msg_size or off + n > size:
                return _H.pack(ACK, 0, 0, 0, st.ACCESS_DENIED, token)
            return _H.pack(ACK, 0, 0, n, st.OK, token) + ctypes.string_at(ptr + off, n)

    def register(self, ptr, nbytes, *, remote_write, remote_read, **_):
        key = secrets.randbits(48)  # (deregister takes the lock: a landing may be under way)
        self._regs[key] = (ptr, nbytes, remote_write, remote_read)
        return tp.Registration(key, (key,), (0,), ptr, nbytes)

    def deregister(self, reg):
        with self.lock:
            self._regs.pop(reg.handle, None)

    def post_write(self, token, dst, roff, src, soff, nbytes, imm, stream=None):
        data = ctypes.string_at(src.ptr + soff, nbytes) if nbytes else b""
        plan = tp.plan_chunks(nbytes, dst.chunk, 1)  # one immediate per chunk: the counting rule
        frames = [(dst.target.bases[0] + roff + o, data[o : o + n]) for o, n, _ in plan]
        return self._post(dst.peer, WRITE, dst.target.keys[0], imm, token, frames)

    def post_paged(self, op):
        pages, at = zip(op.src_off.tolist(), op.dst_off.tolist()), op.dst.target.bases[0]
        frames = [(at + d, ctypes.string_at(op.src.ptr + s, op.page)) for s, d in pages]
        return self._post(op.dst.peer, WRITE, op.dst.target.keys[0], op.imm, op.token, frames)

    def post_read(self, token, src, roff, dst, doff, nbytes):
        at, plan = src.target.bases[0] + roff, tp.plan_chunks(nbytes, src.chunk, 1)
        frames = [_H.pack(READ, src.target.keys[0], at + o, n, dst.ptr + doff + o, token)
                  for o, n, _ in plan]  # fmt: skip
        return self._queue(src.peer, token, frames)

    def post_send(self, token, peer, data):
        return self._post(peer, MSG, self._peers[peer].nonce, -1, token, [(0, bytes(data))])

    def _post(self, peer, kind, key, imm, token, frames):
        frames = [_H.pack(kind, key, off, len(data), imm, token) + data for off, data in frames]
        return self._queue(peer, token, frames)

    def _queue(self, peer, token, frames):
        p = self._peers[peer]
        with self.lock:
            if p.failed:
                raise self.error(p.failed, "posting to this peer")
            p.pending[token] = [len(frames), 0]
        for frame in frames:
            p.q.put(frame)
        return False  # an OpDone follows, on the last ack

    def stats(self):
        return {"peers": len(self._peers), "registrations": len(self._regs)}
