/* Worker posting: with several workers, the workers post the data of large
 * transfers, each over its own domains, and nobody holds the engine lock
 * across a post.
 *
 * Why. On shm the thread that posts a write does copy work for it (it waits
 * for the target's region lock while the target copies), so one poster for
 * all domains is one core's worth of copying, however many domains the engine
 * stripes over. And a post made under the engine lock stops every other
 * thread of the engine (completions, counting, other posts) for that time.
 *
 * How.
 *  1. Queue. A post from Python (ops.c, batch.c) of a transfer whose pieces
 *     are not all inject-sized builds the op as ever but posts nothing: the op
 *     goes on the engine's pending queue marked wq, and napping workers are
 *     woken (workers_wake). Small transfers still go out inline: a hand-off
 *     costs more than their post.
 *  2. Take. A worker, under the engine lock, takes pieces from the queued ops
 *     in order: the op's cursor advances exactly as pump_op's would, but the
 *     piece goes over a domain the worker owns (any domain below the target's
 *     count: striping never changes the count), with a transmit context taken
 *     from that domain. The piece counts as outstanding from here, so the op
 *     cannot finish under it. At most AF_WQ_PIECES pieces or AF_WQ_BYTES bytes
 *     per pass, so the other workers find pieces left to take.
 *  3. Post. Without the engine lock, each piece is posted holding only its
 *     domain's lock (which its owner alone takes for long).
 *  4. Commit. Under the engine lock again: an injected piece's context is
 *     given back (and the op may finish); a failed post fails its op (and
 *     entry) like a failed completion; a piece that met EAGAIN stays with the
 *     worker for its next pass, unless its op failed meanwhile (a lost peer,
 *     afpeer.c) or it has waited post_timeout_ns.
 * Peers that sleep are rung once per pass (doorbell.h).
 */
#include "afint.h"

/* Whether op i goes to the workers (lock held): several workers, and a data
 * transfer with a piece larger than an inject, or than AF_WQ_MIN where the
 * provider never injects (tcp): below that a post costs less than a hand-off. */
#define AF_WQ_MIN 4096u
int wq_wants(af_engine *e, const af_op *op) {
    if (e->nworkers < 2) return 0;
    uint64_t inj = e->dom[0].inject > AF_WQ_MIN ? e->dom[0].inject : AF_WQ_MIN;
    switch (op->kind) {
    case OP_READ:
        return 1;
    case OP_WRITE:
        return op->len > inj;
    case OP_PAGED:
        return op->page > inj && op->total > 0;
    case OP_BATCH:
        for (uint64_t j = op->lo; j < op->hi; j++)
            if (op->ents[j].len > inj) return 1;
        return 0;
    default:
        return 0;
    }
}

/* How many domains the op's next piece may go over: its target's. */
static inline uint32_t piece_ndom(const af_op *op) {
    return op->kind == OP_BATCH ? op->tgts[op->ents[op->bj].tgt].ndom : op->ndom;
}

/* A domain of w's below nd with a context and a credit free, or -1. */
static int pick_dom(af_engine *e, af_worker *w, uint32_t nd) {
    for (int k = 0; k < w->ndoms; k++) {
        int i = (w->rr + k) % w->ndoms, dn = w->doms[i];
        af_dom *d = &e->dom[dn];
        if ((uint32_t)dn < nd && d->credits && d->wr_free != AF_NONE) {
            w->rr = i + 1;
            return dn;
        }
    }
    return -1;
}

/* Take op i's next piece into pc (lock held). 0: none for this worker now. */
static int take_piece(af_engine *e, af_worker *w, uint32_t opi, af_piece *pc) {
    af_op *op = &e->ops[opi];
    int dn = pick_dom(e, w, piece_ndom(op));
    if (dn < 0) return 0;
    af_dom *d = &e->dom[dn];
    int mr = piece_at(e, op, (uint32_t)dn, pc);
    if (op->kind == OP_BATCH) batch_advance(op, pc->len); /* taken: it is this worker's now */
    af_wr *wr = NULL;
    take_wr(d, opi, -1, &wr); /* pick_dom saw one free */
    commit_wr(d, wr);
    wr->ent = op->kind == OP_BATCH ? pc->ent : 0;
    pc->wr = wr;
    pc->opi = opi;
    pc->dn = (uint32_t)dn;
    pc->peer = op->peer;
    pc->kind = (int)op->kind;
    pc->desc = mr >= 0 ? e->mrs[mr].desc[dn] : NULL;
    pc->inject = op->kind != OP_READ && can_inject(e, d, mr, pc->len, pc->imm);
    pc->dest = e->peers[op->peer].addr[dn];
    pc->qlock = e->peers[op->peer].qlock[dn];
    pc->pidfd = e->peers[op->peer].pidfd;
    pc->pid = peer_cma_pid(&e->peers[op->peer]);
    pc->direct = 0;
    if (op->kind != OP_READ && !pc->inject && owe_imm(e, d, mr, pc, pc->dest, wr))
        pc->imm = -1; /* a plain write now; its immediate follows its completion (cq.c) */
    pc->t0 = now_ns();
    pc->ret = 1;
    op->posted++;
    op->outstanding++;
    return 1;
}

