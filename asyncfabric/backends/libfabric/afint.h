/* asyncfabric native core over libfabric: the internal header every unit of
 * the core includes first, and the only one that knows the engine's layout.
 *
 * Owns, per engine: one or more domains (fabric, domain, CQ, AV, RDM endpoint),
 * the memory registrations, the in-flight transfers, the immediate counters and
 * a ring of events for Python. Every libfabric call and every table here is
 * guarded by one engine mutex (the domains are opened FI_THREAD_DOMAIN), so the
 * provider sees one caller at a time: either the progress thread or the Python
 * thread inside an afe_* call.
 *
 * The hot loops live in the core: chunking a write, posting the pages of a
 * paged write, reading completions and counting immediates. Python hears about
 * a transfer once, when it is done, and about a counter once, when the count it
 * armed for has arrived.
 *
 * The units, one concept each (the list is _build.py's SOURCES):
 *   events.c    the event ring for Python, the notify and wake fds
 *   counters.c  the immediate counter table and the need published to writers
 *   ops.c       the op slab, posting (pump), afe_post_*
 *   batch.c     batches: one call, many writes, one event
 *   cq.c        completions: entries, errors, receive buffers
 *   progress.c  one progress pass, the progress thread, Python's spins
 *   workers.c   several progress threads, each owning some domains
 *   wpost.c     the workers post large transfers, outside the engine lock
 *   setup.c     getinfo, opening and closing domains and engines, peers, MRs
 *   quirks.c    what differs per provider, in one table
 *   afpeer.c    peer failure detection
 *   doorbell.c  waking sleeping engines on this host
 *   shmname.c   shm region names, reclaiming dead processes' regions
 *   qlock.c     a shm queue lock looked at before libfabric takes it
 *   cma.c       the sender's own copy into a shm peer (sender_copy)
 *   hook.c      the native hook for C outside the core (afhook.h)
 *   cudanote.c  the CUDA host function that rings the notify fd
 *   triggers.c  triggered batches (a watcher thread) and counter release words
 *
 * What the hot paths share (counting an immediate on every completion, the
 * event push, the counter lookup, peer bookkeeping per transfer) is static
 * inline here, so splitting the core costs no calls per completion or post.
 * Functions shared across units are hidden (AF_INTERNAL): not exported from
 * the module, never interposed, and inlinable inside their own unit.
 */
#ifndef AF_INT_H
#define AF_INT_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

/* Our units build warning-free: in them every -Wall and -Wextra warning is an
 * error, whatever the compiler is told on its command line (_build.py passes
 * -Wall -Wextra to every file, cffi's generated wrapper included, but only our
 * units are held to it here). Placed after the system and libfabric headers. */
#pragma GCC diagnostic error "-Wall"
#pragma GCC diagnostic error "-Wextra"

#define AF_INTERNAL __attribute__((visibility("hidden")))

#include "afcore.h"
#include "afhook.h"
#include "doorbell.h"
#include "quirks.h"
#include "shmname.h"

#define AF_MAX_DOMS 16
#define AF_NONE UINT32_MAX
#define AF_AGAIN 1
#define AF_DONE 0

_Static_assert(AF_MAX_DOMS == AF_HOOK_MAX_DOMS, "the hook carries every domain");

enum { AF_EV_OP = 1, AF_EV_COUNTER = 2, AF_EV_RECV = 3, AF_EV_FATAL = 4 };
/* OP_BATCH: one peer's share of a batch (batch.c), a child of an OP_GROUP,
 * which posts nothing and reports the whole batch once. */
enum { OP_WRITE = 1, OP_PAGED = 2, OP_SEND = 3, OP_READ = 4, OP_BATCH = 5, OP_GROUP = 6 };
enum { AF_ACCESS_REMOTE_WRITE = 1, AF_ACCESS_REMOTE_READ = 2 };

/* Tags tell a libfabric op_context apart: our contexts begin with the
 * fi_context2 the provider may use, followed by the tag. */
#define TAG_TX 0x7478u
#define TAG_RX 0x7278u

