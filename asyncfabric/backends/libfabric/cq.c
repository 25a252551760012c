/* Completions: what each CQ entry means (an immediate to count, a message for
 * Python, a piece of one of our transfers done) and what an error entry fails.
 * The progress thread, Python's spins and posts (progress.c, ops.c) and the
 * native hook (afhook.h) all read completions through here. */
#include "afint.h"

static inline af_rx *as_rx(af_dom *d, void *ctx) {
    uintptr_t p = (uintptr_t)ctx, lo = (uintptr_t)d->rx, hi = (uintptr_t)(d->rx + d->nrx);
    return p >= lo && p < hi ? (af_rx *)ctx : NULL;
}

static inline af_wr *as_wr(af_dom *d, void *ctx) {
    uintptr_t p = (uintptr_t)ctx, lo = (uintptr_t)d->wrs, hi = (uintptr_t)(d->wrs + d->nwr);
    return p >= lo && p < hi ? (af_wr *)ctx : NULL;
}

/* Owed immediates (quirks.h sender_copy). On shm a write with CQ data is a
 * command the target's progress thread carries out (it copies the data and
 * answers), while a plain write of host memory is copied by the posting
 * thread before the call returns. So a piece that carries an immediate goes
 * as a plain write; when that write has completed the data is in place, and
 * the immediate follows as a zero-byte write carrying it. The target counts
 * it exactly as before (one immediate per piece: the counting rule holds),
 * and never before the data is there. The piece stays outstanding until its
 * immediate went out; a target whose queue is full gets it later, from the
 * domain's owed list (owed_retry); a failed op or a lost peer gets none.
 *
 * Post wr's immediate (lock held). 0: out; 1: queued for later; < 0: failed. */
static int send_owed(af_engine *e, af_dom *d, af_wr *wr) {
    af_op *op = &e->ops[wr->op];
    if (op->status) return op->status; /* failed meanwhile: no immediate for it */
    af_peer *p = &e->peers[op->peer];
    if (p->dead) return -p->dead; /* shm maps a peer's queue: never post into a gone one */
    int held = peer_qlock(e, op->peer, (uint32_t)(d - e->dom)); /* qlock.h */
    if (held) return held;
    dom_lock(e, d);
    ssize_t r = fi_inject_writedata(d->ep, e->scratch, 0, wr->imm, wr->dest, wr->raddr, wr->key);
    dom_unlock(e, d);
    if (r == -FI_EAGAIN) {
        e->st.eagain++;
        uint64_t t = now_ns();
        if (wr->owe == 1) wr->t_owe = t;
        else if (e->pol.post_timeout_ns && t - wr->t_owe > e->pol.post_timeout_ns) return -FI_ETIMEDOUT;
        return 1;
    }
    if (r) return (int)r;
    e->st.posts++;
    /* a sleeping target must wake to count it (doorbell.h) */
    if (p->bell.page) {
        atomic_thread_fence(memory_order_seq_cst);
        if (bell_ring(e->bell_fd, &p->bell)) e->st.wakeups++;
    }
    return 0;
}

static void finish_wr(af_engine *e, af_dom *d, af_wr *wr, int32_t status);

void complete_wr(af_engine *e, af_dom *d, af_wr *wr, int32_t status) {
    if (wr->owe && !status) {
        int r = send_owed(e, d, wr);
        if (r == 1) { /* the target's queue is full: its immediate waits on the list */
            owe_push(d, wr);
            return;
        }
        status = r;
    }
    finish_wr(e, d, wr, status);
}

void owe_push(af_dom *d, af_wr *wr) {
    if (wr->owe == 1) wr->t_owe = now_ns(); /* its post_timeout runs from here (send_owed) */
    wr->owe = 2;
    wr->next_free = AF_NONE;
    if (d->owe_tail == AF_NONE) d->owe_head = (uint32_t)(wr - d->wrs);
    else d->wrs[d->owe_tail].next_free = (uint32_t)(wr - d->wrs);
    d->owe_tail = (uint32_t)(wr - d->wrs);
}

int owed_retry(af_engine *e, af_dom *d) {
    int n = 0;
    while (d->owe_head != AF_NONE) {
        af_wr *wr = &d->wrs[d->owe_head];
        int r = send_owed(e, d, wr);
        if (r == 1) break; /* still full: keep the order, try again next pass */
        d->owe_head = wr->next_free;
        if (d->owe_head == AF_NONE) d->owe_tail = AF_NONE;
        finish_wr(e, d, wr, r);
        n++;
    }
    return n;
}

static void finish_wr(af_engine *e, af_dom *d, af_wr *wr, int32_t status) {
    uint32_t opi = wr->op, ent = wr->ent;
    wr->owe = 0;
    wr->live = 0;
    if (wr->sslot >= 0) d->tx_free[d->tx_top++] = wr->sslot;
    wr->next_free = d->wr_free;
    d->wr_free = (uint32_t)(wr - d->wrs);
    d->credits++;
    af_op *op = &e->ops[opi];
    if (status && !op->status) op->status = status;
    if (status && op->kind == OP_BATCH && !op->bstatus[ent]) op->bstatus[ent] = status;
    peer_progress(e, op);
    op->outstanding--;
    maybe_finish(e, opi);
}