/* Take what w may from the queue (lock held). */
static void take(af_engine *e, af_worker *w) {
    w->gen = atomic_load(&e->wq_gen);
    w->more = 0;
    uint64_t bytes = 0;
    for (int k = 0; k < w->npc; k++) bytes += w->pc[k].len;
    uint32_t prev = AF_NONE, i = e->pend_head;
    while (i != AF_NONE && w->npc < AF_WQ_PIECES && bytes < AF_WQ_BYTES) {
        af_op *op = &e->ops[i];
        uint32_t next = op->next;
        if (op->wq) {
            while (op->posted < op->total && w->npc < AF_WQ_PIECES && bytes < AF_WQ_BYTES &&
                   take_piece(e, w, i, &w->pc[w->npc])) {
                bytes += w->pc[w->npc].len;
                w->npc++;
            }
            if (op->posted >= op->total) { /* every piece taken: off the queue */
                pend_unlink_after(e, prev, i);
                maybe_finish(e, i);
                i = next;
                continue;
            }
            /* pieces left that one of w's domains could carry: come back soon */
            if ((uint32_t)w->doms[0] < piece_ndom(op)) w->more = 1;
        }
        prev = i;
        i = next;
    }
    if (i != AF_NONE) w->more = 1; /* stopped at the cap: the rest next pass */
}

/* Post the pieces not yet out, holding only their domains' locks. A domain
 * that said EAGAIN gets nothing more this pass (its order is kept). */
static void post(af_engine *e, af_worker *w) {
    uint32_t full = 0; /* bit per domain that said EAGAIN */
    for (int k = 0; k < w->npc; k++) {
        af_piece *pc = &w->pc[k];
        if (full & (1u << pc->dn)) {
            pc->ret = -FI_EAGAIN;
            continue;
        }
        af_dom *d = &e->dom[pc->dn];
        if (pc->wr->owe) { /* the sender copies: our own copy takes no lock (cma.c) */
            int c = cma_put(d, pc->pid, pc->src, pc->len, pc->dst);
            if (c != 1) { /* copied (its immediate is owed: commit), or failed */
                pc->direct = c == 0;
                pc->ret = c;
                continue;
            }
        }
        ssize_t r = qlock_check(pc->qlock, pc->pidfd, qlock_bound(e)); /* qlock.h */
        if (r) {
            pc->ret = (int32_t)r;
            continue;
        }
        pthread_mutex_lock(&d->lock);
        if (pc->kind == OP_READ)
            r = post_plain(d, 1, pc->src, pc->len, pc->desc, pc->dest, pc->dst, pc->key, pc->wr);
        else if (pc->inject)
            r = pc->imm >= 0 ? fi_inject_writedata(d->ep, pc->src, pc->len, (uint64_t)pc->imm, pc->dest,
                                                   pc->dst, pc->key)
                             : fi_inject_write(d->ep, pc->src, pc->len, pc->dest, pc->dst, pc->key);
        else if (pc->imm >= 0)
            r = fi_writedata(d->ep, pc->src, pc->len, pc->desc, (uint64_t)pc->imm, pc->dest, pc->dst,
                             pc->key, pc->wr);
        else if (pc->wr->owe) /* libfabric's copy (cma_put declined); its immediate follows (cq.c) */
            r = fi_write(d->ep, pc->src, pc->len, pc->desc, pc->dest, pc->dst, pc->key, pc->wr);
        else
            r = post_plain(d, 0, pc->src, pc->len, pc->desc, pc->dest, pc->dst, pc->key, pc->wr);
        pthread_mutex_unlock(&d->lock);
        pc->ret = (int32_t)r;
        if (r == -FI_EAGAIN) full |= 1u << pc->dn;
    }
}

/* Settle what post() did (lock held). Returns the pieces that went out. */
static int commit(af_engine *e, af_worker *w) {
    int out = 0, keep = 0;
    uint32_t rung[AF_WQ_PIECES];
    int nrung = 0;
    uint64_t t = 0;
    for (int k = 0; k < w->npc; k++) {
        af_piece *pc = &w->pc[k];
        af_dom *d = &e->dom[pc->dn];
        af_op *op = &e->ops[pc->opi];
        int32_t st = pc->ret;
        if (st == -FI_EAGAIN) {
            e->st.eagain++;
            if (!t) t = now_ns();
            if (op->status) st = op->status; /* failed meanwhile: post nothing more */
            else if (e->pol.post_timeout_ns && t - pc->t0 > e->pol.post_timeout_ns) st = -FI_ETIMEDOUT;
            else {
                w->pc[keep++] = *pc;
                continue;
            }
        }
        if (st == 0) {
            out++;
            e->st.posts++;
            e->st.worker_posts++;
            int seen = 0;
            for (int j = 0; j < nrung; j++) seen |= rung[j] == pc->peer;
            if (!seen) rung[nrung++] = pc->peer;
            e->st.direct_copies += (uint64_t)pc->direct;
            if (pc->inject || pc->direct) complete_wr(e, d, pc->wr, 0); /* no completion will come */
            continue;
        }
        if (!op->status) op_stop(e, op, st);
        complete_wr(e, d, pc->wr, st);
    }
    w->npc = keep;
    for (int j = 0; j < nrung; j++)
        if (bell_ring(e->bell_fd, &e->peers[rung[j]].bell)) e->st.wakeups++;
    return out;
}

/* Whether the queue may hold pieces for w that it has not looked at. */
int wq_waiting(af_engine *e, af_worker *w) {
    return w->more || atomic_load_explicit(&e->wq_gen, memory_order_relaxed) != w->gen;
}

/* One pass of worker w: take, post, commit. Returns the pieces posted. */
int wq_pass(af_engine *e, af_worker *w) {
    if (!w->npc && !wq_waiting(e, w)) return 0;
    eng_lock(e);
    take(e, w);
    pthread_mutex_unlock(&e->lock);
    if (!w->npc) return 0;
    post(e, w);
    eng_lock(e);
    int n = commit(e, w);
    pthread_mutex_unlock(&e->lock);
    return n;
}