typedef struct af_wr {
    struct fi_context2 ctx;
    uint32_t tag;
    uint32_t op;
    int32_t sslot;
    uint32_t next_free;
    uint32_t ent; /* OP_BATCH: the entry this piece belongs to (its idx) */
    uint32_t live; /* posted, its completion not yet read */
    /* Owed immediate (sender_copy, cq.c): the piece went as a plain write and
     * its immediate goes, as a zero-byte write, once that write completed.
     * owe: 0 none, 1 owed, 2 queued on its domain's owed list (next_free links it). */
    uint32_t owe;
    uint32_t imm;
    fi_addr_t dest;
    uint64_t raddr, key, t_owe;
} af_wr;

typedef struct af_rx {
    struct fi_context2 ctx;
    uint32_t tag;
    uint32_t slot;
    uint8_t *buf;
    int state; /* RX_* */
} af_rx;

enum { RX_IDLE = 0, RX_POSTED = 1, RX_HELD = 2 };

typedef struct af_dom {
    struct fi_info *info;
    struct fid_fabric *fabric;
    struct fid_domain *domain;
    struct fid_av *av;
    struct fid_cq *cq;
    struct fid_ep *ep;
    int wait_fd;
    uint64_t max_msg, inject, mr_mode, key_size;
    int rx_cq_data;
    /* transmit contexts: one per completion-generating post, a fixed pool */
    af_wr *wrs;
    uint32_t nwr, wr_free, credits;
    /* receive pool: control messages, and remote CQ data on FI_RX_CQ_DATA providers */
    af_rx *rx;
    uint32_t nrx;
    int rx_retry; /* a repost failed (EAGAIN): progress tries again */
    uint8_t *rxmem;
    struct fid_mr *rx_mr;
    void *rx_desc;
    /* send slots for control messages too large to inject */
    uint8_t *txmem;
    struct fid_mr *tx_mr;
    void *tx_desc;
    int32_t *tx_free;
    int32_t tx_top, ntx;
    /* quirks.h sender_copy: 0, or the smallest piece that goes as a plain
     * write with its immediate owed (cq.c); owed immediates the target's
     * queue had no room for, oldest first, linked through next_free */
    uint64_t sender_copy;
    int direct_copy; /* sender_copy: the copy is ours, not libfabric's (cma.c) */
    uint32_t owe_head, owe_tail;
    int checked_plain; /* quirks.h plain_unchecked: plain RMA goes through post_plain */
    /* With several workers (workers.c) every libfabric call on this domain is
     * made holding this lock; its owner holds it only across its CQ reads. */
    pthread_mutex_t lock;
    int owner;
    /* qlock.h: shm; the lock word of this endpoint's own region, which its
     * CQ reads take (NULL: unguarded, and its peers' regions are not mapped
     * either), and its mapping */
    const volatile int *own_qlock;
    void *own_qmap;
} af_dom;

/* A piece a worker took from a queued op (wpost.c): everything its post needs,
 * so the post runs without the engine lock. */
typedef struct af_piece {
    uint32_t opi, dn, peer, ent;
    int kind, inject;
    uint8_t *src;
    uint64_t len, dst, key;
    int64_t imm;
    void *desc;
    fi_addr_t dest;
    af_wr *wr;
    uint64_t t0;
    const volatile int *qlock; /* the target region's lock word and its owner's pidfd (qlock.h) */
    int pidfd;
    int32_t pid; /* the target's process, for a copy of our own (cma.c) */
    int direct;  /* copied by cma_put: no completion comes; its immediate is owed */
    int32_t ret; /* the post's result; 1: not tried yet */
} af_piece;
#define AF_WQ_PIECES 32            /* pieces a worker takes per pass */
#define AF_WQ_BYTES (512u << 10)   /* ... and bytes (at least one piece) */
typedef struct af_worker {
    struct af_engine *e;
    pthread_t thr;
    int id, cpu, started;
    int wake_fd;
    atomic_int napping; /* asleep in ppoll: a poster that queues work must ring wake_fd */
    /* the domains it owns, and which it tried last */
    int doms[AF_MAX_DOMS];
    int ndoms, rr;
    /* pieces taken and not yet posted (EAGAIN: tried again next pass); AF_WQ_PIECES
     * of them, allocated by workers_start, so an engine without workers stays small */
    af_piece *pc;
    int npc;
    int more;     /* its last take left pieces it could have taken */
    uint64_t gen; /* the engine's wq_gen at its last take */
} af_worker;

