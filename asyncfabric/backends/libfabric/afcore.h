/* asyncfabric native core: the declarations Python sees through cffi.
 *
 * This header is parsed by cffi's cdef (no preprocessor), so it holds only
 * plain declarations. The core's units include it too (through afint.h), so
 * the two cannot drift.
 */

typedef struct af_engine af_engine;

/* What the native side reports to Python. One event per finished transfer,
 * per satisfied counter arm, per received message: never per write or page. */
typedef struct af_event {
    uint32_t kind;   /* AF_EV_* */
    uint32_t a;      /* counter: imm; recv: rx slot */
    int32_t status;  /* 0 or a negative libfabric errno */
    uint32_t len;    /* recv: message length; op: 1 = failed early, provider still holds
                        pieces (a final op event with len 0 follows) */
    uint64_t token;  /* op done: the caller's token */
} af_event;

typedef struct af_dominfo {
    char provider[64];
    char fabric[128];
    char domain[128];
    uint64_t max_msg_size;
    uint64_t inject_size;
    uint64_t cq_data_size;
    uint64_t mr_mode;
    uint64_t mr_key_size;
    uint32_t tx_credits;
    uint32_t rx_slots;
    int32_t wait_fd;      /* CQ wait fd, or -1 when the CQ has none */
    int32_t rx_cq_data;   /* FI_RX_CQ_DATA: remote CQ data consumes a posted receive */
} af_dominfo;

typedef struct af_policy {
    uint64_t spin_ns;        /* progress thread: busy-poll this long after the last completion */
    uint64_t idle_block_ns;  /* then block at most this long per wait when nothing is in flight */
    uint64_t busy_block_ns;  /* ...and at most this long while transfers are in flight */
    uint64_t post_timeout_ns; /* a transfer that cannot be posted this long fails (0: never) */
    uint64_t py_hold_ns;     /* after a post from Python, Python polls and the thread stands aside */
    uint32_t workers;        /* progress threads: 0 or 1, one for every domain; more: workers.c */
    uint32_t ncpus;          /* how many of cpus are given: progress threads are pinned to them */
    int32_t cpus[16];        /* thread i runs on cpus[i % ncpus] */
} af_policy;

typedef struct af_stats {
    uint64_t completions;
    uint64_t imms;
    uint64_t posts;
    uint64_t eagain;
    uint64_t blocks;
    uint64_t wakeups;
    uint64_t spins;
    uint64_t cq_errors;
    uint64_t orphan_errors;
    uint64_t live_ops;
    uint64_t live_mrs;
    uint64_t worker_posts; /* pieces posted by the workers (wpost.c), not by the caller */
    uint64_t lock_waits;   /* times a thread found the engine lock held (eng_lock) */
    uint64_t lock_wait_ns; /* and the time it waited for it */
    uint64_t direct_copies; /* sender_copy pieces this process copied itself (cma.c) */
    uint64_t qlock_defers;  /* posts from Python left queued: the target's shm queue was busy */
} af_stats;

int afe_open(const char *prov, const char *node, int ndom, uint32_t ctrl_max,
             uint32_t rx_slots, int want_hmem, af_engine **out, char *err, size_t errlen);
int afe_probe(const char *prov, const char *node, char *err, size_t errlen);
int afe_dominfo(af_engine *e, int d, af_dominfo *out);
int afe_getname(af_engine *e, int d, void *buf, size_t *len);
int afe_start(af_engine *e, const af_policy *policy);
int afe_notify_fd(af_engine *e);
void afe_close(af_engine *e);
void afe_stats(af_engine *e, af_stats *out);

int afe_add_peer(af_engine *e, int ndom, const void *const *addrs, size_t addr_len0,
                 int64_t *out_peer);
/* afpeer.c: watch a same-host peer's process; transfers to it fail once it exits */
int afe_peer_watch(af_engine *e, uint32_t peer, int32_t pid);
int afe_peer_dead(af_engine *e, uint32_t peer);
int afe_peer_closed(af_engine *e, uint32_t peer);

