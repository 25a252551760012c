/* Transfers: the op slab, posting an op's pieces as far as the endpoints take
 * them (pump), the queue of ops waiting for room, and afe_post_*. */
#include "afint.h"

uint32_t op_alloc(af_engine *e) {
    if (e->op_free == AF_NONE) {
        uint32_t ncap = e->cap_ops ? e->cap_ops * 2 : 256;
        af_op *n = realloc(e->ops, sizeof(af_op) * ncap);
        if (!n) return AF_NONE;
        e->ops = n;
        for (uint32_t i = e->cap_ops; i < ncap; i++) {
            e->ops[i].active = 0;
            e->ops[i].next = i + 1 < ncap ? i + 1 : AF_NONE;
        }
        e->op_free = e->cap_ops;
        e->cap_ops = ncap;
    }
    uint32_t i = e->op_free;
    af_op *op = &e->ops[i];
    e->op_free = op->next;
    memset(op, 0, sizeof *op);
    op->active = 1;
    op->next = AF_NONE;
    op->mr = -1;
    op->imm = -1;
    op->group = AF_NONE;
    op->rot = e->nworkers > 1 ? e->rot++ : 0;
    op->stripe = op->rot; /* a batch child's first piece */
    e->live_ops++;
    return i;
}

void op_free(af_engine *e, uint32_t i) {
    af_op *op = &e->ops[i];
    peer_op_end(e, op);
    free(op->offs);
    free(op->msg);
    op->offs = NULL;
    op->msg = NULL;
    op->active = 0;
    op->next = e->op_free;
    e->op_free = i;
    e->live_ops--;
}

/* Post as much of one transfer as the endpoints take. AF_AGAIN: back-pressure,
 * the op keeps its cursor and is resumed when completions free room. */
static int pump_op_inner(af_engine *e, uint32_t opi);

/* Post what can go, then wake the peer if it sleeps and needs to act: an op
 * whose completion waits for the target (anything not injected), a target
 * somebody waits on (it must count the immediate), a message, or a target
 * whose queue is full (EAGAIN). Injected writes to a target nobody waits on
 * need no wake-up: it counts them when it next polls. */
static int pump_op(af_engine *e, uint32_t opi) {
    af_op *op = &e->ops[opi];
    uint64_t before = op->posted, out_before = op->outstanding;
    int r = pump_op_inner(e, opi);
    op = &e->ops[opi];
    af_bell *b = &e->peers[op->peer].bell;
    if (b->page && (op->posted != before || r == AF_AGAIN)) {
        /* Post, fence, then read the target's flags: a target that armed a
         * counter and went to sleep after that read polls once more after its
         * own fence and finds the post (the Dekker pair of doorbell.h). */
        atomic_thread_fence(memory_order_seq_cst);
        int needs = r == AF_AGAIN || op->outstanding != out_before || op->kind == OP_SEND;
        uint64_t k = op->imm >= 0 ? op->posted - before : 0;
        if (k && atomic_load_explicit(&b->page->sleeping, memory_order_relaxed)) {
            /* Immediates for a sleeping target: ring once the writers' sum
             * reaches what its nearest waiter needs (doorbell.h). */
            int64_t p = atomic_fetch_add(&b->page->pending, (int64_t)k) + (int64_t)k;
            needs = needs || (atomic_load_explicit(&b->page->waiting, memory_order_relaxed) &&
                              (uint64_t)p >= atomic_load(&b->page->need));
        }
        if (needs && bell_ring(e->bell_fd, b)) e->st.wakeups++;
    }
    return r;
}