typedef struct af_peer {
    fi_addr_t addr[AF_MAX_DOMS];
    af_bell bell;
    /* failure detection (afpeer.c): a watched process, whether it is gone,
     * how many transfers to it are live and when it last completed one */
    int pidfd;
    int32_t pid;
    int dead; /* 0, or the errno its transfers fail with (ESRCH: its process exited) */
    uint32_t inflight;
    uint64_t t_progress;
    /* qlock.h: each domain's region lock word (NULL: unguarded) and its
     * mapping; the guard polls pidfd above, which stays open until close */
    const volatile int *qlock[AF_MAX_DOMS];
    void *qmap[AF_MAX_DOMS];
    int32_t qpid; /* the pid its region names (0: unknown), this process's own included */
} af_peer;

/* The process to copy into for a copy of our own (cma.c): 0 if unknown. */
static inline int32_t peer_cma_pid(const af_peer *p) { return p->qpid ? p->qpid : p->pid; }

typedef struct af_mr {
    struct fid_mr *mr[AF_MAX_DOMS];
    void *desc[AF_MAX_DOMS];
    int live;
    int next_free;
    int iface; /* FI_HMEM_*: device memory is never injected (inject reads it with the CPU) */
} af_mr;

typedef struct af_op {
    uint64_t token;
    uint32_t kind, peer, ndom, next;
    int32_t status, mr;
    int active, pending;
    int reported; /* failed early (afpeer.c); the final event follows when the provider lets go */
    uint64_t total, posted, outstanding;
    uint64_t t_queued;
    uint8_t *laddr;
    uint64_t len, chunk, page;
    uint64_t raddr[AF_MAX_DOMS], rkey[AF_MAX_DOMS];
    int64_t imm;
    uint64_t *offs; /* paged: npages source offsets, then npages destination offsets */
    void *msg;
    uint32_t msglen;
    /* OP_BATCH: entries [lo, hi) of the batch, all to this op's peer; the
     * cursor is entry bj, byte boff of it; stripe picks the next domain.
     * OP_GROUP: live children (not finished) and unrep (neither finished nor
     * reported early); the status array of the batch. Children name it. */
    uint32_t group;
    uint32_t live, unrep;
    const af_bent *ents;
    const af_btgt *tgts;
    uint64_t lo, hi, bj, boff, stripe;
    int32_t *bstatus;
    uint64_t rot; /* chunk c goes to domain (c + rot) % ndom */
    /* With several workers: the op's pieces are posted by the workers (wpost.c),
     * each piece over a domain of the worker that takes it, not by the caller. */
    int wq;
    /* Left queued by a post from Python because the target's shm queue lock
     * was held (ops.c, "Posts that would wait"); counted in qdeferred. */
    int qdefer;
} af_op;

typedef struct af_ctr {
    uint32_t imm;
    uint32_t used;
    uint64_t avail; /* arrived and not yet taken */
    uint64_t want;  /* armed threshold, 0 when nobody waits */
} af_ctr;

struct af_engine {
    pthread_mutex_t lock;
    int ndom;
    af_dom dom[AF_MAX_DOMS];
    uint32_t ctrl_max;

    af_peer *peers;
    uint32_t npeers, cap_peers;

    af_mr *mrs;
    int nmrs, cap_mrs, mr_free;

    af_op *ops;
    uint32_t cap_ops, op_free, pend_head, pend_tail;
    uint64_t live_ops;

    af_ctr *ctr;
    uint64_t ctr_cap, ctr_n;
    uint64_t armed; /* counters somebody waits on: keep the progress thread's naps short */
    uint64_t need_min; /* <= the fewest arrivals any armed counter still needs (UINT64_MAX: none) */
    int need_dirty;    /* a waiter left: need_min may have grown, rescan before publishing */
    uint64_t t_need_scan;

    af_event *ev;
    uint32_t ev_cap, ev_head, ev_count;

