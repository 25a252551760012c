/* triggers.c's declarations for cffi's cdef (no preprocessor): triggered batches
 * (posted by a native watcher when a host word reaches a value) and counter
 * release words (stored by the counter table when n arrivals came). */

/* Arm a batch (afcore.h's af_bent/af_btgt, as afe_post_batch takes them) to be
 * posted when the 32-bit word at `word` reaches `value` (cyclic >=, like
 * cuStreamWaitValue32's GEQ: (int32_t)(*word - value) >= 0). `reset` >= 0: the
 * watcher stores it into the word (release) just before it posts. `repeat`:
 * stay armed after a fire (the next fire waits until the previous one ended).
 * Each fire ends in one AF_EV_OP for `token`, as a batch does. The arrays and the
 * word are the caller's and must stay alive until it is disarmed and no fire is
 * in flight. spin_ns / nap_ns: the watcher polls the armed words without pause
 * for spin_ns after an arm or a fire, then every nap_ns. Returns 0 or a negative
 * errno (a bad entry, a peer that is gone, a token already armed). */
int afe_trig_arm(af_engine *e, uint64_t token, uint32_t *word, uint32_t value, int64_t reset,
                 int repeat, const af_btgt *tgts, uint32_t ntgt, const af_bent *ents, uint64_t n,
                 int32_t *status, uint64_t spin_ns, uint64_t nap_ns);
/* Disarm `token`: 0 when nothing of it is in flight (no event follows), 1 when
 * a fire is in flight (its AF_EV_OP follows), -FI_ENOENT when it is not armed
 * (a one-shot trigger that fired already: its event came or follows). */
int afe_trig_disarm(af_engine *e, uint64_t token);
/* Fires so far of an armed trigger, or -FI_ENOENT. */
int64_t afe_trig_fires(af_engine *e, uint64_t token);

/* A release word: once `n` arrivals of `imm` are here, take them and store
 * `value` into the 32-bit word at `word` (a release store); `repeat`: again for
 * every further n. Arrivals already here count at once. *id_out names it.
 * Returns 0 or a negative errno (-FI_EBUSY: imm has a release word already). */
int afe_rel_arm(af_engine *e, uint32_t imm, uint64_t n, uint32_t *word, uint32_t value, int repeat,
                int64_t *id_out);
/* Stores made so far by release word `id`, or -FI_ENOENT when it is not armed
 * (a one-shot word is forgotten as it stores: -FI_ENOENT then means it stored). */
int64_t afe_rel_fired(af_engine *e, int64_t id);
/* Disarm release word `id`: the stores made so far, or -FI_ENOENT. */
int64_t afe_rel_disarm(af_engine *e, int64_t id);
