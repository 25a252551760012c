/* Batches: many writes posted in one call and reported in one event.
 *
 * The caller's entries arrive grouped by peer. Each peer's run becomes one
 * OP_BATCH child op (so the peer bookkeeping of afpeer.c, the pending queue
 * and back-pressure work per peer, as for any op), and one OP_GROUP op holds
 * the batch's token: it posts nothing, counts its children down, and pushes
 * the batch's only AF_EV_OP when the last one finishes. A child that fails
 * writes the status of each entry it could not complete into the caller's
 * status array; an early report (a lost peer, afpeer.c) of every unfinished
 * child makes the group report early too ("held", len 1).
 */
#include "afint.h"

static uint64_t pieces(const af_bent *en, const af_btgt *t) {
    return en->len ? (en->len + t->chunk - 1) / t->chunk : 1;
}

static void group_check(af_engine *e, uint32_t g) {
    af_op *gp = &e->ops[g];
    if (gp->pending) return; /* still launching: afe_post_batch settles it */
    if (gp->live == 0) {
        push_event(e, AF_EV_OP, 0, gp->status, 0, gp->token);
        op_free(e, g);
    } else if (gp->unrep == 0 && !gp->reported) {
        gp->reported = 1;
        push_event(e, AF_EV_OP, 0, gp->status ? gp->status : -FI_EIO, 1, gp->token);
    }
}

void batch_child_done(af_engine *e, uint32_t i) {
    af_op *op = &e->ops[i];
    uint32_t g = op->group;
    int32_t st = op->status;
    int rep = op->reported;
    op_free(e, i);
    af_op *gp = &e->ops[g];
    if (st && !gp->status) gp->status = st;
    gp->live--;
    if (!rep) gp->unrep--;
    group_check(e, g);
}

/* Child i is reported before the provider gave its pieces back: the entries
 * with a piece still out are the ones not known to have landed. */
void batch_child_reported(af_engine *e, uint32_t i) {
    af_op *op = &e->ops[i];
    for (int d = 0; d < e->ndom; d++)
        for (uint32_t k = 0; k < e->dom[d].nwr; k++) {
            af_wr *wr = &e->dom[d].wrs[k];
            if (wr->live && wr->op == i && !op->bstatus[wr->ent]) op->bstatus[wr->ent] = op->status;
        }
    af_op *gp = &e->ops[op->group];
    if (op->status && !gp->status) gp->status = op->status;
    gp->unrep--;
    group_check(e, op->group);
}

/* Check a batch before anything is posted (lock held): its targets, entries,
 * peers and registrations. Returns 0 and the number of peer runs, or a
 * negative errno. */
int batch_check(af_engine *e, const af_btgt *tgts, uint32_t ntgt, const af_bent *ents, uint64_t n,
                uint32_t *runs_out) {
    if (!tgts || !ents || n == 0) return -FI_EINVAL;
    for (uint32_t t = 0; t < ntgt; t++)
        if (!tgts[t].chunk || tgts[t].ndom < 1 || tgts[t].ndom > AF_MAX_DOMS) return -FI_EINVAL;
    uint32_t runs = 0, prev = AF_NONE;
    for (uint64_t j = 0; j < n; j++) {
        if (ents[j].tgt >= ntgt || (!ents[j].src && ents[j].len)) return -FI_EINVAL;
        uint32_t p = tgts[ents[j].tgt].peer;
        if (p != prev) runs++;
        prev = p;
    }
    int rc = 0;
    for (uint32_t t = 0; t < ntgt && !rc; t++) rc = check_peer(e, tgts[t].peer, (int)tgts[t].ndom);
    for (uint64_t j = 0; j < n && !rc; j++) rc = check_mr(e, ents[j].mr);
    *runs_out = runs;
    return rc;
}

/* Check and post a batch from any thread holding the engine lock (the Python
 * thread, or the trigger watcher). Returns 1 when every entry finished inside
 * the call, 2 when it finished with failed entries (their statuses are set),
 * 0 when the batch's event follows (*gout, if given: its group op), or a
 * negative errno when it was refused and nothing was posted. */
int batch_launch(af_engine *e, uint64_t token, const af_btgt *tgts, uint32_t ntgt,
                 const af_bent *ents, uint64_t n, int32_t *status, uint32_t *gout) {
    if (!status) return -FI_EINVAL;
    uint32_t runs = 0;
    int rc = batch_check(e, tgts, ntgt, ents, n, &runs);
    uint32_t g = rc ? AF_NONE : op_alloc(e);
    if (!rc && g == AF_NONE) rc = -FI_ENOMEM;
    if (rc) return rc;
    af_op *gp = &e->ops[g];
    gp->kind = OP_GROUP;
    gp->token = token;
    gp->peer = AF_NONE;
    gp->live = gp->unrep = runs;
    gp->bstatus = status;
    gp->pending = 1; /* launching: children finishing now do not report it */
    for (uint64_t lo = 0; lo < n;) {
        uint32_t peer = tgts[ents[lo].tgt].peer;
        uint64_t hi = lo, total = 0;
        for (; hi < n && tgts[ents[hi].tgt].peer == peer; hi++) total += pieces(&ents[hi], &tgts[ents[hi].tgt]);
        uint32_t c = op_alloc(e); /* may move the slab: index, never pointer, across it */
        if (c == AF_NONE) {
            for (uint64_t j = lo; j < hi; j++) status[ents[j].idx] = -FI_ENOMEM;
            gp = &e->ops[g];
            if (!gp->status) gp->status = -FI_ENOMEM;
            gp->live--;
            gp->unrep--;
        } else {
            af_op *op = &e->ops[c];
            op->kind = OP_BATCH;
            op->token = token;
            op->peer = peer;
            op->ndom = 1;
            op->imm = 0; /* carries immediates: the doorbell counts them (pump_op) */
            op->ents = ents;
            op->tgts = tgts;
            op->lo = op->bj = lo;
            op->hi = hi;
            op->total = total;
            op->bstatus = status;
            op->group = g;
            op_launch(e, c);
            if (op_finished(&e->ops[c])) batch_child_done(e, c); /* all injected */
        }
        lo = hi;
    }
    gp = &e->ops[g];
    gp->pending = 0;
    if (gp->live == 0) {
        rc = gp->status ? 2 : 1;
        op_free(e, g);
    } else {
        group_check(e, g);
        if (gout) *gout = g;
    }
    return rc;
}

int afe_post_batch(af_engine *e, uint64_t token, const af_btgt *tgts, uint32_t ntgt,
                   const af_bent *ents, uint64_t n, int32_t *status) {
    if (n == 0) return 1;
    enter_py(e);
    int rc = batch_launch(e, token, tgts, ntgt, ents, n, status, NULL);
    if (rc >= 0) {
        py_active(e);
        progress_locked(e); /* reap: this thread is the poller while it is busy */
    }
    leave_py(e);
    return rc;
}