    int notify_fd, wake_fd;
    af_bell_page *bell_page; /* our doorbell: peers on this host wake us through it */
    int bell_fd;
    char bell_name[64];
    int py_ctx;       /* the Python thread holds the lock: it drains events itself */
    uint64_t work_gen; /* bumped on every post: the progress thread must not sleep through it */
    _Atomic uint64_t wq_gen; /* bumped when an op is queued for the workers (wpost.c) */
    atomic_int spinners, stop;
    atomic_int sleeping; /* progress thread: 1 blocked in block(), 2 standing aside for Python */
    /* The trigger watcher wants the lock / holds it (triggers.c, for one fire).
     * With watcher_yield (progress.c) the spinning pollers let it have it: each
     * of them unlocks and locks again within nanoseconds, so a watcher woken from
     * the mutex's wait would mostly find it taken again; and the progress thread
     * does not take the watcher's hold for Python's and stand aside. */
    atomic_int watcher_wants, watcher_held;
    /* While the Python thread keeps calling in (posting, spinning) it reaps
     * completions itself and the progress thread stays out of its way until
     * this time passes or Python says it is going idle (afe_release). On two
     * cores, one poller per process is what keeps up with the raw loop. */
    _Atomic uint64_t py_until;
    int started;
    int opened; /* every domain is open and enabled: only then may anything progress them */
    int all_local; /* every domain's provider is host_only (quirks.h): every writer rings our doorbell */
    pthread_t thr;
    af_policy pol;
    af_stats st;
    uint8_t scratch[64];
    int watch_fd;       /* epoll over watched peers' pidfds (afpeer.c), -1 until needed */
    uint64_t t_watch;   /* last failure-detection pass */
    /* workers.c: with nworkers > 1, worker i owns the domains d with d % nworkers == i
     * (dom[d].owner) in place of the one progress thread; rot turns each op's first
     * chunk to the next domain, so single-chunk writes spread over them too. */
    int nworkers;
    af_worker wk[AF_MAX_DOMS];
    uint64_t rot;
    uint32_t reap_skip; /* ops.c: injected writes since the last reap */
    uint32_t qdeferred;  /* ops.c: queued ops with qdefer set */
    uint32_t qbusy_peer; /* ops.c: the peer whose queue lock the last deferral found held */
    uint32_t qposted_peer; /* ops.c: posted to by this call from Python: the rest go on unlooked */
    int hooked;         /* hook.c: a hook caller holds every lock (hook_thr) */
    atomic_int hook_held; /* the same, for the progress thread to read without the lock */
    pthread_t hook_thr;
    /* triggers.c: armed triggers and release words (NULL until the first arm);
     * rel_armed: release words armed, read by count_imm under the lock. */
    struct af_trigs *trig;
    uint32_t rel_armed;
};

/* ------------------------------------------------------------------ cross-unit functions */

/* events.c */
AF_INTERNAL void kick(af_engine *e);       /* wake the progress thread */
AF_INTERNAL void ev_grow(af_engine *e);    /* double the event ring (it is full) */
AF_INTERNAL void ev_notify(af_engine *e);  /* ring the notify fd: events wait for Python */

/* counters.c */
AF_INTERNAL void ctr_grow(af_engine *e);
AF_INTERNAL void ctr_delete(af_engine *e, af_ctr *c);
AF_INTERNAL uint64_t need_now(af_engine *e, uint64_t t);

/* ops.c */
AF_INTERNAL void op_free(af_engine *e, uint32_t i);
AF_INTERNAL int pump_pending(af_engine *e);
AF_INTERNAL void op_stop(af_engine *e, af_op *op, int32_t status);
AF_INTERNAL uint32_t op_alloc(af_engine *e);
AF_INTERNAL void op_launch(af_engine *e, uint32_t i);

/* batch.c */
AF_INTERNAL void batch_child_done(af_engine *e, uint32_t i);
AF_INTERNAL void batch_child_reported(af_engine *e, uint32_t i);
AF_INTERNAL int batch_check(af_engine *e, const af_btgt *tgts, uint32_t ntgt, const af_bent *ents,
                            uint64_t n, uint32_t *runs_out);
AF_INTERNAL int batch_launch(af_engine *e, uint64_t token, const af_btgt *tgts, uint32_t ntgt,
                             const af_bent *ents, uint64_t n, int32_t *status, uint32_t *gout);

/* triggers.c */
AF_INTERNAL int rel_count(af_engine *e, af_ctr *c); /* 1: it took arrivals and c may be gone */
AF_INTERNAL uint64_t rel_need(af_engine *e);        /* the fewest arrivals a release word needs */
AF_INTERNAL void trig_stop(af_engine *e);           /* join the watcher, free the tables */

