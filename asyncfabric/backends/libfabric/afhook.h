/* afhook.h: the native hook, how C code outside the runtime core drives an
 * engine's own endpoints.
 *
 * What it is for. Some C code needs to post and poll on the very endpoints,
 * completion queues and registrations an engine uses, without linking against
 * the core or knowing its internals. The benchmarks' raw baseline
 * (asyncfabric.bench._raw, built from asyncfabric/bench/_rawloop.c) is one:
 * it runs what fi_rma_bw would run, in tight C loops, on the engine Python
 * also drives, so that "what C gets from the same provider and endpoints"
 * and "what `await engine.write(...)` gets" are measured side by side. Such
 * code includes this header and libfabric's headers only.
 *
 * How to get one. afe_hook(e, out) fills an af_hook for engine e (Python:
 * asyncfabric.backends.libfabric.hook.native_hook(transport), which hands the
 * engine pointer and the hook's address over as integers). Check version and
 * size before use: a hook of another layout must be refused.
 *
 * What it guarantees.
 *  - dom[i].ep and dom[i].cq are the engine's own, for i < ndom: an enabled
 *    FI_EP_RDM endpoint (FI_MSG | FI_RMA, FI_CONTEXT2 mode: every post needs
 *    a struct fi_context2 of the caller's as its context) and its only CQ
 *    (FI_CQ_FORMAT_DATA, bound for transmit and receive). They, the peer
 *    addresses and the memory descriptors stay valid until the engine closes.
 *  - The CQ is shared with the engine's own traffic. Every completion the
 *    caller reads that is not for one of its own contexts must go to
 *    handle_cq_entry (or, for an error entry, handle_cq_error): the engine
 *    then does exactly what its progress thread would have done with it
 *    (counts an immediate, serves an armed counter, retires a transfer of its
 *    own, holds a control message, reposts a receive buffer). Dropping one
 *    loses an immediate or leaves a transfer hanging.
 *  - Events that handling makes (a counter satisfied, a transfer done, a
 *    message) are queued, and while the lock is held through lock() the
 *    notify fd is not rung for them: the holder is taken to be the thread
 *    that drains events (Python's). After unlock, drain them (Engine.poll()).
 *
 * The locking rule. The caller takes the engine lock with lock(e) before it
 * touches anything here and holds it for its whole loop, then unlock(e). The
 * engine's progress thread never blocks on that lock: it sees it taken and
 * stands aside, so the caller's loop is the only poller of the CQs, the way a
 * C benchmark is. Every function pointer below except lock, unlock and now_ns
 * must be called with the lock held. Take it only from the thread that calls
 * into the engine from Python, and keep every loop bounded (a timeout): while
 * it is held, nothing else can post to or progress this engine.
 */
#ifndef AF_HOOK_H
#define AF_HOOK_H

#include <stdint.h>

#include <rdma/fabric.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>

#define AF_HOOK_VERSION 1u
#define AF_HOOK_MAX_DOMS 16

typedef struct af_engine af_engine;

typedef struct af_hook_dom {
    struct fid_ep *ep;
    struct fid_cq *cq;
    uint64_t inject;  /* writes up to this length the engine injects here (0: never, as on tcp) */
    uint64_t max_msg; /* the provider's largest message */
} af_hook_dom;

typedef struct af_hook {
    uint32_t version; /* AF_HOOK_VERSION */
    uint32_t size;    /* sizeof(af_hook) of the core that filled it */
    af_engine *engine;
    int ndom;
    af_hook_dom dom[AF_HOOK_MAX_DOMS];

    /* Take and drop the engine lock (see the locking rule above). */
    void (*lock)(af_engine *e);
    void (*unlock)(af_engine *e);

    /* 0 when peer is known, alive, and has an address in each of the first
     * ndom domains; else a negative errno (-FI_EINVAL, -ESRCH: its process
     * exited). */
    int (*check_peer)(af_engine *e, uint32_t peer, int ndom);
    /* 0 when mr is a live registration (or < 0: none); else -FI_EINVAL. */
    int (*check_mr)(af_engine *e, int mr);
    /* A checked peer's address in domain dom. */
    fi_addr_t (*peer_addr)(af_engine *e, uint32_t peer, int dom);
    /* A checked registration's descriptor in domain dom (NULL where the
     * provider needs none). */
    void *(*mr_desc)(af_engine *e, int mr, int dom);

    /* A completion read from dom[dom].cq that is not the caller's. */
    void (*handle_cq_entry)(af_engine *e, int dom, const struct fi_cq_data_entry *c);
    /* An error entry read from dom[dom].cq (fi_cq_readerr) that is not for
     * one of the caller's contexts. Returns 0 when it was one of the engine's
     * receive buffers (reposted: nothing failed), else the entry's status as
     * a negative errno, after failing the engine transfer it belonged to or
     * reporting a fatal CQ error, as the progress thread would. */
    int (*handle_cq_error)(af_engine *e, int dom, const struct fi_cq_err_entry *err);
    /* Repost receive buffers whose repost failed earlier (EAGAIN). Call it
     * once per pass over dom[dom].cq, as the progress thread does. */
    void (*repost_rx)(af_engine *e, int dom);

    /* Take n arrivals of immediate imm if that many have arrived and nobody
     * has a counter armed on imm (an armed waiter is served first). Returns 1
     * when taken, 0 otherwise (nothing taken). */
    int (*ctr_take)(af_engine *e, uint32_t imm, uint64_t n);
    /* Add n to the engine's posts statistic (afe_stats). */
    void (*count_posts)(af_engine *e, uint64_t n);
    /* The engine's clock: CLOCK_MONOTONIC in nanoseconds. */
    uint64_t (*now_ns)(void);
} af_hook;

#endif
