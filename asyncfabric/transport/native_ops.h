/* The native hot path of the transport contract: C function pointers a transport
 * may offer so the engine's fast path (asyncfabric/engine/_fastpath.c) posts a
 * write, polls for a counter and checks for events without a Python call.
 *
 * A transport offers it through Transport.native_ops() (transport/contract.py),
 * which names this table's address, the context every call takes, and a gate:
 * an int that stays nonzero while the table may be used. A wrapper that takes
 * over the hot paths later (the staged GPU path, on first GPU use) closes the
 * gate, and the engine goes through the Python methods from then on.
 *
 * Every call is made by the thread that runs the engine's event loop, the one
 * that makes the transport's Python calls; the semantics are those of the
 * Python methods named beside each pointer.
 */
#ifndef ASYNCFABRIC_NATIVE_OPS_H
#define ASYNCFABRIC_NATIVE_OPS_H

#include <stdint.h>

#define AF_NATIVE_ABI 2u

typedef struct af_native_ops {
    uint32_t abi; /* AF_NATIVE_ABI */
    /* Transport.post_write: `remote` is Remote.native (the transport's own
     * description of the target region), `laddr` the source address (0 with
     * handle -1 for an immediate alone), `handle` Registration.handle.
     * Returns 1 when the write finished inside the call, 0 when an OpDone
     * follows, or a negative status (nothing was posted). */
    int (*post_write)(void *ctx, uint64_t token, const void *remote, uint64_t roff,
                      uint64_t laddr, int64_t handle, uint64_t nbytes, int64_t imm);
    /* Transport.counter_take_spin: the bits TAKEN, EVENTS_READY, NOT_POLLED. */
    int (*take_spin)(void *ctx, uint32_t imm, uint64_t want, uint64_t ns);
    /* Transport.pending_events. */
    uint32_t (*pending)(void *ctx);
    /* Transport.drain, its most common answer alone: the tokens of the
     * leading events that are OpDone(token) with status 0 and held False,
     * up to `max`, taken from the queue; the first event of any other kind
     * stays queued, with all behind it, for drain(). May be NULL. */
    uint32_t (*take_done)(void *ctx, uint64_t *tokens, uint32_t max);
} af_native_ops;

#endif