/* cq.c */
AF_INTERNAL int progress_dom(af_engine *e, af_dom *d);
AF_INTERNAL void cq_hook_entry(af_engine *e, int dom, const struct fi_cq_data_entry *c);
AF_INTERNAL int cq_hook_error(af_engine *e, int dom, const struct fi_cq_err_entry *err);
AF_INTERNAL void cq_hook_repost_rx(af_engine *e, int dom);

/* progress.c */
AF_INTERNAL int progress_locked(af_engine *e);
AF_INTERNAL void pin_thread(int cpu);

/* workers.c */
AF_INTERNAL int workers_start(af_engine *e);
AF_INTERNAL void workers_stop(af_engine *e);
AF_INTERNAL void workers_wake(af_engine *e);
/* wpost.c */
AF_INTERNAL int wq_wants(af_engine *e, const af_op *op);
AF_INTERNAL int wq_pass(af_engine *e, af_worker *w);
AF_INTERNAL int wq_waiting(af_engine *e, af_worker *w);
/* cq.c: a transmit context is done (its piece completed, failed, or went out as inject) */
AF_INTERNAL void complete_wr(af_engine *e, af_dom *d, af_wr *wr, int32_t status);

/* cq.c: one batch of entries already read, handled under the engine lock */
AF_INTERNAL void cq_handle(af_engine *e, af_dom *d, const struct fi_cq_data_entry *ents, ssize_t n);
/* cq.c: send the owed immediates that found the target's queue full (lock held) */
AF_INTERNAL int owed_retry(af_engine *e, af_dom *d);

/* cma.c: copy len bytes into process pid at dst. 0: copied; 1: not ours to
 * copy (libfabric's path instead); < 0: the errno the piece fails with. */
AF_INTERNAL int cma_put(af_dom *d, int32_t pid, const void *src, uint64_t len, uint64_t dst);
/* cq.c: queue wr's owed immediate; the domain's progress posts it (lock held). */
AF_INTERNAL void owe_push(af_dom *d, af_wr *wr);

/* afpeer.c */
AF_INTERNAL void peer_watch(af_engine *e);
AF_INTERNAL void peer_close_all(af_engine *e);

/* ------------------------------------------------------------------ inline helpers */

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

/* A domain's lock, with several workers only (one thread, or the engine lock, is
 * enough otherwise). Posts try it and queue the op when its worker is reading. */
/* Whether this thread must take domain locks: with several workers, unless it
 * is the native hook's caller, which holds them all already (hook.c), so the
 * core's paths it calls into must not take them again. */
static inline int dom_locking(af_engine *e) {
    return e->nworkers > 1 && !(e->hooked && pthread_equal(e->hook_thr, pthread_self()));
}

static inline void dom_lock(af_engine *e, af_dom *d) {
    if (dom_locking(e)) pthread_mutex_lock(&d->lock);
}

static inline int dom_trylock(af_engine *e, af_dom *d) {
    return dom_locking(e) ? pthread_mutex_trylock(&d->lock) == 0 : 1;
}

static inline void dom_unlock(af_engine *e, af_dom *d) {
    if (dom_locking(e)) pthread_mutex_unlock(&d->lock);
}

/* The engine lock, counting contention: how often, and how long, a thread
 * waited for it (stats lock_waits, lock_wait_ns; updated under the lock). */
static inline void eng_lock(af_engine *e) {
    if (pthread_mutex_trylock(&e->lock) == 0) return;
    uint64_t t0 = now_ns();
    pthread_mutex_lock(&e->lock);
    e->st.lock_waits++;
    e->st.lock_wait_ns += now_ns() - t0;
}

static inline void enter_py(af_engine *e) {
    eng_lock(e);
    e->py_ctx = 1;
    e->qposted_peer = AF_NONE;
}

/* A post from Python: mark the thread active, and reap completions on the way. */
static inline void py_active(af_engine *e) {
    if (e->pol.py_hold_ns) atomic_store_explicit(&e->py_until, now_ns() + e->pol.py_hold_ns, memory_order_relaxed);
}

/* progress.c: whether pollers make way for the trigger watcher (above). */
int watcher_yield(void);

static inline void leave_py(af_engine *e) {
    e->py_ctx = 0;
    pthread_mutex_unlock(&e->lock);
}