int afe_mr_reg(af_engine *e, void *addr, uint64_t len, uint64_t access, int iface,
               uint64_t device, uint64_t *keys, uint64_t *bases);
int afe_mr_close(af_engine *e, int mr);

int afe_post_write(af_engine *e, uint64_t token, uint32_t peer, int ndom, void *laddr,
                   int mr, uint64_t len, uint64_t chunk, const uint64_t *rbase,
                   const uint64_t *rkey, uint64_t roff, int64_t imm);
int afe_post_paged(af_engine *e, uint64_t token, uint32_t peer, int ndom, void *laddr,
                   int mr, const uint64_t *src_off, const uint64_t *dst_off, uint64_t npages,
                   uint64_t page, const uint64_t *rbase, const uint64_t *rkey, int64_t imm);
int afe_post_send(af_engine *e, uint64_t token, uint32_t peer, const void *buf, uint32_t len);

/* A batch (batch.c): many writes in one call. Entries come grouped by peer
 * (every entry to one peer is contiguous: the caller sorts them); each is
 * chunked at its target's chunk and striped over its domains, and carries its
 * immediate (or none, imm < 0). `idx` is the entry's place in the caller's
 * order: its status lands in status[idx] (0, or the negative errno it failed
 * with). The entries, targets and status array are the caller's and must stay
 * alive until the batch's one AF_EV_OP for `token`; nothing is copied. */
typedef struct af_bent {
    uint64_t src;   /* source address (0 with len 0: an immediate alone) */
    uint64_t roff;  /* byte offset in the target region */
    uint64_t len;
    int64_t imm;
    int32_t mr;     /* source registration, or -1 */
    uint32_t tgt;   /* index into the targets */
    uint32_t idx;
    uint32_t pad;
} af_bent;

typedef struct af_btgt {
    uint32_t peer;
    uint32_t ndom;
    uint64_t chunk;
    uint64_t base[16];
    uint64_t key[16];
} af_btgt;

int afe_post_batch(af_engine *e, uint64_t token, const af_btgt *tgts, uint32_t ntgt,
                   const af_bent *ents, uint64_t n, int32_t *status);
/* One-sided read: len bytes of the peer's region (rbase + roff, striped like a
 * write) into laddr, registered as mr (required). */
int afe_post_read(af_engine *e, uint64_t token, uint32_t peer, int ndom, void *laddr, int mr,
                  uint64_t len, uint64_t chunk, const uint64_t *rbase, const uint64_t *rkey,
                  uint64_t roff);

int afe_counter_arm(af_engine *e, uint32_t imm, uint64_t want);
void afe_counter_disarm(af_engine *e, uint32_t imm);
uint64_t afe_counter_avail(af_engine *e, uint32_t imm);
void afe_counter_give(af_engine *e, uint32_t imm, uint64_t n);
uint64_t afe_counter_live(af_engine *e);

int afe_drain(af_engine *e, af_event *out, int max);
int afe_nevents(af_engine *e);
int afe_take_done(af_engine *e, uint64_t *tokens, int max);
int afe_spin(af_engine *e, uint64_t ns);
int afe_counter_take_spin(af_engine *e, uint32_t imm, uint64_t want, uint64_t ns);
int afe_kick(af_engine *e);
void afe_release(af_engine *e);
int afe_recv_take(af_engine *e, uint32_t slot, void *dst, uint32_t len);

const char *afe_strerror(int err);

/* native.c: the transport contract's native table (transport/native_ops.h),
 * an af_native_ops whose calls take this engine as their context. */
const void *afe_native_ops(void);

/* The native hook (afhook.h, hook.c): C code outside the core (the
 * benchmarks' raw loops) drives this engine's endpoints through a filled
 * af_hook. Opaque here: allocate afe_hook_size() bytes and pass them in.
 * Returns 0, or -FI_EINVAL for an engine that is not open. */
typedef struct af_hook af_hook;
size_t afe_hook_size(void);
int afe_hook(af_engine *e, af_hook *out);
