/* Raw baseline for benchmarks (asyncfabric.bench._raw; _rawloop.c): the same
 * work as asyncfabric's Python path, done in tight C loops on an engine's own
 * domains, endpoints and registrations (post, poll, count; no Python per
 * operation). This header is cffi's cdef: plain declarations only.
 *
 * Every function takes the engine through its native hook (afhook.h):
 * `engine` and `hook` are asyncfabric.backends.libfabric.hook.native_hook()'s
 * integers. Every call holds the engine lock for its whole run, so the
 * engine's progress thread stands aside and the loop is the only poller:
 * exactly what a C benchmark such as fi_rma_bw does. Completions that are not
 * the loop's own (immediates, control messages, earlier transfers) are handed
 * to the hook, which handles them as the progress thread would; drain the
 * events that made afterwards (Engine.poll()). Every call is bounded by
 * timeout_ns and returns 0 or a negative libfabric errno (-FI_ETIMEDOUT on
 * timeout, -FI_EINVAL for bad arguments or a hook of another layout). */

/* Post `passes` passes over `nitems` writes: item i writes lens[i] bytes from
 * laddr + src_off[i] to dst_off[i] in the region of target item_peer[i]
 * (an index into peer_ids; NULL: target 0) over domain i mod ndom, carrying
 * item_imm[i] (NULL: imm; imm < 0: no immediate). rbase/rkey hold ndom entries
 * per target. At most `window` completion-generating writes are in flight.
 * Then, when ack_imm >= 0, wait until ack_count immediates ack_imm arrived and
 * take them. elapsed_ns: first post to the end. */
int afr_stream(uintptr_t engine, uintptr_t hook, const uint32_t *peer_ids, uint32_t ntargets,
               int ndom, void *laddr, int mr, const uint64_t *src_off, const uint64_t *dst_off,
               const uint64_t *lens, const uint32_t *item_peer, const uint32_t *item_imm,
               uint64_t nitems, int64_t imm, const uint64_t *rbase, const uint64_t *rkey,
               uint64_t passes, uint32_t window, int64_t ack_imm, uint64_t ack_count,
               uint64_t timeout_ns, uint64_t *elapsed_ns);

/* Poll until counts[i] immediates of imms[i] arrived for every i; take them. */
int afr_wait(uintptr_t engine, uintptr_t hook, const uint32_t *imms, const uint64_t *counts,
             uint32_t n, uint64_t timeout_ns, uint64_t *elapsed_ns);

/* A zero-byte write carrying imm to (rbase, rkey) of peer, over domain 0. */
int afr_send_imm(uintptr_t engine, uintptr_t hook, uint32_t peer, uint64_t rbase, uint64_t rkey,
                 uint32_t imm, uint64_t timeout_ns);

/* Ping-pong over domain 0. The initiator writes len bytes with imm_out, waits
 * for one imm_in, and records the round trip in rtt_ns[i]; the responder waits
 * for imm_in and writes back with imm_out. */
int afr_pingpong(uintptr_t engine, uintptr_t hook, int initiator, uint32_t peer, void *laddr,
                 int mr, uint64_t len, uint64_t rbase, uint64_t rkey, uint32_t imm_out,
                 uint32_t imm_in, uint64_t iters, uint64_t *rtt_ns, uint64_t timeout_ns);
