#include "afint.h"

/* The contract's native table (transport/native_ops.h) over this core: the
 * engine's fast path posts writes and takes counters through it without a
 * Python call. A target's native form is an af_btgt (afcore.h), the same the
 * batch path posts with; LibfabricRemote keeps one per target. */
#include "native_ops.h"

static int nat_post_write(void *ctx, uint64_t token, const void *remote, uint64_t roff,
                          uint64_t laddr, int64_t handle, uint64_t nbytes, int64_t imm) {
    const af_btgt *t = remote;
    return afe_post_write(ctx, token, t->peer, (int)t->ndom, (void *)(uintptr_t)laddr,
                          (int)handle, nbytes, t->chunk, t->base, t->key, roff, imm);
}

static int nat_take_spin(void *ctx, uint32_t imm, uint64_t want, uint64_t ns) {
    return afe_counter_take_spin(ctx, imm, want, ns);
}

static uint32_t nat_pending(void *ctx) { return (uint32_t)afe_nevents(ctx); }

static uint32_t nat_take_done(void *ctx, uint64_t *tokens, uint32_t max) {
    return (uint32_t)afe_take_done(ctx, tokens, (int)max);
}

static const af_native_ops NATIVE = {AF_NATIVE_ABI, nat_post_write, nat_take_spin, nat_pending,
                                     nat_take_done};

const void *afe_native_ops(void) { return &NATIVE; }