/* Posts that would wait. On shm (libfabric 1.17) a post takes the target's
 * queue lock, which the target holds while it copies what was queued before;
 * a post from the Python thread would spin there for a whole copy, time in
 * which it could run the next coroutine. So a transfer from Python that has
 * not started is left queued (AF_AGAIN) while the lock is held. The next call
 * from Python, its spin before it sleeps, or the progress thread once Python
 * has let go (it does wait for the lock) posts it. Once a call has found the
 * lock free and posted to a target, it posts everything queued for that
 * target without looking again: the target then finds them queued together
 * and copies them back to back, where one post per call left it idle between
 * copies (64 KiB, 2 cores: 0.74x the writes per second; benchmarks/README.md,
 * 2026-12-08). Ops queued this way go out in order: a new one from Python
 * queues behind them (op_launch). A transfer that started posts on, as do
 * batches (one call posts many writes, so a wait costs little per write, and
 * handing the rest to the progress thread was slower at 1 MiB), sends and
 * pieces small enough to inject. Only with the one progress thread: workers
 * post from their own queues (wpost.c). */
static inline int deferrable(const af_engine *e, const af_op *op) {
    if (!e->py_ctx || e->nworkers > 1) return 0;
    if (op->kind == OP_READ) return 1;
    if (op->kind != OP_WRITE && op->kind != OP_PAGED) return 0;
    /* a piece small enough to inject: the target's copy of it is short, and
     * posting it now keeps the call's "done" answer (no waiter to make) */
    uint64_t piece = op->kind == OP_PAGED ? op->page : op->len < op->chunk ? op->len : op->chunk;
    return piece > e->dom[0].inject;
}

static inline int defer_busy(af_engine *e, af_op *op, uint32_t dn) {
    const volatile int *w = e->peers[op->peer].qlock[dn];
    if (!w || op->posted || !deferrable(e, op)) return 0;
    if (op->peer == e->qposted_peer || *w == af_qlock_free) return 0;
    if (!op->qdefer) {
        op->qdefer = 1;
        e->qdeferred++;
    }
    e->qbusy_peer = op->peer;
    e->st.qlock_defers++;
    return 1;
}

