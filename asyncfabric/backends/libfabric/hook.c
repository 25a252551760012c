/* The native hook (afhook.h): an engine's endpoints and the core's handling
 * of completions, offered to C code outside the core. The hook's functions
 * are thin: each is what the core's own paths do, under the engine lock. */
#include "afint.h"

/* The hook's caller becomes the only one to touch the endpoints: with several
 * workers it holds every domain's lock too (engine, then domains: the order of
 * every path that holds both). */
static void hook_lock(af_engine *e) {
    atomic_store(&e->hook_held, 1); /* the progress thread sleeps meanwhile (progress.c) */
    enter_py(e);
    for (int d = 0; d < e->ndom; d++) dom_lock(e, &e->dom[d]);
    e->hook_thr = pthread_self(); /* the core's paths it calls must not lock them again */
    e->hooked = 1;
}

static void hook_unlock(af_engine *e) {
    e->hooked = 0;
    for (int d = e->ndom - 1; d >= 0; d--) dom_unlock(e, &e->dom[d]);
    leave_py(e);
    if (atomic_exchange(&e->hook_held, 0)) kick(e);
}

static int hook_check_peer(af_engine *e, uint32_t peer, int ndom) { return check_peer(e, peer, ndom); }

static int hook_check_mr(af_engine *e, int mr) { return check_mr(e, mr); }

static fi_addr_t hook_peer_addr(af_engine *e, uint32_t peer, int dom) {
    if (peer >= e->npeers || dom < 0 || dom >= e->ndom) return FI_ADDR_NOTAVAIL;
    return e->peers[peer].addr[dom];
}

static void *hook_mr_desc(af_engine *e, int mr, int dom) {
    if (mr < 0 || mr >= e->nmrs || !e->mrs[mr].live || dom < 0 || dom >= e->ndom) return NULL;
    return e->mrs[mr].desc[dom];
}

static int hook_ctr_take(af_engine *e, uint32_t imm, uint64_t n) { return ctr_take(e, imm, n); }

static void hook_count_posts(af_engine *e, uint64_t n) { e->st.posts += n; }

static uint64_t hook_now_ns(void) { return now_ns(); }

size_t afe_hook_size(void) { return sizeof(af_hook); }

int afe_hook(af_engine *e, af_hook *out) {
    if (!e || !out || !e->opened) return -FI_EINVAL;
    memset(out, 0, sizeof *out);
    out->version = AF_HOOK_VERSION;
    out->size = (uint32_t)sizeof *out;
    out->engine = e;
    out->ndom = e->ndom;
    for (int i = 0; i < e->ndom; i++) {
        out->dom[i].ep = e->dom[i].ep;
        out->dom[i].cq = e->dom[i].cq;
        out->dom[i].inject = e->dom[i].inject;
        out->dom[i].max_msg = e->dom[i].max_msg;
    }
    out->lock = hook_lock;
    out->unlock = hook_unlock;
    out->check_peer = hook_check_peer;
    out->check_mr = hook_check_mr;
    out->peer_addr = hook_peer_addr;
    out->mr_desc = hook_mr_desc;
    out->handle_cq_entry = cq_hook_entry;
    out->handle_cq_error = cq_hook_error;
    out->repost_rx = cq_hook_repost_rx;
    out->ctr_take = hook_ctr_take;
    out->count_posts = hook_count_posts;
    out->now_ns = hook_now_ns;
    return 0;
}
