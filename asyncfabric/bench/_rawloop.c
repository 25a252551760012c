/* Raw baseline loops for benchmarks (declarations and contract in _rawloop.h).
 *
 * A module of its own (asyncfabric.bench._raw), outside the runtime core: it
 * reaches an engine only through the native hook (afhook.h), never the
 * core's internals, and links nothing of the core (libfabric's calls used
 * here are inline in its headers). Nothing here is on asyncfabric's own data
 * path: these loops exist so that a benchmark can put "what C gets from the
 * same provider and endpoints" next to "what `await engine.write(...)` gets"
 * in one run.
 */
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <rdma/fabric.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

/* Built warning-free: here every -Wall and -Wextra warning is an error
 * (_raw_build.py passes the flags; cffi's generated wrapper only warns). */
#pragma GCC diagnostic error "-Wall"
#pragma GCC diagnostic error "-Wextra"

#include "afhook.h"

typedef struct afr_ctxs {
    struct fi_context2 *ctx;
    uint32_t *free_stack;
    uint32_t nfree, n;
    uint64_t outstanding;
} afr_ctxs;

/* The hook as handed over by Python, refused unless it is of our layout and
 * for this engine. */
static const af_hook *afr_hook(uintptr_t engine, uintptr_t hook) {
    const af_hook *h = (const af_hook *)hook;
    if (!engine || !h || h->version != AF_HOOK_VERSION || h->size < sizeof(af_hook) ||
        (uintptr_t)h->engine != engine)
        return NULL;
    return h;
}

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
 * goes to the hook, which does what the progress thread would (counters, rx
 * buffers, the engine's transfers). */
static int afr_poll(const af_hook *h, af_engine *e, afr_ctxs *c) {
    struct fi_cq_data_entry ents[64];
    for (int i = 0; i < h->ndom; i++) {
        struct fid_cq *cq = h->dom[i].cq;
        for (;;) {
            ssize_t n = fi_cq_read(cq, ents, 64);
            if (n == -FI_EAGAIN) break;
            if (n == -FI_EAVAIL) {
                struct fi_cq_err_entry err;
                memset(&err, 0, sizeof err);
                if (fi_cq_readerr(cq, &err, 0) < 0) break;
                if (afr_mine(c, err.op_context)) return -(int)(err.err ? err.err : FI_EIO);
                int rc = h->handle_cq_error(e, i, &err); /* 0: a receive buffer, reposted */
                if (rc) return rc;
                continue;
            }
            if (n < 0) return (int)n;
            for (ssize_t k = 0; k < n; k++) {
                if (afr_mine(c, ents[k].op_context)) {
                    c->free_stack[c->nfree++] =
                        (uint32_t)((struct fi_context2 *)ents[k].op_context - c->ctx);
                    c->outstanding--;
                } else {
                    h->handle_cq_entry(e, i, &ents[k]);
                }
            }
            if (n < 64) break;
        }
        h->repost_rx(e, i);
    }
    return 0;
}

/* Called once per idle turn of a loop. Every 64th turn also yields the core:
 * on a loaded 2-core machine a pure spinner can hold the CPU the peer process
 * needs for a whole time slice, which would make "raw" a baseline of the
 * scheduler rather than of the provider. */
static inline int afr_expired(const af_hook *h, uint64_t t0, uint64_t timeout_ns, uint64_t *spins) {
    if ((++*spins & 63) != 0) return 0;
    sched_yield();
    return h->now_ns() - t0 > timeout_ns;
}

/* Post one write; returns 0, -FI_EAGAIN (no room: poll and retry) or an error. */
static inline int afr_post(const af_hook *h, afr_ctxs *c, int dn, fi_addr_t dest, uint8_t *src,
                           uint64_t len, void *desc, uint64_t raddr, uint64_t key, int64_t imm) {
    struct fid_ep *ep = h->dom[dn].ep;
    ssize_t ret;
    if (len <= h->dom[dn].inject) {
        ret = imm >= 0 ? fi_inject_writedata(ep, src, len, (uint64_t)imm, dest, raddr, key)
                       : fi_inject_write(ep, src, len, dest, raddr, key);
        return (int)ret;
    }
    if (!c->nfree) return -FI_EAGAIN;
    struct fi_context2 *ctx = &c->ctx[c->free_stack[c->nfree - 1]];
    ret = imm >= 0 ? fi_writedata(ep, src, len, desc, (uint64_t)imm, dest, raddr, key, ctx)
                   : fi_write(ep, src, len, desc, dest, raddr, key, ctx);
    if (!ret) {
        c->nfree--;
        c->outstanding++;
    }
    return (int)ret;
}

static int afr_wait_locked(const af_hook *h, af_engine *e, afr_ctxs *c, const uint32_t *imms,
                           const uint64_t *counts, uint32_t n, uint64_t t0, uint64_t timeout_ns) {
    uint64_t spins = 0;
    uint32_t done = 0;
    while (done < n) {
        int rc = afr_poll(h, e, c);
        if (rc) return rc;
        while (done < n && (counts[done] == 0 || h->ctr_take(e, imms[done], counts[done]))) done++;
        if (done < n && afr_expired(h, t0, timeout_ns, &spins)) return -FI_ETIMEDOUT;
    }
    return 0;
}

/* Wait (bounded) for what is still out so the contexts can go; 1 s at most. */
static void afr_settle(const af_hook *h, af_engine *e, afr_ctxs *c) {
    uint64_t t1 = h->now_ns();
    while (c->outstanding && h->now_ns() - t1 < 1000000000ull)
        if (afr_poll(h, e, c)) break;
}

int afr_stream(uintptr_t engine, uintptr_t hook, const uint32_t *peer_ids, uint32_t ntargets,
               int ndom, void *laddr, int mr, const uint64_t *src_off, const uint64_t *dst_off,
               const uint64_t *lens, const uint32_t *item_peer, const uint32_t *item_imm,
               uint64_t nitems, int64_t imm, const uint64_t *rbase, const uint64_t *rkey,
               uint64_t passes, uint32_t window, int64_t ack_imm, uint64_t ack_count,
               uint64_t timeout_ns, uint64_t *elapsed_ns) {
    const af_hook *h = afr_hook(engine, hook);
    if (!h || ndom < 1 || ndom > h->ndom || ntargets == 0) return -FI_EINVAL;
    af_engine *e = h->engine;
    h->lock(e);
    int rc = mr < 0 || h->check_mr(e, mr) ? -FI_EINVAL : 0;
    for (uint32_t t = 0; t < ntargets && !rc; t++)
        if (h->check_peer(e, peer_ids[t], ndom)) rc = -FI_EINVAL;
    /* Addresses and descriptors, looked up once: nothing changes them while
     * the lock is held. */
    fi_addr_t *dests = rc ? NULL : malloc(sizeof(fi_addr_t) * ntargets * (size_t)ndom);
    void *descs[AF_HOOK_MAX_DOMS];
    afr_ctxs c;
    if (!rc && !dests) rc = -FI_ENOMEM;
    if (!rc && afr_ctxs_init(&c, window)) rc = -FI_ENOMEM;
    if (rc) {
        h->unlock(e);
        free(dests);
        return rc;
    }
    for (int dn = 0; dn < ndom; dn++) {
        descs[dn] = h->mr_desc(e, mr, dn);
        for (uint32_t t = 0; t < ntargets; t++)
            dests[(size_t)t * ndom + dn] = h->peer_addr(e, peer_ids[t], dn);
    }
    uint64_t t0 = h->now_ns(), spins = 0, posts = 0;
    uint8_t *base = laddr;
    for (uint64_t p = 0; p < passes && !rc; p++) {
        for (uint64_t i = 0; i < nitems && !rc; i++) {
            int dn = (int)(i % (uint64_t)ndom);
            uint32_t t = item_peer ? item_peer[i] : 0;
            fi_addr_t dest = dests[(size_t)t * ndom + dn];
            int64_t v = item_imm ? (int64_t)item_imm[i] : imm;
            for (;;) {
                rc = afr_post(h, &c, dn, dest, base + src_off[i], lens[i], descs[dn],
                              rbase[t * ndom + dn] + dst_off[i], rkey[t * ndom + dn], v);
                if (rc != -FI_EAGAIN) break;
                /* Back-pressure: reap completions, never give up the loop. */
                rc = afr_poll(h, e, &c);
                if (rc) break;
                if (afr_expired(h, t0, timeout_ns, &spins)) {
                    rc = -FI_ETIMEDOUT;
                    break;
                }
            }
            posts++;
        }
    }
    while (!rc && c.outstanding) {
        rc = afr_poll(h, e, &c);
        if (!rc && afr_expired(h, t0, timeout_ns, &spins)) rc = -FI_ETIMEDOUT;
    }
    if (!rc && ack_imm >= 0) {
        uint32_t a = (uint32_t)ack_imm;
        rc = afr_wait_locked(h, e, &c, &a, &ack_count, 1, t0, timeout_ns);
    }
    *elapsed_ns = h->now_ns() - t0;
    /* On failure, wait (bounded) for what is still out so the contexts can go. */
    afr_settle(h, e, &c);
    h->count_posts(e, posts);
    h->unlock(e);
    free(dests);
    if (!c.outstanding) afr_ctxs_fini(&c); /* else leak: the provider still holds them */
    return rc;
}

int afr_wait(uintptr_t engine, uintptr_t hook, const uint32_t *imms, const uint64_t *counts,
             uint32_t n, uint64_t timeout_ns, uint64_t *elapsed_ns) {
    const af_hook *h = afr_hook(engine, hook);
    if (!h) return -FI_EINVAL;
    af_engine *e = h->engine;
    h->lock(e);
    uint64_t t0 = h->now_ns();
    int rc = afr_wait_locked(h, e, NULL, imms, counts, n, t0, timeout_ns);
    *elapsed_ns = h->now_ns() - t0;
    h->unlock(e);
    return rc;
}

int afr_send_imm(uintptr_t engine, uintptr_t hook, uint32_t peer, uint64_t rbase, uint64_t rkey,
                 uint32_t imm, uint64_t timeout_ns) {
    static const uint8_t nothing[8]; /* a zero-byte write's source */
    const af_hook *h = afr_hook(engine, hook);
    if (!h) return -FI_EINVAL;
    af_engine *e = h->engine;
    h->lock(e);
    if (h->check_peer(e, peer, 1)) {
        h->unlock(e);
        return -FI_EINVAL;
    }
    fi_addr_t dest = h->peer_addr(e, peer, 0);
    uint64_t t0 = h->now_ns(), spins = 0;
    int rc;
    for (;;) {
        rc = (int)fi_inject_writedata(h->dom[0].ep, nothing, 0, imm, dest, rbase, rkey);
        if (rc != -FI_EAGAIN) break;
        if ((rc = afr_poll(h, e, NULL))) break;
        if (afr_expired(h, t0, timeout_ns, &spins)) {
            rc = -FI_ETIMEDOUT;
            break;
        }
    }
    h->unlock(e);
    return rc;
}

int afr_pingpong(uintptr_t engine, uintptr_t hook, int initiator, uint32_t peer, void *laddr,
                 int mr, uint64_t len, uint64_t rbase, uint64_t rkey, uint32_t imm_out,
                 uint32_t imm_in, uint64_t iters, uint64_t *rtt_ns, uint64_t timeout_ns) {
    const af_hook *h = afr_hook(engine, hook);
    if (!h) return -FI_EINVAL;
    af_engine *e = h->engine;
    afr_ctxs c;
    h->lock(e);
    int rc = h->check_peer(e, peer, 1) || mr < 0 || h->check_mr(e, mr) ? -FI_EINVAL : 0;
    if (!rc && afr_ctxs_init(&c, 16)) rc = -FI_ENOMEM;
    if (rc) {
        h->unlock(e);
        return rc;
    }
    fi_addr_t dest = h->peer_addr(e, peer, 0);
    void *desc = h->mr_desc(e, mr, 0);
    uint64_t one = 1, t0 = h->now_ns(), spins = 0;
    for (uint64_t i = 0; i < iters && !rc; i++) {
        uint64_t ts = h->now_ns();
        if (!initiator) rc = afr_wait_locked(h, e, &c, &imm_in, &one, 1, t0, timeout_ns);
        while (!rc) {
            rc = afr_post(h, &c, 0, dest, laddr, len, desc, rbase, rkey, imm_out);
            if (rc != -FI_EAGAIN) break;
            rc = afr_poll(h, e, &c);
            if (!rc && afr_expired(h, t0, timeout_ns, &spins)) rc = -FI_ETIMEDOUT;
        }
        if (!rc && initiator) {
            rc = afr_wait_locked(h, e, &c, &imm_in, &one, 1, t0, timeout_ns);
            rtt_ns[i] = h->now_ns() - ts;
        }
    }
    afr_settle(h, e, &c);
    h->unlock(e);
    if (!c.outstanding) afr_ctxs_fini(&c);
    return rc;
}