/* events: queue one for Python (lock held). */
static inline void push_event(af_engine *e, uint32_t kind, uint32_t a, int32_t status, uint32_t len,
                              uint64_t token) {
    if (e->ev_count == e->ev_cap) ev_grow(e);
    af_event *ev = &e->ev[(e->ev_head + e->ev_count) & (e->ev_cap - 1)];
    ev->kind = kind;
    ev->a = a;
    ev->status = status;
    ev->len = len;
    ev->token = token;
    e->ev_count++;
    /* Only the first event of a batch rings the loop, and never when the Python
     * thread itself is inside a call: it drains on the way out. */
    if (e->ev_count == 1 && !e->py_ctx) ev_notify(e);
}

/* counters: open addressing with linear probing, keyed by the 32-bit
 * immediate (counters.c). An entry lives while something arrived and was not
 * taken, or somebody waits. */
static inline uint64_t ctr_hash(uint32_t imm) { return (uint64_t)imm * 0x9E3779B97F4A7C15ull >> 17; }

static inline af_ctr *ctr_find(af_engine *e, uint32_t imm, int create) {
    for (;;) {
        uint64_t mask = e->ctr_cap - 1, i = ctr_hash(imm) & mask;
        while (e->ctr[i].used) {
            if (e->ctr[i].imm == imm) return &e->ctr[i];
            i = (i + 1) & mask;
        }
        if (!create) return NULL;
        if ((e->ctr_n + 1) * 2 > e->ctr_cap) {
            ctr_grow(e); /* then probe the larger table again */
            continue;
        }
        e->ctr[i].used = 1;
        e->ctr[i].imm = imm;
        e->ctr[i].avail = 0;
        e->ctr[i].want = 0;
        e->ctr_n++;
        return &e->ctr[i];
    }
}

/* Take n arrivals of imm if that many are here and nobody is armed on it
 * (an armed waiter is served first, by count_imm). Returns 1 when taken; the
 * entry goes once nothing is left in it. */
static inline int ctr_take(af_engine *e, uint32_t imm, uint64_t n) {
    af_ctr *c = ctr_find(e, imm, 0);
    if (!c || c->want || c->avail < n) return 0;
    c->avail -= n;
    if (!c->avail) ctr_delete(e, c);
    return 1;
}

/* Publish "somebody waits here" for peers deciding whether to ring us. */
static inline void publish_waiting(af_engine *e) {
    if (e->bell_page) atomic_store_explicit(&e->bell_page->waiting, e->armed > 0, memory_order_relaxed);
}

/* need_min: a lower bound of what the nearest armed counter still needs. It
 * only drops as counters arm and count; when a waiter leaves it is marked
 * dirty and rescanned (at most once a millisecond) before it is published. */
static inline void need_lower(af_engine *e, const af_ctr *c) {
    uint64_t n = c->want - c->avail;
    if (n < e->need_min) e->need_min = n;
}

static inline void need_raise(af_engine *e) {
    if (e->armed == 0) {
        e->need_min = UINT64_MAX;
        e->need_dirty = 0;
    } else {
        e->need_dirty = 1;
    }
}

/* One immediate arrived: on every remote-CQ-data completion. */
static inline void count_imm(af_engine *e, uint32_t imm) {
    af_ctr *c = ctr_find(e, imm, 1);
    c->avail++;
    e->st.imms++;
    if (e->rel_armed && rel_count(e, c)) return; /* a release word took them (triggers.c) */
    if (!c->want) return;
    if (c->avail >= c->want) {
        c->want = 0;
        e->armed--;
        need_raise(e);
        publish_waiting(e);
        push_event(e, AF_EV_COUNTER, imm, 0, 0, 0);
    } else {
        need_lower(e, c);
    }
}

/* peers (afpeer.c): what is live to a peer, and when it last completed one. */
static inline void peer_op_begin(af_engine *e, af_op *op) {
    if (op->kind == OP_GROUP) return;
    af_peer *p = &e->peers[op->peer];
    if (p->inflight++ == 0) p->t_progress = now_ns();
}

static inline void peer_op_end(af_engine *e, af_op *op) {
    if (op->kind == OP_GROUP) return;
    af_peer *p = &e->peers[op->peer];
    if (!op->reported && p->inflight) p->inflight--; /* a reported op was uncounted then */
}

static inline void peer_progress(af_engine *e, af_op *op) { e->peers[op->peer].t_progress = now_ns(); }

