/* asyncfabric native core: peer failure detection.
 *
 * Providers do not always say when a peer is gone: shm keeps "delivering"
 * into the shared memory of a process that was SIGKILLed and never answers
 * for what needs an answer, and a tcp connection over a cut link retransmits
 * for minutes. Two rules bound the time a transfer can hang on a lost peer:
 *
 *  1. Watched process. A peer on the same host (same boot, same pid
 *     namespace: the engine address says) is watched through a pidfd. When
 *     its process exits, every live transfer to it fails with -ESRCH and new
 *     ones are refused at once (even those that would have been injected).
 *  2. Stalled peer. A peer with live transfers that completes none of them
 *     for post_timeout_ns (the engine's peer_timeout) has all of them failed
 *     with -FI_ETIMEDOUT. The peer stays usable: a later transfer may succeed
 *     (a link that came back).
 *
 * A transfer failed this way may still have pieces inside the provider. It is
 * reported at once (an AF_EV_OP with len = 1, "held") so the caller's future
 * fails in bounded time, but the op, its transmit contexts and the source
 * region stay reserved until the provider gives the pieces back (then a final
 * AF_EV_OP with len = 0 follows) or the engine closes. The provider never
 * touches memory that was unregistered, and a late completion never lands on
 * a reused context.
 *
 * The per-transfer bookkeeping (peer_op_begin, peer_op_end, peer_progress) is
 * inline in afint.h: it runs on every post and completion.
 */
#include "afint.h"

#include <signal.h>
#include <sys/epoll.h>
#include <sys/syscall.h>

#define AF_WATCH_NS 20000000ull /* how often the detection pass runs: 20 ms */

static void pend_unlink(af_engine *e, uint32_t i) {
    uint32_t prev = AF_NONE, j = e->pend_head;
    while (j != AF_NONE && j != i) {
        prev = j;
        j = e->ops[j].next;
    }
    if (j != AF_NONE) pend_unlink_after(e, prev, i);
}

/* Fail every live transfer to peer `pi` with `status` (lock held). */
static void fail_peer(af_engine *e, uint32_t pi, int32_t status) {
    for (uint32_t i = 0; i < e->cap_ops; i++) {
        af_op *op = &e->ops[i];
        if (!op->active || op->kind == OP_GROUP || op->peer != pi || op->reported) continue;
        if (op->pending) pend_unlink(e, i);
        op_stop(e, op, status); /* post nothing more */
        if (op->outstanding == 0) {
            maybe_finish(e, i);
        } else {
            op->reported = 1;
            if (e->peers[pi].inflight) e->peers[pi].inflight--;
            if (op->kind == OP_BATCH) batch_child_reported(e, i); /* the group reports */
            else push_event(e, AF_EV_OP, 0, op->status, 1, op->token);
        }
    }
}

static void peer_gone(af_engine *e, uint32_t pi, int32_t status) {
    af_peer *p = &e->peers[pi];
    if (p->dead) return;
    p->dead = -status; /* the errno new posts to it fail with (check_peer) */
    /* Out of the watch; the fd stays open until the engine closes: a worker
     * may hold a copy of it for the lock guard (qlock.h, wpost.c). */
    if (p->pidfd >= 0 && e->watch_fd >= 0) epoll_ctl(e->watch_fd, EPOLL_CTL_DEL, p->pidfd, NULL);
    fail_peer(e, pi, status);
}

static void peer_dead(af_engine *e, uint32_t pi) { peer_gone(e, pi, -ESRCH); }

void peer_watch(af_engine *e) {
    uint64_t t = now_ns();
    if (t - e->t_watch < AF_WATCH_NS) return;
    e->t_watch = t;
    if (e->watch_fd >= 0) {
        struct epoll_event evs[64];
        int n;
        while ((n = epoll_wait(e->watch_fd, evs, 64, 0)) > 0)
            for (int k = 0; k < n; k++) peer_dead(e, evs[k].data.u32);
    }
    for (uint32_t i = 0; i < e->npeers; i++) {
        af_peer *p = &e->peers[i];
        if (p->dead) continue;
        /* no pidfd on this kernel: ask the kernel about the pid itself */
        if (p->pid > 0 && p->pidfd < 0 && kill(p->pid, 0) < 0 && errno == ESRCH) {
            peer_dead(e, i);
            continue;
        }
        if (p->inflight && e->pol.post_timeout_ns && t - p->t_progress > e->pol.post_timeout_ns) {
            fail_peer(e, i, -FI_ETIMEDOUT);
            p->t_progress = t;
        }
    }
}

/* Watch the process `pid` behind peer `pi`. Returns 0, or -ESRCH when the
 * process is already gone (the peer is then marked dead). */
int afe_peer_watch(af_engine *e, uint32_t pi, int32_t pid) {
    if (pid <= 0) return -FI_EINVAL;
    enter_py(e);
    int rc = 0;
    if (pi >= e->npeers) {
        rc = -FI_EINVAL;
        goto out;
    }
    af_peer *p = &e->peers[pi];
    if (p->dead || p->pid) goto out;
    p->pid = pid;
    int fd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (fd < 0) {
        if (errno == ESRCH) {
            peer_dead(e, pi);
            rc = -ESRCH;
        }
        goto out; /* no pidfd (old kernel): peer_watch falls back to kill(pid, 0) */
    }
    if (e->watch_fd < 0) e->watch_fd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = pi};
    if (e->watch_fd < 0 || epoll_ctl(e->watch_fd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        close(fd);
        goto out;
    }
    p->pidfd = fd;
out:
    leave_py(e);
    return rc;
}

/* Peer `pi` is an engine of this process that is closing: its process will
 * not exit, so no pidfd says so, and once its endpoint closes a post to it
 * would touch memory that is gone (shm maps a peer's queue into this
 * process). Its transfers fail with -ESHUTDOWN and new ones are refused.
 * Any thread may call this; it waits for a post in flight to finish. */
int afe_peer_closed(af_engine *e, uint32_t pi) {
    pthread_mutex_lock(&e->lock);
    int rc = pi < e->npeers ? 0 : -FI_EINVAL;
    if (!rc) peer_gone(e, pi, -ESHUTDOWN);
    pthread_mutex_unlock(&e->lock);
    return rc;
}

/* Whether the peer's process is known to be gone. */
int afe_peer_dead(af_engine *e, uint32_t pi) {
    pthread_mutex_lock(&e->lock);
    int d = pi < e->npeers ? e->peers[pi].dead : 0;
    pthread_mutex_unlock(&e->lock);
    return d;
}

void peer_close_all(af_engine *e) {
    for (uint32_t i = 0; i < e->npeers; i++) {
        af_peer *p = &e->peers[i];
        if (p->pidfd >= 0) close(p->pidfd);
        for (int d = 0; d < AF_MAX_DOMS; d++) qlock_unmap(p->qmap[d]);
    }
    if (e->watch_fd >= 0) close(e->watch_fd);
    e->watch_fd = -1;
}