static int pump_op_inner(af_engine *e, uint32_t opi) {
    af_op *op = &e->ops[opi];
    int retried = 0;
    while (op->posted < op->total) {
        uint64_t c = op->posted;
        uint32_t dn = (uint32_t)((c + op->rot) % op->ndom);
        af_dom *d = &e->dom[dn];
        fi_addr_t dest = e->peers[op->peer].addr[dn];
        ssize_t ret;
        af_wr *wr = NULL;
        int32_t sslot = -1;
        int direct = 0; /* copied by cma_put: its immediate goes on the owed list */

        if (op->kind == OP_BATCH) { /* its own target's domains: found below */
            const af_bent *en0 = &op->ents[op->bj];
            dn = (uint32_t)(op->stripe % op->tgts[en0->tgt].ndom);
            d = &e->dom[dn];
            dest = e->peers[op->peer].addr[dn];
        }
        if (defer_busy(e, op, dn)) return AF_AGAIN; /* the target copies: post it later */
        if (!dom_trylock(e, d)) return AF_AGAIN; /* its worker is reading: it posts it later */
        int held = peer_qlock(e, op->peer, dn); /* a dead process may hold its queue (qlock.h) */
        if (held) {
            dom_unlock(e, d);
            op_stop(e, op, held);
            break;
        }
        if (op->kind == OP_SEND) {
            if (op->msglen <= d->inject) {
                ret = fi_inject(d->ep, op->msg, op->msglen, dest);
            } else {
                if (d->tx_top == 0 || !take_wr(d, opi, -1, &wr)) {
                    dom_unlock(e, d);
                    return AF_AGAIN;
                }
                sslot = d->tx_free[d->tx_top - 1];
                uint8_t *buf = d->txmem + (size_t)sslot * e->ctrl_max;
                memcpy(buf, op->msg, op->msglen);
                wr->sslot = sslot;
                ret = fi_send(d->ep, buf, op->msglen, d->tx_desc, dest, wr);
            }
        } else {
            af_piece pc;
            pc.ent = 0; /* set by piece_at for batches only */
            int mr = piece_at(e, op, dn, &pc);
            void *desc = mr >= 0 ? e->mrs[mr].desc[dn] : NULL;
            if (op->kind == OP_READ) {
                if (!d->credits || !take_wr(d, opi, -1, &wr)) {
                    dom_unlock(e, d);
                    return AF_AGAIN;
                }
                ret = post_plain(d, 1, pc.src, pc.len, desc, dest, pc.dst, pc.key, wr);
            } else if (can_inject(e, d, mr, pc.len, pc.imm)) {
                ret = pc.imm >= 0 ? fi_inject_writedata(d->ep, pc.src, pc.len, (uint64_t)pc.imm, dest,
                                                        pc.dst, pc.key)
                                  : fi_inject_write(d->ep, pc.src, pc.len, dest, pc.dst, pc.key);
            } else {
                if (!d->credits || !take_wr(d, opi, -1, &wr)) {
                    dom_unlock(e, d);
                    return AF_AGAIN;
                }
                if (op->kind == OP_BATCH) wr->ent = pc.ent;
                if (pc.imm >= 0 && !owe_imm(e, d, mr, &pc, dest, wr))
                    ret = fi_writedata(d->ep, pc.src, pc.len, desc, (uint64_t)pc.imm, dest, pc.dst,
                                       pc.key, wr);
                else if (wr->owe) { /* the sender copies; its immediate follows (cq.c) */
                    ret = cma_put(d, peer_cma_pid(&e->peers[op->peer]), pc.src, pc.len, pc.dst);
                    direct = ret == 0;
                    if (ret == 1) ret = fi_write(d->ep, pc.src, pc.len, desc, dest, pc.dst, pc.key, wr);
                }
                else
                    ret = post_plain(d, 0, pc.src, pc.len, desc, dest, pc.dst, pc.key, wr);
            }
            if (op->kind == OP_BATCH && ret == 0) batch_advance(op, pc.len);
        }
        dom_unlock(e, d);
        if (ret == -FI_EAGAIN) {
            e->st.eagain++;
            if (!retried) {
                /* Providers free send resources when their queue is progressed. */
                retried = 1;
                progress_dom(e, d);
                continue;
            }
            return AF_AGAIN;
        }
        retried = 0;
        if (ret) {
            /* Stop posting; the op finishes, failed, once what is out comes back. */
            op_stop(e, op, (int32_t)ret);
            break;
        }
        if (wr) {
            commit_wr(d, wr);
            if (sslot >= 0) d->tx_top--;
            op->outstanding++;
            if (direct) { /* no completion comes: the data is there already */
                owe_push(d, wr);
                e->st.direct_copies++;
            }
        }
        op->posted++;
        e->st.posts++;
        if (e->py_ctx && deferrable(e, op)) e->qposted_peer = op->peer;
    }
    return AF_DONE;
}

/* Retry every queued op. One that cannot go out (a peer that is not there,
 * no credits) does not hold up the others; one that cannot go out for
 * post_timeout_ns fails with FI_ETIMEDOUT instead of waiting forever. */
int pump_pending(af_engine *e) {
    uint32_t prev = AF_NONE, i = e->pend_head;
    uint64_t now = 0;
    int posted = 0;
    e->qbusy_peer = AF_NONE;
    while (i != AF_NONE) {
        af_op *op = &e->ops[i];
        uint32_t next = op->next;
        /* the workers' (wpost.c); or behind an op whose target's lock was just
         * found held (defer_busy): in order, and without looking again */
        if ((op->wq && e->nworkers > 1) || (op->qdefer && op->peer == e->qbusy_peer)) {
            prev = i;
            i = next;
            continue;
        }
        uint64_t before = op->posted;
        int r = pump_op(e, i);
        op = &e->ops[i];
        posted += (int)(op->posted - before);
        if (r == AF_AGAIN && e->pol.post_timeout_ns) {
            if (!now) now = now_ns();
            if (now - op->t_queued > e->pol.post_timeout_ns) {
                op_stop(e, op, -FI_ETIMEDOUT);
                r = AF_DONE;
            }
        }
        if (r == AF_AGAIN) {
            prev = i;
            i = next;
            continue;
        }
        pend_unlink_after(e, prev, i);
        maybe_finish(e, i);
        i = next;
    }
    return posted;
}