/* ops (ops.c) */
static inline int op_finished(const af_op *op) {
    return !op->pending && op->posted == op->total && op->outstanding == 0;
}

static inline void maybe_finish(af_engine *e, uint32_t i) {
    af_op *op = &e->ops[i];
    if (!op_finished(op)) return;
    if (op->kind == OP_BATCH) { /* its group reports, once for the batch */
        batch_child_done(e, i);
        return;
    }
    push_event(e, AF_EV_OP, 0, op->status, 0, op->token);
    op_free(e, i);
}

static inline int check_peer(af_engine *e, uint32_t peer, int ndom) {
    if (peer >= e->npeers) return -FI_EINVAL;
    if (e->peers[peer].dead) return -e->peers[peer].dead; /* gone: fail now, never post into it */
    if (ndom < 1 || ndom > e->ndom) return -FI_EINVAL;
    for (int d = 0; d < ndom; d++)
        if (e->peers[peer].addr[d] == FI_ADDR_NOTAVAIL) return -FI_EINVAL;
    return 0;
}

#include "qlock.h" /* after cpu_relax and now_ns, which its inline parts use */

/* How long a post waits outside libfabric for a shm queue lock (qlock.h). */
static inline uint64_t qlock_bound(const af_engine *e) {
    return e->pol.post_timeout_ns ? e->pol.post_timeout_ns : 5000000000ull;
}

/* Before a post to peer's domain dn: 0, or the errno to fail it with (qlock.h). */
static inline int peer_qlock(af_engine *e, uint32_t peer, uint32_t dn) {
    const af_peer *p = &e->peers[peer];
    return qlock_check(p->qlock[dn], p->pidfd, qlock_bound(e));
}

/* Whether peer's queue lock on domain dn is held right now (a live copy, most often). */
static inline int peer_qlock_busy(const af_engine *e, uint32_t peer, uint32_t dn) {
    const volatile int *w = e->peers[peer].qlock[dn];
    return w && *w != af_qlock_free;
}

static inline int check_mr(af_engine *e, int mr) {
    if (mr < 0) return 0;
    return mr < e->nmrs && e->mrs[mr].live ? 0 : -FI_EINVAL;
}

/* The pending queue (ops waiting for room, or for the workers: wpost.c), a
 * singly linked list through op->next (lock held). */
static inline void pend_push(af_engine *e, uint32_t i) {
    af_op *op = &e->ops[i];
    op->pending = 1;
    op->t_queued = now_ns();
    if (e->pend_tail == AF_NONE) e->pend_head = i;
    else e->ops[e->pend_tail].next = i;
    e->pend_tail = i;
}

/* Unlink op i, whose predecessor in the queue is prev (AF_NONE: the head). */
static inline void pend_unlink_after(af_engine *e, uint32_t prev, uint32_t i) {
    af_op *op = &e->ops[i];
    if (prev == AF_NONE) e->pend_head = op->next;
    else e->ops[prev].next = op->next;
    if (e->pend_tail == i) e->pend_tail = prev;
    op->pending = 0;
    op->next = AF_NONE;
    if (op->qdefer) {
        op->qdefer = 0;
        e->qdeferred--;
    }
}

/* The op's next piece (its cursor: posted, or bj/boff for a batch) as it goes
 * over domain dn: source, destination, length, key, immediate and the source's
 * registration (returned, -1: none). The cursor does not move. */
static inline int piece_at(af_engine *e, const af_op *op, uint32_t dn, af_piece *pc) {
    uint64_t c = op->posted;
    int mr = op->mr;
    pc->imm = op->imm;
    pc->key = op->rkey[dn];
    if (op->kind == OP_WRITE || op->kind == OP_READ) {
        uint64_t off = c * op->chunk;
        pc->len = op->len - off < op->chunk ? op->len - off : op->chunk;
        pc->src = op->laddr + off;
        pc->dst = op->raddr[dn] + off;
    } else if (op->kind == OP_PAGED) {
        pc->src = op->laddr + op->offs[c];
        pc->dst = op->raddr[dn] + op->offs[op->total + c];
        pc->len = op->page;
    } else { /* OP_BATCH: entry bj, from byte boff, at its own target */
        const af_bent *en = &op->ents[op->bj];
        const af_btgt *t = &op->tgts[en->tgt];
        uint64_t rem = en->len - op->boff;
        pc->len = rem < t->chunk ? rem : t->chunk;
        pc->src = en->src ? (uint8_t *)(uintptr_t)en->src + op->boff : e->scratch;
        pc->dst = t->base[dn] + en->roff + op->boff;
        pc->key = t->key[dn];
        pc->ent = en->idx;
        mr = en->mr;
        pc->imm = en->imm;
    }
    return mr;
}

