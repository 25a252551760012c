/* Raw baseline loops for benchmarks (declarations and contract in raw.h).
 *
 * Compiled in afcore.c's translation unit (included after it by _build.py), so
 * it uses the engine's domains, peers and registrations directly. Nothing here
 * is on asyncfabric's own data path: these loops exist so that a benchmark can
 * put "what C gets from the same provider and endpoints" next to "what
 * `await engine.write(...)` gets" in one run.
 */
#include <sched.h>

#include "raw.h"

typedef struct afr_ctxs {
    struct fi_context2 *ctx;
    uint32_t *free_stack;
    uint32_t nfree, n;
    uint64_t outstanding;
} afr_ctxs;

static int afr_ctxs_init(afr_ctxs *c, uint32_t n) {
    c->n = n ? n : 1;
    c->ctx = calloc(c->n, sizeof(struct fi_context2));
    c->free_stack = calloc(c->n, sizeof(uint32_t));
    if (!c->ctx || !c->free_stack) {
        free(c->ctx);
        free(c->free_stack);
        return -FI_ENOMEM;
    }
    for (uint32_t i = 0; i < c->n; i++) c->free_stack[i] = c->n - 1 - i;
    c->nfree = c->n;
    c->outstanding = 0;
    return 0;
}

static void afr_ctxs_fini(afr_ctxs *c) {
    free(c->ctx);
    free(c->free_stack);
}

static inline int afr_mine(afr_ctxs *c, void *p) {
    return c && (uintptr_t)p >= (uintptr_t)c->ctx && (uintptr_t)p < (uintptr_t)(c->ctx + c->n);
}

/* One pass over every CQ. Our own completions free a context; everything else
 * goes where the progress thread would send it (counters, rx buffers, ops). */
static int afr_poll(af_engine *e, afr_ctxs *c) {
    struct fi_cq_data_entry ents[64];
    for (int i = 0; i < e->ndom; i++) {
        af_dom *d = &e->dom[i];
        for (;;) {
            ssize_t n = fi_cq_read(d->cq, ents, 64);
            if (n == -FI_EAGAIN) break;
            if (n == -FI_EAVAIL) {
                struct fi_cq_err_entry err;
                memset(&err, 0, sizeof err);
                if (fi_cq_readerr(d->cq, &err, 0) < 0) break;
                if (afr_mine(c, err.op_context) || !as_rx(d, err.op_context))
                    return -(int)(err.err ? err.err : FI_EIO);
                post_rx(e, d, as_rx(d, err.op_context));
                continue;
            }
            if (n < 0) return (int)n;
            for (ssize_t k = 0; k < n; k++) {
                if (afr_mine(c, ents[k].op_context)) {
                    c->free_stack[c->nfree++] =
                        (uint32_t)((struct fi_context2 *)ents[k].op_context - c->ctx);
                    c->outstanding--;
                } else {
                    handle_entry(e, d, &ents[k]);
                }
            }
            if (n < 64) break;
        }
        if (d->rx_retry) {
            d->rx_retry = 0;
            for (uint32_t r = 0; r < d->nrx; r++)
                if (d->rx[r].state == RX_IDLE && post_rx(e, d, &d->rx[r])) break;
        }
    }
    return 0;
}

/* Called once per idle turn of a loop. Every 64th turn also yields the core:
 * on a loaded 2-core machine a pure spinner can hold the CPU the peer process
 * needs for a whole time slice, which would make "raw" a baseline of the
 * scheduler rather than of the provider. */
static inline int afr_expired(uint64_t t0, uint64_t timeout_ns, uint64_t *spins) {
    if ((++*spins & 63) != 0) return 0;
    sched_yield();
    return now_ns() - t0 > timeout_ns;
}

/* Post one write; returns 0, -FI_EAGAIN (no room: poll and retry) or an error. */
static inline int afr_post(af_engine *e, afr_ctxs *c, int dn, fi_addr_t dest, uint8_t *src,
                           uint64_t len, void *desc, uint64_t raddr, uint64_t key, int64_t imm) {
    af_dom *d = &e->dom[dn];
    ssize_t ret;
    if (len <= d->inject) {
        ret = imm >= 0 ? fi_inject_writedata(d->ep, src, len, (uint64_t)imm, dest, raddr, key)
                       : fi_inject_write(d->ep, src, len, dest, raddr, key);
        return (int)ret;
    }
    if (!c->nfree) return -FI_EAGAIN;
    struct fi_context2 *ctx = &c->ctx[c->free_stack[c->nfree - 1]];
    ret = imm >= 0 ? fi_writedata(d->ep, src, len, desc, (uint64_t)imm, dest, raddr, key, ctx)
                   : fi_write(d->ep, src, len, desc, dest, raddr, key, ctx);
    if (!ret) {
        c->nfree--;
        c->outstanding++;
    }
    return (int)ret;
}

static int afr_wait_locked(af_engine *e, afr_ctxs *c, const uint32_t *imms, const uint64_t *counts,
                           uint32_t n, uint64_t t0, uint64_t timeout_ns) {
    uint64_t spins = 0;
    uint32_t done = 0;
    while (done < n) {
        int rc = afr_poll(e, c);
        if (rc) return rc;
        while (done < n && (counts[done] == 0 || ctr_take(e, imms[done], counts[done]))) done++;
        if (done < n && afr_expired(t0, timeout_ns, &spins)) return -FI_ETIMEDOUT;
    }
    return 0;
}