/* Post nothing more of `op`: it finishes, failed with `status` (unless it had
 * failed already), once what is out comes back. A batch's entries that did
 * not go out whole are failed with it. */
void op_stop(af_engine *e, af_op *op, int32_t status) {
    (void)e;
    if (!op->status) op->status = status;
    if (op->kind == OP_BATCH && op->bstatus)
        for (uint64_t j = op->bj; j < op->hi; j++)
            if (!op->bstatus[op->ents[j].idx]) op->bstatus[op->ents[j].idx] = status;
    op->total = op->posted;
}

/* Post what of op i can go now; queue the rest for progress (lock held). */
void op_launch(af_engine *e, uint32_t i) {
    af_op *op = &e->ops[i];
    peer_op_begin(e, op);
    if (wq_wants(e, op)) { /* the workers post it (wpost.c) */
        op->wq = 1;
        pend_push(e, i);
        e->work_gen++;
        atomic_fetch_add(&e->wq_gen, 1);
        workers_wake(e);
        return;
    }
    if (e->qdeferred && deferrable(e, op)) {
        /* behind the ops that wait for a target's queue lock (defer_busy): the
         * caller's reap (progress_locked) posts the queue in order */
        op->qdefer = 1;
        e->qdeferred++;
        pend_push(e, i);
    } else if (pump_op(e, i) == AF_AGAIN) {
        pend_push(e, i);
    }
    e->work_gen++;
    if (atomic_load(&e->sleeping) == 1 || (e->nworkers > 1 && e->ops[i].pending)) kick(e);
}

/* Start an op from the Python thread (lock held). Returns 1 when it finished
 * during the call (every piece was injected), 0 when an event will follow,
 * or a negative errno when it failed before anything went out. */
static int start_op(af_engine *e, uint32_t i) {
    op_launch(e, i);
    af_op *op = &e->ops[i];
    if (op_finished(op)) {
        int st = op->status;
        op_free(e, i);
        return st ? st : 1;
    }
    return 0;
}

int afe_post_write(af_engine *e, uint64_t token, uint32_t peer, int ndom, void *laddr, int mr,
                   uint64_t len, uint64_t chunk, const uint64_t *rbase, const uint64_t *rkey,
                   uint64_t roff, int64_t imm) {
    enter_py(e);
    int rc = check_peer(e, peer, ndom);
    if (!rc) rc = check_mr(e, mr);
    if (!rc && chunk == 0) rc = -FI_EINVAL;
    uint32_t i = rc ? AF_NONE : op_alloc(e);
    if (!rc && i == AF_NONE) rc = -FI_ENOMEM;
    if (!rc) {
        af_op *op = &e->ops[i];
        op->kind = OP_WRITE;
        op->token = token;
        op->peer = peer;
        op->ndom = (uint32_t)ndom;
        op->laddr = laddr ? laddr : e->scratch;
        op->mr = mr;
        op->len = len;
        op->chunk = chunk;
        op->total = len ? (len + chunk - 1) / chunk : 1;
        op->imm = imm;
        for (int d = 0; d < ndom; d++) {
            op->raddr[d] = rbase[d] + roff;
            op->rkey[d] = rkey[d];
        }
        rc = start_op(e, i);
        py_active(e);
        /* Reap: this thread is the poller while it is busy. A write that went out
         * whole as inject left nothing to reap; such a caller (a round trip, a
         * stream of small writes) is about to poll anyway, so only every 16th
         * reaps, which keeps a long inject stream's queue moving. */
        if (rc != 1 || (++e->reap_skip & 15) == 0) progress_locked(e);
    }
    leave_py(e);
    return rc;
}