/* Whether a piece of len bytes from registration mr may be injected: small
 * enough, and host memory (inject reads the source with the CPU). */
static inline int can_inject(const af_engine *e, const af_dom *d, int mr, uint64_t len, int64_t imm) {
    return len <= d->inject && !(mr >= 0 && e->mrs[mr].iface != FI_HMEM_SYSTEM) &&
           (imm >= 0 || !d->checked_plain);
}

/* A write (or read) without an immediate, d's lock held. Where a plain one
 * skips the target's key check (quirks.h plain_unchecked: shm copies it from
 * this process, unseen by the target), it goes with FI_DELIVERY_COMPLETE,
 * which the target carries out after checking the key. */
static inline ssize_t post_plain(af_dom *d, int read, void *buf, size_t len, void *desc, fi_addr_t dest,
                                 uint64_t raddr, uint64_t key, void *ctx) {
    if (!d->checked_plain)
        return read ? fi_read(d->ep, buf, len, desc, dest, raddr, key, ctx)
                    : fi_write(d->ep, buf, len, desc, dest, raddr, key, ctx);
    struct iovec iov = {buf, len};
    struct fi_rma_iov rma = {raddr, len, key};
    struct fi_msg_rma m = {.msg_iov = &iov, .desc = &desc, .iov_count = 1, .addr = dest,
                           .rma_iov = &rma, .rma_iov_count = 1, .context = ctx, .data = 0};
    return read ? fi_readmsg(d->ep, &m, FI_DELIVERY_COMPLETE | FI_COMPLETION)
                : fi_writemsg(d->ep, &m, FI_DELIVERY_COMPLETE | FI_COMPLETION);
}

/* Whether piece pc (from registration mr, to dest) goes as a plain write whose
 * immediate is owed (quirks.h sender_copy, cq.c): it carries an immediate, is
 * not injected, is large enough and is host memory. If so, wr keeps what the
 * immediate's write needs. */
static inline int owe_imm(const af_engine *e, const af_dom *d, int mr, const af_piece *pc,
                          fi_addr_t dest, af_wr *wr) {
    if (!d->sender_copy || pc->imm < 0 || pc->len < d->sender_copy ||
        (mr >= 0 && e->mrs[mr].iface != FI_HMEM_SYSTEM))
        return 0;
    wr->owe = 1;
    wr->imm = (uint32_t)pc->imm;
    wr->dest = dest;
    wr->raddr = pc->dst;
    wr->key = pc->key;
    return 1;
}

/* A batch's cursor past a piece of len bytes that went out. */
static inline void batch_advance(af_op *op, uint64_t len) {
    op->stripe++;
    op->boff += len;
    if (op->boff >= op->ents[op->bj].len) {
        op->bj++;
        op->boff = 0;
    }
}

/* Transmit contexts: take one for a post, commit it once the post went out. */
static inline int take_wr(af_dom *d, uint32_t opi, int32_t sslot, af_wr **out) {
    if (d->wr_free == AF_NONE) return 0;
    af_wr *wr = &d->wrs[d->wr_free];
    wr->op = opi;
    wr->sslot = sslot;
    wr->owe = 0;
    *out = wr;
    return 1;
}

static inline void commit_wr(af_dom *d, af_wr *wr) {
    wr->live = 1;
    d->wr_free = wr->next_free;
    d->credits--;
}

/* receive buffers (cq.c) */
static inline int post_rx(af_engine *e, af_dom *d, af_rx *rx) {
    dom_lock(e, d);
    ssize_t ret = fi_recv(d->ep, rx->buf, e->ctrl_max, d->rx_desc, FI_ADDR_UNSPEC, rx);
    dom_unlock(e, d);
    rx->state = ret ? RX_IDLE : RX_POSTED;
    if (ret) d->rx_retry = 1;
    return (int)ret;
}

#endif