static inline void handle_entry(af_engine *e, af_dom *d, const struct fi_cq_data_entry *c) {
    e->st.completions++;
    if (c->flags & FI_REMOTE_CQ_DATA) {
        count_imm(e, (uint32_t)c->data);
        af_rx *rx = as_rx(d, c->op_context);
        if (rx) post_rx(e, d, rx);
        return;
    }
    af_rx *rx = as_rx(d, c->op_context);
    if (rx) {
        if (d == &e->dom[0]) {
            rx->state = RX_HELD; /* until Python copies it out (afe_recv_take) */
            push_event(e, AF_EV_RECV, rx->slot, 0, (uint32_t)c->len, 0);
        } else {
            post_rx(e, d, rx); /* messages go to domain 0; anything else is dropped */
        }
        return;
    }
    af_wr *wr = as_wr(d, c->op_context);
    if (wr) complete_wr(e, d, wr, 0);
}

/* An error entry already read. Returns 0 when it was a receive buffer, else
 * its status: the transfer it belonged to fails, or the CQ is reported dead. */
static int handle_error_entry(af_engine *e, af_dom *d, const struct fi_cq_err_entry *err) {
    e->st.cq_errors++;
    int32_t status = -(int32_t)(err->err ? err->err : FI_EIO);
    af_wr *wr = as_wr(d, err->op_context);
    if (wr) {
        complete_wr(e, d, wr, status);
        return status;
    }
    af_rx *rx = as_rx(d, err->op_context);
    if (rx) {
        if (err->err == FI_ECANCELED) rx->state = RX_HELD; /* cancelled at close: never repost */
        else post_rx(e, d, rx); /* a truncated or failed receive: the buffer is reused */
        return 0;
    }
    if (!err->op_context) {
        /* shm 1.17 reports a failed in-call copy (CMA to a process that just
         * exited) with no context, after the post returned 0. The transfer
         * it belonged to cannot be named here, so fail nothing: check the
         * peers now, and the dead one's transfers fail with -ESRCH. */
        e->st.orphan_errors++;
        e->t_watch = 0;
        return status;
    }
    push_event(e, AF_EV_FATAL, (uint32_t)(d - e->dom), status, 0, 0);
    return status;
}

static void handle_error(af_engine *e, af_dom *d) {
    struct fi_cq_err_entry err;
    memset(&err, 0, sizeof err);
    dom_lock(e, d);
    ssize_t r = fi_cq_readerr(d->cq, &err, 0);
    dom_unlock(e, d);
    if (r < 0) return;
    handle_error_entry(e, d, &err);
}

/* Receive buffers whose repost failed (EAGAIN) go back to the provider. */
static void repost_idle(af_engine *e, af_dom *d) {
    if (!d->rx_retry) return;
    d->rx_retry = 0;
    for (uint32_t i = 0; i < d->nrx; i++)
        if (d->rx[i].state == RX_IDLE && post_rx(e, d, &d->rx[i])) break;
}

int progress_dom(af_engine *e, af_dom *d) {
    struct fi_cq_data_entry ents[64];
    int total = 0;
    for (;;) {
        /* With workers, a busy domain is its owner's to read (it may be posting
         * a copy): skip it rather than wait. */
        if (!dom_trylock(e, d)) break;
        if (!qlock_free_soon(d->own_qlock)) { /* held by a poster, maybe a dead one (qlock.h) */
            dom_unlock(e, d);
            break;
        }
        ssize_t n = fi_cq_read(d->cq, ents, 64);
        dom_unlock(e, d);
        if (n == -FI_EAGAIN) break;
        if (n == -FI_EAVAIL) {
            handle_error(e, d);
            total++;
            continue;
        }
        if (n < 0) {
            push_event(e, AF_EV_FATAL, (uint32_t)(d - e->dom), (int32_t)n, 0, 0);
            break;
        }
        for (ssize_t i = 0; i < n; i++) handle_entry(e, d, &ents[i]);
        total += (int)n;
        if (n < 64) break;
    }
    repost_idle(e, d);
    if (d->owe_head != AF_NONE) total += owed_retry(e, d);
    return total;
}

void cq_handle(af_engine *e, af_dom *d, const struct fi_cq_data_entry *ents, ssize_t n) {
    for (ssize_t i = 0; i < n; i++) handle_entry(e, d, &ents[i]);
    repost_idle(e, d);
    if (d->owe_head != AF_NONE) owed_retry(e, d);
}

/* Copy a received message out and give its buffer back to the provider. */
int afe_recv_take(af_engine *e, uint32_t slot, void *dst, uint32_t len) {
    enter_py(e);
    af_dom *d = &e->dom[0];
    int rc = -FI_EINVAL;
    if (slot < d->nrx && len <= e->ctrl_max && d->rx[slot].state == RX_HELD) {
        memcpy(dst, d->rx[slot].buf, len);
        post_rx(e, d, &d->rx[slot]);
        rc = 0;
    }
    leave_py(e);
    return rc;
}

/* The native hook's view of the above (afhook.h: handle_cq_entry,
 * handle_cq_error, repost_rx), by domain index. */
void cq_hook_entry(af_engine *e, int dom, const struct fi_cq_data_entry *c) {
    handle_entry(e, &e->dom[dom], c);
}

int cq_hook_error(af_engine *e, int dom, const struct fi_cq_err_entry *err) {
    return handle_error_entry(e, &e->dom[dom], err);
}

void cq_hook_repost_rx(af_engine *e, int dom) { repost_idle(e, &e->dom[dom]); }