int afe_post_read(af_engine *e, uint64_t token, uint32_t peer, int ndom, void *laddr, int mr,
                  uint64_t len, uint64_t chunk, const uint64_t *rbase, const uint64_t *rkey,
                  uint64_t roff) {
    enter_py(e);
    int rc = check_peer(e, peer, ndom);
    /* the provider writes into local memory: it must be registered */
    if (!rc && (mr < 0 || check_mr(e, mr))) rc = -FI_EINVAL;
    if (!rc && (chunk == 0 || len == 0 || !laddr)) rc = -FI_EINVAL;
    uint32_t i = rc ? AF_NONE : op_alloc(e);
    if (!rc && i == AF_NONE) rc = -FI_ENOMEM;
    if (!rc) {
        af_op *op = &e->ops[i];
        op->kind = OP_READ;
        op->token = token;
        op->peer = peer;
        op->ndom = (uint32_t)ndom;
        op->laddr = laddr;
        op->mr = mr;
        op->len = len;
        op->chunk = chunk;
        op->total = (len + chunk - 1) / chunk;
        for (int d = 0; d < ndom; d++) {
            op->raddr[d] = rbase[d] + roff;
            op->rkey[d] = rkey[d];
        }
        rc = start_op(e, i);
        py_active(e);
        progress_locked(e);
    }
    leave_py(e);
    return rc;
}

int afe_post_paged(af_engine *e, uint64_t token, uint32_t peer, int ndom, void *laddr, int mr,
                   const uint64_t *src_off, const uint64_t *dst_off, uint64_t npages,
                   uint64_t page, const uint64_t *rbase, const uint64_t *rkey, int64_t imm) {
    /* Copy the page maps so the caller's arrays need not outlive the call. */
    uint64_t *offs = npages ? malloc(sizeof(uint64_t) * 2 * npages) : NULL;
    if (npages && !offs) return -FI_ENOMEM;
    if (npages) {
        memcpy(offs, src_off, sizeof(uint64_t) * npages);
        memcpy(offs + npages, dst_off, sizeof(uint64_t) * npages);
    }
    enter_py(e);
    int rc = check_peer(e, peer, ndom);
    if (!rc) rc = check_mr(e, mr);
    uint32_t i = rc ? AF_NONE : op_alloc(e);
    if (!rc && i == AF_NONE) rc = -FI_ENOMEM;
    if (rc) {
        free(offs);
    } else {
        af_op *op = &e->ops[i];
        op->kind = OP_PAGED;
        op->token = token;
        op->peer = peer;
        op->ndom = (uint32_t)ndom;
        op->laddr = laddr;
        op->mr = mr;
        op->offs = offs;
        op->page = page;
        op->total = npages;
        op->imm = imm;
        for (int d = 0; d < ndom; d++) {
            op->raddr[d] = rbase[d];
            op->rkey[d] = rkey[d];
        }
        rc = start_op(e, i);
        py_active(e);
        progress_locked(e); /* reap: this thread is the poller while it is busy */
    }
    leave_py(e);
    return rc;
}

int afe_post_send(af_engine *e, uint64_t token, uint32_t peer, const void *buf, uint32_t len) {
    if (len > e->ctrl_max) return -FI_EMSGSIZE;
    void *msg = malloc(len ? len : 1);
    if (!msg) return -FI_ENOMEM;
    memcpy(msg, buf, len);
    enter_py(e);
    int rc = check_peer(e, peer, 1);
    uint32_t i = rc ? AF_NONE : op_alloc(e);
    if (!rc && i == AF_NONE) rc = -FI_ENOMEM;
    if (rc) {
        free(msg);
    } else {
        af_op *op = &e->ops[i];
        op->kind = OP_SEND;
        op->token = token;
        op->peer = peer;
        op->ndom = 1;
        op->msg = msg;
        op->msglen = len;
        op->total = 1;
        rc = start_op(e, i);
        py_active(e);
        progress_locked(e); /* reap: this thread is the poller while it is busy */
    }
    leave_py(e);
    return rc;
}