int afr_stream(af_engine *e, const uint32_t *peer_ids, uint32_t ntargets, int ndom, void *laddr,
               int mr, const uint64_t *src_off, const uint64_t *dst_off, const uint64_t *lens,
               const uint32_t *item_peer, const uint32_t *item_imm, uint64_t nitems, int64_t imm,
               const uint64_t *rbase, const uint64_t *rkey, uint64_t passes, uint32_t window,
               int64_t ack_imm, uint64_t ack_count, uint64_t timeout_ns, uint64_t *elapsed_ns) {
    if (ndom < 1 || ndom > e->ndom || ntargets == 0) return -FI_EINVAL;
    for (uint32_t t = 0; t < ntargets; t++)
        if (check_peer(e, peer_ids[t], ndom)) return -FI_EINVAL;
    if (check_mr(e, mr) || mr < 0) return -FI_EINVAL;
    afr_ctxs c;
    if (afr_ctxs_init(&c, window)) return -FI_ENOMEM;
    enter_py(e);
    uint64_t t0 = now_ns(), spins = 0;
    int rc = 0;
    uint8_t *base = laddr;
    for (uint64_t p = 0; p < passes && !rc; p++) {
        for (uint64_t i = 0; i < nitems && !rc; i++) {
            int dn = (int)(i % (uint64_t)ndom);
            uint32_t t = item_peer ? item_peer[i] : 0;
            fi_addr_t dest = e->peers[peer_ids[t]].addr[dn];
            int64_t v = item_imm ? (int64_t)item_imm[i] : imm;
            for (;;) {
                rc = afr_post(e, &c, dn, dest, base + src_off[i], lens[i], e->mrs[mr].desc[dn],
                              rbase[t * ndom + dn] + dst_off[i], rkey[t * ndom + dn], v);
                if (rc != -FI_EAGAIN) break;
                /* Back-pressure: reap completions, never give up the loop. */
                rc = afr_poll(e, &c);
                if (rc) break;
                if (afr_expired(t0, timeout_ns, &spins)) {
                    rc = -FI_ETIMEDOUT;
                    break;
                }
            }
            e->st.posts++;
        }
    }
    while (!rc && c.outstanding) {
        rc = afr_poll(e, &c);
        if (!rc && afr_expired(t0, timeout_ns, &spins)) rc = -FI_ETIMEDOUT;
    }
    if (!rc && ack_imm >= 0) {
        uint32_t a = (uint32_t)ack_imm;
        rc = afr_wait_locked(e, &c, &a, &ack_count, 1, t0, timeout_ns);
    }
    *elapsed_ns = now_ns() - t0;
    /* On failure, wait (bounded) for what is still out so the contexts can go. */
    uint64_t t1 = now_ns();
    while (c.outstanding && now_ns() - t1 < 1000000000ull)
        if (afr_poll(e, &c)) break;
    leave_py(e);
    if (!c.outstanding) afr_ctxs_fini(&c); /* else leak: the provider still holds them */
    return rc;
}

int afr_wait(af_engine *e, const uint32_t *imms, const uint64_t *counts, uint32_t n,
             uint64_t timeout_ns, uint64_t *elapsed_ns) {
    enter_py(e);
    uint64_t t0 = now_ns();
    int rc = afr_wait_locked(e, NULL, imms, counts, n, t0, timeout_ns);
    *elapsed_ns = now_ns() - t0;
    leave_py(e);
    return rc;
}

int afr_send_imm(af_engine *e, uint32_t peer, uint64_t rbase, uint64_t rkey, uint32_t imm,
                 uint64_t timeout_ns) {
    if (check_peer(e, peer, 1)) return -FI_EINVAL;
    enter_py(e);
    uint64_t t0 = now_ns(), spins = 0;
    int rc;
    for (;;) {
        rc = (int)fi_inject_writedata(e->dom[0].ep, e->scratch, 0, imm, e->peers[peer].addr[0],
                                      rbase, rkey);
        if (rc != -FI_EAGAIN) break;
        if ((rc = afr_poll(e, NULL))) break;
        if (afr_expired(t0, timeout_ns, &spins)) {
            rc = -FI_ETIMEDOUT;
            break;
        }
    }
    leave_py(e);
    return rc;
}

int afr_pingpong(af_engine *e, int initiator, uint32_t peer, void *laddr, int mr, uint64_t len,
                 uint64_t rbase, uint64_t rkey, uint32_t imm_out, uint32_t imm_in, uint64_t iters,
                 uint64_t *rtt_ns, uint64_t timeout_ns) {
    if (check_peer(e, peer, 1) || check_mr(e, mr) || mr < 0) return -FI_EINVAL;
    afr_ctxs c;
    if (afr_ctxs_init(&c, 16)) return -FI_ENOMEM;
    enter_py(e);
    fi_addr_t dest = e->peers[peer].addr[0];
    void *desc = e->mrs[mr].desc[0];
    uint64_t one = 1, t0 = now_ns(), spins = 0;
    int rc = 0;
    for (uint64_t i = 0; i < iters && !rc; i++) {
        uint64_t ts = now_ns();
        if (!initiator) rc = afr_wait_locked(e, &c, &imm_in, &one, 1, t0, timeout_ns);
        while (!rc) {
            rc = afr_post(e, &c, 0, dest, laddr, len, desc, rbase, rkey, imm_out);
            if (rc != -FI_EAGAIN) break;
            rc = afr_poll(e, &c);
            if (!rc && afr_expired(t0, timeout_ns, &spins)) rc = -FI_ETIMEDOUT;
        }
        if (!rc && initiator) {
            rc = afr_wait_locked(e, &c, &imm_in, &one, 1, t0, timeout_ns);
            rtt_ns[i] = now_ns() - ts;
        }
    }
    uint64_t t1 = now_ns();
    while (c.outstanding && now_ns() - t1 < 1000000000ull)
        if (afr_poll(e, &c)) break;
    leave_py(e);
    if (!c.outstanding) afr_ctxs_fini(&c);
    return rc;
}
