/* asyncfabric native core over libfabric.
 *
 * Owns, per engine: one or more domains (fabric, domain, CQ, AV, RDM endpoint),
 * the memory registrations, the in-flight transfers, the immediate counters and
 * a ring of events for Python. Every libfabric call and every table here is
 * guarded by one engine mutex (the domains are opened FI_THREAD_DOMAIN), so the
 * provider sees one caller at a time: either the progress thread or the Python
 * thread inside an afe_* call.
 *
 * The hot loops live here: chunking a write, posting the pages of a paged
 * write, reading completions and counting immediates. Python hears about a
 * transfer once, when it is done, and about a counter once, when the count it
 * armed for has arrived.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

#include "afcore.h"
#include "doorbell.h"
#include "shmname.h"

#define AF_MAX_DOMS 16
#define AF_NONE UINT32_MAX
#define AF_AGAIN 1
#define AF_DONE 0

enum { AF_EV_OP = 1, AF_EV_COUNTER = 2, AF_EV_RECV = 3, AF_EV_FATAL = 4 };
enum { OP_WRITE = 1, OP_PAGED = 2, OP_SEND = 3 };
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
} af_dom;

typedef struct af_peer {
    fi_addr_t addr[AF_MAX_DOMS];
    af_bell bell;
    /* failure detection (afpeer.c): a watched process, whether it is gone,
     * how many transfers to it are live and when it last completed one */
    int pidfd;
    int32_t pid;
    int dead;
    uint32_t inflight;
    uint64_t t_progress;
} af_peer;

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
    atomic_int spinners, stop;
    atomic_int sleeping; /* progress thread: 1 blocked in block(), 2 standing aside for Python */
    /* While the Python thread keeps calling in (posting, spinning) it reaps
     * completions itself and the progress thread stays out of its way until
     * this time passes or Python says it is going idle (afe_release). On two
     * cores, one poller per process is what keeps up with the raw loop. */
    _Atomic uint64_t py_until;
    int started;
    int opened; /* every domain is open and enabled: only then may anything progress them */
    int all_shm; /* every domain is shm: every writer is on this host and rings our doorbell */
    pthread_t thr;
    af_policy pol;
    af_stats st;
    uint8_t scratch[64];
    int watch_fd;       /* epoll over watched peers' pidfds (afpeer.c), -1 until needed */
    uint64_t t_watch;   /* last failure-detection pass */
};

/* afpeer.c: peer failure detection, included after this file */
static void peer_op_begin(af_engine *e, af_op *op);
static void peer_op_end(af_engine *e, af_op *op);
static void peer_progress(af_engine *e, af_op *op);
static void peer_watch(af_engine *e);
static void peer_close_all(af_engine *e);

/* ------------------------------------------------------------------ utils */

static uint64_t now_ns(void) {
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

static void seterr(char *err, size_t errlen, const char *fmt, const char *a, int rc) {
    if (err && errlen) snprintf(err, errlen, fmt, a, rc, fi_strerror(rc < 0 ? -rc : rc));
}

const char *afe_strerror(int err) { return fi_strerror(err < 0 ? -err : err); }

static inline void enter_py(af_engine *e) {
    pthread_mutex_lock(&e->lock);
    e->py_ctx = 1;
}

/* A post from Python: mark the thread active, and reap completions on the way. */
static inline void py_active(af_engine *e) {
    if (e->pol.py_hold_ns) atomic_store_explicit(&e->py_until, now_ns() + e->pol.py_hold_ns, memory_order_relaxed);
}

static inline void leave_py(af_engine *e) {
    e->py_ctx = 0;
    pthread_mutex_unlock(&e->lock);
}

static void kick(af_engine *e) {
    uint64_t one = 1;
    if (write(e->wake_fd, &one, sizeof one) < 0) { /* a full counter already wakes it */ }
}

/* ------------------------------------------------------------------ events */

static void push_event(af_engine *e, uint32_t kind, uint32_t a, int32_t status, uint32_t len,
                       uint64_t token) {
    if (e->ev_count == e->ev_cap) {
        uint32_t ncap = e->ev_cap * 2;
        af_event *n = malloc(sizeof(af_event) * ncap);
        if (!n) abort(); /* losing an event would hang a waiter forever */
        for (uint32_t i = 0; i < e->ev_count; i++) n[i] = e->ev[(e->ev_head + i) & (e->ev_cap - 1)];
        free(e->ev);
        e->ev = n;
        e->ev_cap = ncap;
        e->ev_head = 0;
    }
    af_event *ev = &e->ev[(e->ev_head + e->ev_count) & (e->ev_cap - 1)];
    ev->kind = kind;
    ev->a = a;
    ev->status = status;
    ev->len = len;
    ev->token = token;
    e->ev_count++;
    /* Only the first event of a batch rings the loop, and never when the Python
     * thread itself is inside a call: it drains on the way out. */
    if (e->ev_count == 1 && !e->py_ctx) {
        uint64_t one = 1;
        if (write(e->notify_fd, &one, sizeof one) < 0) { /* counter saturated: already readable */ }
        e->st.wakeups++;
    }
}

int afe_drain(af_engine *e, af_event *out, int max) {
    pthread_mutex_lock(&e->lock);
    int n = 0;
    while (n < max && e->ev_count) {
        out[n++] = e->ev[e->ev_head];
        e->ev_head = (e->ev_head + 1) & (e->ev_cap - 1);
        e->ev_count--;
    }
    pthread_mutex_unlock(&e->lock);
    return n;
}

int afe_nevents(af_engine *e) { return (int)__atomic_load_n(&e->ev_count, __ATOMIC_RELAXED); }

/* ------------------------------------------------------------------ counters
 * Open addressing with linear probing, keyed by the 32-bit immediate. An
 * entry lives while something arrived and was not taken, or somebody waits. */

static inline uint64_t ctr_hash(uint32_t imm) { return (uint64_t)imm * 0x9E3779B97F4A7C15ull >> 17; }

static void ctr_grow(af_engine *e) {
    uint64_t ncap = e->ctr_cap * 2;
    af_ctr *n = calloc(ncap, sizeof(af_ctr));
    if (!n) abort();
    for (uint64_t i = 0; i < e->ctr_cap; i++) {
        if (!e->ctr[i].used) continue;
        uint64_t j = ctr_hash(e->ctr[i].imm) & (ncap - 1);
        while (n[j].used) j = (j + 1) & (ncap - 1);
        n[j] = e->ctr[i];
    }
    free(e->ctr);
    e->ctr = n;
    e->ctr_cap = ncap;
}

static af_ctr *ctr_find(af_engine *e, uint32_t imm, int create) {
    uint64_t mask = e->ctr_cap - 1, i = ctr_hash(imm) & mask;
    while (e->ctr[i].used) {
        if (e->ctr[i].imm == imm) return &e->ctr[i];
        i = (i + 1) & mask;
    }
    if (!create) return NULL;
    if ((e->ctr_n + 1) * 2 > e->ctr_cap) {
        ctr_grow(e);
        return ctr_find(e, imm, create);
    }
    e->ctr[i].used = 1;
    e->ctr[i].imm = imm;
    e->ctr[i].avail = 0;
    e->ctr[i].want = 0;
    e->ctr_n++;
    return &e->ctr[i];
}

static void ctr_delete(af_engine *e, af_ctr *c) {
    uint64_t mask = e->ctr_cap - 1, i = (uint64_t)(c - e->ctr);
    e->ctr_n--;
    for (;;) {
        e->ctr[i].used = 0;
        uint64_t j = i;
        for (;;) {
            j = (j + 1) & mask;
            if (!e->ctr[j].used) return;
            uint64_t k = ctr_hash(e->ctr[j].imm) & mask;
            int stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
            if (stays) continue;
            e->ctr[i] = e->ctr[j];
            i = j;
            break;
        }
    }
}

/* Take n arrivals of imm if that many are here and nobody is armed on it
 * (an armed waiter is served first, by count_imm). Returns 1 when taken; the
 * entry goes once nothing is left in it. */
static int ctr_take(af_engine *e, uint32_t imm, uint64_t n) {
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

/* What writers compare their pending count with while we sleep (lock held). */
static uint64_t need_now(af_engine *e, uint64_t t) {
    if (!e->need_dirty) return e->need_min;
    if (t - e->t_need_scan < 1000000ull) return 1; /* rescanned lately: ring on every write */
    uint64_t m = UINT64_MAX;
    for (uint64_t i = 0; i < e->ctr_cap; i++) {
        const af_ctr *c = &e->ctr[i];
        if (c->used && c->want && c->want - c->avail < m) m = c->want - c->avail;
    }
    e->need_min = m;
    e->need_dirty = 0;
    e->t_need_scan = t;
    return m;
}

/* A counter armed while the progress thread may be asleep: lower the need it
 * published, and wake it if the writers' pending count already reaches the
 * new need (they compared with the old one). Store, fence, load here against
 * add, then load in pump_op: one side always sees the other. */
static void need_publish_arm(af_engine *e, const af_ctr *c) {
    if (!e->bell_page) return;
    uint64_t n = c->want - c->avail;
    if (n < atomic_load(&e->bell_page->need)) atomic_store(&e->bell_page->need, n);
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load(&e->bell_page->sleeping) && atomic_load(&e->bell_page->pending) >= (int64_t)n)
        kick(e);
}

static inline void count_imm(af_engine *e, uint32_t imm) {
    af_ctr *c = ctr_find(e, imm, 1);
    c->avail++;
    e->st.imms++;
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

/* Take `want` if that many have arrived (returns 1); else arm for it (returns 0). */
int afe_counter_arm(af_engine *e, uint32_t imm, uint64_t want) {
    enter_py(e);
    af_ctr *c = ctr_find(e, imm, 1);
    int r, had = c->want != 0;
    if (had) e->armed--;
    if (c->avail >= want) {
        c->avail -= want;
        c->want = 0;
        if (!c->avail) ctr_delete(e, c);
        if (had) need_raise(e);
        r = 1;
    } else {
        c->want = want;
        e->armed++;
        if (had) need_raise(e);
        need_lower(e, c);
        need_publish_arm(e, c);
        r = 0;
    }
    publish_waiting(e);
    leave_py(e);
    return r;
}

void afe_counter_disarm(af_engine *e, uint32_t imm) {
    enter_py(e);
    af_ctr *c = ctr_find(e, imm, 0);
    if (c) {
        int had = c->want != 0;
        if (had) e->armed--;
        c->want = 0;
        if (!c->avail) ctr_delete(e, c);
        if (had) need_raise(e);
        publish_waiting(e);
    }
    leave_py(e);
}

uint64_t afe_counter_avail(af_engine *e, uint32_t imm) {
    pthread_mutex_lock(&e->lock);
    af_ctr *c = ctr_find(e, imm, 0);
    uint64_t v = c ? c->avail : 0;
    pthread_mutex_unlock(&e->lock);
    return v;
}

/* Give back what a waiter took but could not deliver (it was cancelled). */
void afe_counter_give(af_engine *e, uint32_t imm, uint64_t n) {
    enter_py(e);
    af_ctr *c = ctr_find(e, imm, 1);
    c->avail += n;
    if (c->want && c->avail >= c->want) {
        c->want = 0;
        e->armed--;
        need_raise(e);
        publish_waiting(e);
        push_event(e, AF_EV_COUNTER, imm, 0, 0, 0);
    } else if (c->want) {
        need_lower(e, c);
    }
    leave_py(e);
}

uint64_t afe_counter_live(af_engine *e) {
    pthread_mutex_lock(&e->lock);
    uint64_t n = e->ctr_n;
    pthread_mutex_unlock(&e->lock);
    return n;
}

/* ------------------------------------------------------------------ ops */

static uint32_t op_alloc(af_engine *e) {
    if (e->op_free == AF_NONE) {
        uint32_t ncap = e->cap_ops ? e->cap_ops * 2 : 256;
        af_op *n = realloc(e->ops, sizeof(af_op) * ncap);
        if (!n) return AF_NONE;
        e->ops = n;
        for (uint32_t i = e->cap_ops; i < ncap; i++) {
            e->ops[i].active = 0;
            e->ops[i].next = i + 1 < ncap ? i + 1 : AF_NONE;
        }
        e->op_free = e->cap_ops;
        e->cap_ops = ncap;
    }
    uint32_t i = e->op_free;
    af_op *op = &e->ops[i];
    e->op_free = op->next;
    memset(op, 0, sizeof *op);
    op->active = 1;
    op->next = AF_NONE;
    op->mr = -1;
    op->imm = -1;
    e->live_ops++;
    return i;
}

static void op_free(af_engine *e, uint32_t i) {
    af_op *op = &e->ops[i];
    peer_op_end(e, op);
    free(op->offs);
    free(op->msg);
    op->offs = NULL;
    op->msg = NULL;
    op->active = 0;
    op->next = e->op_free;
    e->op_free = i;
    e->live_ops--;
}

static int op_finished(af_op *op) {
    return !op->pending && op->posted == op->total && op->outstanding == 0;
}

static void maybe_finish(af_engine *e, uint32_t i) {
    af_op *op = &e->ops[i];
    if (!op_finished(op)) return;
    push_event(e, AF_EV_OP, 0, op->status, 0, op->token);
    op_free(e, i);
}

static int progress_dom(af_engine *e, af_dom *d);
static int progress_locked(af_engine *e);

static inline int take_wr(af_dom *d, uint32_t opi, int32_t sslot, af_wr **out) {
    if (d->wr_free == AF_NONE) return 0;
    af_wr *wr = &d->wrs[d->wr_free];
    wr->op = opi;
    wr->sslot = sslot;
    *out = wr;
    return 1;
}

static inline void commit_wr(af_dom *d, af_wr *wr) {
    d->wr_free = wr->next_free;
    d->credits--;
}

/* Post as much of one transfer as the endpoints take. AF_AGAIN: back-pressure,
 * the op keeps its cursor and is resumed when completions free room. */
static int pump_op_inner(af_engine *e, uint32_t opi);

/* Post what can go, then wake the peer if it sleeps and needs to act: an op
 * whose completion waits for the target (anything not injected), a target
 * somebody waits on (it must count the immediate), a message, or a target
 * whose queue is full (EAGAIN). Injected writes to a target nobody waits on
 * need no wake-up: it counts them when it next polls. */
static int pump_op(af_engine *e, uint32_t opi) {
    af_op *op = &e->ops[opi];
    uint64_t before = op->posted, out_before = op->outstanding;
    int r = pump_op_inner(e, opi);
    op = &e->ops[opi];
    af_bell *b = &e->peers[op->peer].bell;
    if (b->page && (op->posted != before || r == AF_AGAIN)) {
        /* Post, fence, then read the target's flags: a target that armed a
         * counter and went to sleep after that read polls once more after its
         * own fence and finds the post (the Dekker pair of doorbell.h). */
        atomic_thread_fence(memory_order_seq_cst);
        int needs = r == AF_AGAIN || op->outstanding != out_before || op->kind == OP_SEND;
        uint64_t k = op->imm >= 0 ? op->posted - before : 0;
        if (k && atomic_load_explicit(&b->page->sleeping, memory_order_relaxed)) {
            /* Immediates for a sleeping target: ring once the writers' sum
             * reaches what its nearest waiter needs (doorbell.h). */
            int64_t p = atomic_fetch_add(&b->page->pending, (int64_t)k) + (int64_t)k;
            needs = needs || (atomic_load_explicit(&b->page->waiting, memory_order_relaxed) &&
                              (uint64_t)p >= atomic_load(&b->page->need));
        }
        if (needs && bell_ring(e->bell_fd, b)) e->st.wakeups++;
    }
    return r;
}

static int pump_op_inner(af_engine *e, uint32_t opi) {
    af_op *op = &e->ops[opi];
    int retried = 0;
    while (op->posted < op->total) {
        uint64_t c = op->posted;
        uint32_t dn = (uint32_t)(c % op->ndom);
        af_dom *d = &e->dom[dn];
        fi_addr_t dest = e->peers[op->peer].addr[dn];
        ssize_t ret;
        af_wr *wr = NULL;
        int32_t sslot = -1;

        if (op->kind == OP_SEND) {
            if (op->msglen <= d->inject) {
                ret = fi_inject(d->ep, op->msg, op->msglen, dest);
            } else {
                if (d->tx_top == 0 || !take_wr(d, opi, -1, &wr)) return AF_AGAIN;
                sslot = d->tx_free[d->tx_top - 1];
                uint8_t *buf = d->txmem + (size_t)sslot * e->ctrl_max;
                memcpy(buf, op->msg, op->msglen);
                wr->sslot = sslot;
                ret = fi_send(d->ep, buf, op->msglen, d->tx_desc, dest, wr);
            }
        } else {
            uint8_t *src;
            uint64_t dst, len;
            if (op->kind == OP_WRITE) {
                uint64_t off = c * op->chunk;
                len = op->len - off < op->chunk ? op->len - off : op->chunk;
                src = op->laddr + off;
                dst = op->raddr[dn] + off;
            } else {
                src = op->laddr + op->offs[c];
                dst = op->raddr[dn] + op->offs[op->total + c];
                len = op->page;
            }
            if (len <= d->inject && !(op->mr >= 0 && e->mrs[op->mr].iface != FI_HMEM_SYSTEM)) {
                ret = op->imm >= 0
                          ? fi_inject_writedata(d->ep, src, len, (uint64_t)op->imm, dest, dst, op->rkey[dn])
                          : fi_inject_write(d->ep, src, len, dest, dst, op->rkey[dn]);
            } else {
                if (!d->credits || !take_wr(d, opi, -1, &wr)) return AF_AGAIN;
                void *desc = op->mr >= 0 ? e->mrs[op->mr].desc[dn] : NULL;
                ret = op->imm >= 0
                          ? fi_writedata(d->ep, src, len, desc, (uint64_t)op->imm, dest, dst, op->rkey[dn], wr)
                          : fi_write(d->ep, src, len, desc, dest, dst, op->rkey[dn], wr);
            }
        }
        if (ret == -FI_EAGAIN) {
            e->st.eagain++;
            if (!retried) {
                /* Providers free send resources when their queue is progressed. */
                retried = 1;
                progress_dom(e, d);
                continue;
            }
            return AF_AGAIN;
        }
        retried = 0;
        if (ret) {
            /* Stop posting; the op finishes, failed, once what is out comes back. */
            if (!op->status) op->status = (int32_t)ret;
            op->total = op->posted;
            break;
        }
        if (wr) {
            commit_wr(d, wr);
            if (sslot >= 0) d->tx_top--;
            op->outstanding++;
        }
        op->posted++;
        e->st.posts++;
    }
    return AF_DONE;
}

/* Retry every queued op. One that cannot go out (a peer that is not there,
 * no credits) does not hold up the others; one that cannot go out for
 * post_timeout_ns fails with FI_ETIMEDOUT instead of waiting forever. */
static int pump_pending(af_engine *e) {
    uint32_t prev = AF_NONE, i = e->pend_head;
    uint64_t now = 0;
    int posted = 0;
    while (i != AF_NONE) {
        af_op *op = &e->ops[i];
        uint32_t next = op->next;
        uint64_t before = op->posted;
        int r = pump_op(e, i);
        op = &e->ops[i];
        posted += (int)(op->posted - before);
        if (r == AF_AGAIN && e->pol.post_timeout_ns) {
            if (!now) now = now_ns();
            if (now - op->t_queued > e->pol.post_timeout_ns) {
                if (!op->status) op->status = -FI_ETIMEDOUT;
                op->total = op->posted;
                r = AF_DONE;
            }
        }
        if (r == AF_AGAIN) {
            prev = i;
            i = next;
            continue;
        }
        if (prev == AF_NONE) e->pend_head = next;
        else e->ops[prev].next = next;
        if (e->pend_tail == i) e->pend_tail = prev;
        op->pending = 0;
        op->next = AF_NONE;
        maybe_finish(e, i);
        i = next;
    }
    return posted;
}

/* Start an op from the Python thread (lock held). Returns 1 when it finished
 * during the call (every piece was injected), 0 when an event will follow,
 * or a negative errno when it failed before anything went out. */
static int start_op(af_engine *e, uint32_t i) {
    af_op *op = &e->ops[i];
    peer_op_begin(e, op);
    if (pump_op(e, i) == AF_AGAIN) {
        op->pending = 1;
        op->t_queued = now_ns();
        if (e->pend_tail == AF_NONE) e->pend_head = i;
        else e->ops[e->pend_tail].next = i;
        e->pend_tail = i;
    }
    e->work_gen++;
    if (atomic_load(&e->sleeping) == 1) kick(e);
    if (op_finished(op)) {
        int st = op->status;
        op_free(e, i);
        return st ? st : 1;
    }
    return 0;
}

static int check_peer(af_engine *e, uint32_t peer, int ndom) {
    if (peer >= e->npeers) return -FI_EINVAL;
    if (e->peers[peer].dead) return -ESRCH; /* its process exited: fail now, never post into it */
    if (ndom < 1 || ndom > e->ndom) return -FI_EINVAL;
    for (int d = 0; d < ndom; d++)
        if (e->peers[peer].addr[d] == FI_ADDR_NOTAVAIL) return -FI_EINVAL;
    return 0;
}

static int check_mr(af_engine *e, int mr) {
    if (mr < 0) return 0;
    return mr < e->nmrs && e->mrs[mr].live ? 0 : -FI_EINVAL;
}

int afe_post_write(af_engine *e, uint64_t token, uint32_t peer, int ndom, void *laddr, int mr,
                   uint64_t len, uint64_t chunk, const uint64_t *rbase, const uint64_t *rkey,
                   uint64_t roff, int64_t imm) {
    enter_py(e);
    int rc = check_peer(e, peer, ndom);
    if (!rc) rc = check_mr(e, mr);
    if (!rc && chunk == 0) rc = -FI_EINVAL;
    uint32_t i = rc ? AF_NONE : op_alloc(e);
    if (!rc && i == AF_NONE) rc = -FI_ENOMEM;
    if (!rc) {
        af_op *op = &e->ops[i];
        op->kind = OP_WRITE;
        op->token = token;
        op->peer = peer;
        op->ndom = (uint32_t)ndom;
        op->laddr = laddr ? laddr : e->scratch;
        op->mr = mr;
        op->len = len;
        op->chunk = chunk;
        op->total = len ? (len + chunk - 1) / chunk : 1;
        op->imm = imm;
        for (int d = 0; d < ndom; d++) {
            op->raddr[d] = rbase[d] + roff;
            op->rkey[d] = rkey[d];
        }
        rc = start_op(e, i);
        py_active(e);
        progress_locked(e); /* reap: this thread is the poller while it is busy */
    }
    leave_py(e);
    return rc;
}

int afe_post_paged(af_engine *e, uint64_t token, uint32_t peer, int ndom, void *laddr, int mr,
                   const uint64_t *src_off, const uint64_t *dst_off, uint64_t npages,
                   uint64_t page, const uint64_t *rbase, const uint64_t *rkey, int64_t imm) {
    /* Copy the page maps so the caller's arrays need not outlive the call. */
    uint64_t *offs = npages ? malloc(sizeof(uint64_t) * 2 * npages) : NULL;
    if (npages && !offs) return -FI_ENOMEM;
    if (npages) {
        memcpy(offs, src_off, sizeof(uint64_t) * npages);
        memcpy(offs + npages, dst_off, sizeof(uint64_t) * npages);
    }
    enter_py(e);
    int rc = check_peer(e, peer, ndom);
    if (!rc) rc = check_mr(e, mr);
    uint32_t i = rc ? AF_NONE : op_alloc(e);
    if (!rc && i == AF_NONE) rc = -FI_ENOMEM;
    if (rc) {
        free(offs);
    } else {
        af_op *op = &e->ops[i];
        op->kind = OP_PAGED;
        op->token = token;
        op->peer = peer;
        op->ndom = (uint32_t)ndom;
        op->laddr = laddr;
        op->mr = mr;
        op->offs = offs;
        op->page = page;
        op->total = npages;
        op->imm = imm;
        for (int d = 0; d < ndom; d++) {
            op->raddr[d] = rbase[d];
            op->rkey[d] = rkey[d];
        }
        rc = start_op(e, i);
        py_active(e);
        progress_locked(e); /* reap: this thread is the poller while it is busy */
    }
    leave_py(e);
    return rc;
}

int afe_post_send(af_engine *e, uint64_t token, uint32_t peer, const void *buf, uint32_t len) {
    if (len > e->ctrl_max) return -FI_EMSGSIZE;
    void *msg = malloc(len ? len : 1);
    if (!msg) return -FI_ENOMEM;
    memcpy(msg, buf, len);
    enter_py(e);
    int rc = check_peer(e, peer, 1);
    uint32_t i = rc ? AF_NONE : op_alloc(e);
    if (!rc && i == AF_NONE) rc = -FI_ENOMEM;
    if (rc) {
        free(msg);
    } else {
        af_op *op = &e->ops[i];
        op->kind = OP_SEND;
        op->token = token;
        op->peer = peer;
        op->ndom = 1;
        op->msg = msg;
        op->msglen = len;
        op->total = 1;
        rc = start_op(e, i);
        py_active(e);
        progress_locked(e); /* reap: this thread is the poller while it is busy */
    }
    leave_py(e);
    return rc;
}

/* ------------------------------------------------------------------ completions */

static int post_rx(af_engine *e, af_dom *d, af_rx *rx) {
    ssize_t ret = fi_recv(d->ep, rx->buf, e->ctrl_max, d->rx_desc, FI_ADDR_UNSPEC, rx);
    rx->state = ret ? RX_IDLE : RX_POSTED;
    if (ret) d->rx_retry = 1;
    return (int)ret;
}

static inline af_rx *as_rx(af_dom *d, void *ctx) {
    uintptr_t p = (uintptr_t)ctx, lo = (uintptr_t)d->rx, hi = (uintptr_t)(d->rx + d->nrx);
    return p >= lo && p < hi ? (af_rx *)ctx : NULL;
}

static inline af_wr *as_wr(af_dom *d, void *ctx) {
    uintptr_t p = (uintptr_t)ctx, lo = (uintptr_t)d->wrs, hi = (uintptr_t)(d->wrs + d->nwr);
    return p >= lo && p < hi ? (af_wr *)ctx : NULL;
}

static void complete_wr(af_engine *e, af_dom *d, af_wr *wr, int32_t status) {
    uint32_t opi = wr->op;
    if (wr->sslot >= 0) d->tx_free[d->tx_top++] = wr->sslot;
    wr->next_free = d->wr_free;
    d->wr_free = (uint32_t)(wr - d->wrs);
    d->credits++;
    af_op *op = &e->ops[opi];
    if (status && !op->status) op->status = status;
    peer_progress(e, op);
    op->outstanding--;
    maybe_finish(e, opi);
}

static void handle_entry(af_engine *e, af_dom *d, const struct fi_cq_data_entry *c) {
    e->st.completions++;
    if (c->flags & FI_REMOTE_CQ_DATA) {
        count_imm(e, (uint32_t)c->data);
        af_rx *rx = as_rx(d, c->op_context);
        if (rx) post_rx(e, d, rx);
        return;
    }
    af_rx *rx = as_rx(d, c->op_context);
    if (rx) {
        if (d == &e->dom[0]) {
            rx->state = RX_HELD; /* until Python copies it out (afe_recv_take) */
            push_event(e, AF_EV_RECV, rx->slot, 0, (uint32_t)c->len, 0);
        } else {
            post_rx(e, d, rx); /* messages go to domain 0; anything else is dropped */
        }
        return;
    }
    af_wr *wr = as_wr(d, c->op_context);
    if (wr) complete_wr(e, d, wr, 0);
}

static void handle_error(af_engine *e, af_dom *d) {
    struct fi_cq_err_entry err;
    memset(&err, 0, sizeof err);
    if (fi_cq_readerr(d->cq, &err, 0) < 0) return;
    e->st.cq_errors++;
    int32_t status = -(int32_t)(err.err ? err.err : FI_EIO);
    af_wr *wr = as_wr(d, err.op_context);
    if (wr) {
        complete_wr(e, d, wr, status);
        return;
    }
    af_rx *rx = as_rx(d, err.op_context);
    if (rx) {
        if (err.err == FI_ECANCELED) {
            rx->state = RX_HELD; /* cancelled at close: never repost */
            return;
        }
        post_rx(e, d, rx); /* a truncated or failed receive: the buffer is reused */
        return;
    }
    push_event(e, AF_EV_FATAL, (uint32_t)(d - e->dom), status, 0, 0);
}

static int progress_dom(af_engine *e, af_dom *d) {
    struct fi_cq_data_entry ents[64];
    int total = 0;
    for (;;) {
        ssize_t n = fi_cq_read(d->cq, ents, 64);
        if (n == -FI_EAGAIN) break;
        if (n == -FI_EAVAIL) {
            handle_error(e, d);
            total++;
            continue;
        }
        if (n < 0) {
            push_event(e, AF_EV_FATAL, (uint32_t)(d - e->dom), (int32_t)n, 0, 0);
            break;
        }
        for (ssize_t i = 0; i < n; i++) handle_entry(e, d, &ents[i]);
        total += (int)n;
        if (n < 64) break;
    }
    if (d->rx_retry) {
        d->rx_retry = 0;
        for (uint32_t i = 0; i < d->nrx; i++)
            if (d->rx[i].state == RX_IDLE && post_rx(e, d, &d->rx[i])) break;
    }
    return total;
}

static int progress_locked(af_engine *e) {
    int n = 0;
    for (int i = 0; i < e->ndom; i++) n += progress_dom(e, &e->dom[i]);
    /* Posting queued work counts as progress: the caller keeps polling
     * instead of napping while a full queue drains. */
    if (e->pend_head != AF_NONE) n += pump_pending(e);
    peer_watch(e);
    return n;
}

/* Copy a received message out and give its buffer back to the provider. */
int afe_recv_take(af_engine *e, uint32_t slot, void *dst, uint32_t len) {
    enter_py(e);
    af_dom *d = &e->dom[0];
    int rc = -FI_EINVAL;
    if (slot < d->nrx && len <= e->ctrl_max && d->rx[slot].state == RX_HELD) {
        memcpy(dst, d->rx[slot].buf, len);
        post_rx(e, d, &d->rx[slot]);
        rc = 0;
    }
    leave_py(e);
    return rc;
}

/* ------------------------------------------------------------------ progress */

static int block(af_engine *e, uint64_t ns, uint64_t gen_seen) {
    struct pollfd pfd[AF_MAX_DOMS + 2];
    int n = 0;
    pfd[n].fd = e->wake_fd;
    pfd[n++].events = POLLIN;
    pthread_mutex_lock(&e->lock);
    if (e->work_gen != gen_seen || e->ev_count == UINT32_MAX) {
        pthread_mutex_unlock(&e->lock);
        return 1;
    }
    for (int i = 0; i < e->ndom; i++) {
        af_dom *d = &e->dom[i];
        if (d->wait_fd < 0) continue;
        struct fid *f = &d->cq->fid;
        if (fi_trywait(d->fabric, &f, 1) != FI_SUCCESS) {
            pthread_mutex_unlock(&e->lock);
            return 1;
        }
        pfd[n].fd = d->wait_fd;
        pfd[n++].events = POLLIN;
    }
    atomic_store(&e->sleeping, 1);
    if (e->bell_page) {
        /* Say what a waiter needs and that nothing is pending yet (everything
         * posted before the poll below is counted by it), then say we sleep,
         * then look once more: a peer that posted before seeing the flag has
         * its work found here; one that posts after adds to pending, and the
         * one that brings it to the need rings. */
        atomic_store(&e->bell_page->need, need_now(e, now_ns()));
        atomic_store(&e->bell_page->pending, 0);
        atomic_store(&e->bell_page->sleeping, 1);
        atomic_thread_fence(memory_order_seq_cst);
        if (progress_locked(e) > 0) {
            atomic_store(&e->bell_page->sleeping, 0);
            atomic_store(&e->sleeping, 0);
            pthread_mutex_unlock(&e->lock);
            return 1;
        }
        pfd[n].fd = e->bell_fd;
        pfd[n++].events = POLLIN;
    }
    pthread_mutex_unlock(&e->lock);
    struct timespec ts = {(time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull)};
    e->st.blocks++;
    int rc = ppoll(pfd, (nfds_t)n, &ts, NULL);
    if (e->bell_page) atomic_store(&e->bell_page->sleeping, 0);
    atomic_store(&e->sleeping, 0);
    if (rc > 0 && (pfd[0].revents & POLLIN)) {
        uint64_t v;
        if (read(e->wake_fd, &v, sizeof v) < 0) { /* raced with another reader: fine */ }
    }
    if (rc > 0 && e->bell_page && (pfd[n - 1].revents & POLLIN)) bell_drain(e->bell_fd);
    return rc > 0;
}

/* Progress threads of this process that are spinning. On two cores, 64
 * engines in one process each spinning spin_us after every doorbell would
 * take the CPU from the threads doing the work; beyond the cap a thread with
 * nothing to do blocks at once (its doorbell and wait fds still wake it). */
static atomic_int g_spinning;
static int g_spin_cap;

static int spin_cap(void) {
    if (!g_spin_cap) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        g_spin_cap = n >= 4 ? (int)(n / 2) : 1;
    }
    return g_spin_cap;
}

static int take_spin_slot(int *have) {
    if (*have) return 1;
    if (atomic_fetch_add(&g_spinning, 1) < spin_cap()) return *have = 1;
    atomic_fetch_sub(&g_spinning, 1);
    return 0;
}

static void drop_spin_slot(int *have) {
    if (*have) atomic_fetch_sub(&g_spinning, 1);
    *have = 0;
}

/* How long the progress thread may sleep. Transfers of ours in flight: short
 * naps (queued posts to retry, peers to watch). Only counters armed: arrivals
 * that matter ring the doorbell when every writer is an shm peer on this
 * host, so the nap is the idle one; on other providers the wait fds wake us,
 * and the short nap stays as a backstop. */
static uint64_t nap_ns(af_engine *e) {
    if (e->live_ops > 0) return e->pol.busy_block_ns;
    if (e->armed > 0 && !(e->all_shm && e->bell_page)) return e->pol.busy_block_ns;
    return e->pol.idle_block_ns;
}

static void *progress_main(void *arg) {
    af_engine *e = arg;
    int slot = 0;
    /* Naps of tens of microseconds mean nothing with Linux's default 50 us
     * timer slack. */
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
    uint64_t last = now_ns();
    uint32_t idle_polls = 0;
    while (!atomic_load(&e->stop)) {
        uint64_t until = atomic_load_explicit(&e->py_until, memory_order_relaxed);
        if (atomic_load(&e->spinners) || until > now_ns()) {
            /* The Python thread is polling the CQs itself (spinning in a wait,
             * or posting and reaping); two pollers on two cores would only
             * fight. Stay out of its way, waking if it says it goes idle. */
            drop_spin_slot(&slot);
            atomic_store(&e->sleeping, 2); /* standing aside: posts need not kick us */
            struct pollfd pfd = {e->wake_fd, POLLIN, 0};
            /* Sleep until Python's hold ends (afe_release kicks us earlier). */
            uint64_t t = now_ns(), wait = until > t ? until - t : 20000;
            if (wait > e->pol.idle_block_ns) wait = e->pol.idle_block_ns;
            struct timespec ts = {(time_t)(wait / 1000000000ull), (long)(wait % 1000000000ull)};
            if (ppoll(&pfd, 1, &ts, NULL) > 0) {
                uint64_t v;
                if (read(e->wake_fd, &v, sizeof v) < 0) { /* already drained */ }
            }
            atomic_store(&e->sleeping, 0);
            last = now_ns();
            continue;
        }
        if (pthread_mutex_trylock(&e->lock)) {
            /* The Python thread is inside a call: most often a post, which
             * can spin in the provider for a whole copy (shm waits on the
             * target's lock while the target copies), or the drain after
             * it. It reaps on its way out, so stand aside as after any
             * call. Blocking on the mutex would have each unlock hand the
             * lock to us: two context switches per write, on the core the
             * target needs for the copy (1 MiB streams, side by side:
             * 0.78-0.83 of raw blocking, 0.97-1.13 standing aside). */
            uint64_t hold = e->pol.py_hold_ns > 20000 ? e->pol.py_hold_ns : 20000;
            uint64_t u = now_ns() + hold;
            if (atomic_load_explicit(&e->py_until, memory_order_relaxed) < u)
                atomic_store_explicit(&e->py_until, u, memory_order_relaxed);
            continue;
        }
        int n = progress_locked(e);
        uint64_t nap = nap_ns(e);
        uint64_t gen = e->work_gen;
        pthread_mutex_unlock(&e->lock);
        uint64_t t = now_ns();
        if (n > 0) {
            last = t;
            continue;
        }
        if (t - last < e->pol.spin_ns && take_spin_slot(&slot)) {
            /* Spin, but let a thread that was just woken (this process's event
             * loop, or the peer's) have the core: on two cores a pure spinner
             * delays it by up to the scheduler's wake-up granularity. */
            if ((++idle_polls & 31) == 0) sched_yield();
            else cpu_relax();
            continue;
        }
        drop_spin_slot(&slot);
        if (block(e, nap, gen)) last = now_ns();
    }
    drop_spin_slot(&slot);
    return NULL;
}

int afe_start(af_engine *e, const af_policy *policy) {
    if (e->started) return -FI_EALREADY;
    e->pol = *policy;
    if (pthread_create(&e->thr, NULL, progress_main, e)) return -FI_EOTHER;
    e->started = 1;
    return 0;
}

/* Poll from the Python thread until an event is ready or `ns` passes. */
/* Poll from the Python thread for up to `ns`, until an event is ready or, with
 * `want` > 0, until `want` arrivals of `imm` can be taken (taken here, arming
 * nothing, so no event is made for them). The progress thread sleeps through
 * the spin instead of checking back every few microseconds: on two cores its
 * wake-ups preempt the spinner. Bit 0 of the result: taken; bit 1: events
 * wait for afe_drain. */
static int spin_poll(af_engine *e, uint64_t ns, uint32_t imm, uint64_t want) {
    atomic_fetch_add(&e->spinners, 1);
    uint64_t t0 = now_ns();
    if (atomic_load_explicit(&e->py_until, memory_order_relaxed) < t0 + ns)
        atomic_store_explicit(&e->py_until, t0 + ns, memory_order_relaxed);
    uint32_t polls = 0;
    int got = 0, evs = 0;
    for (;;) {
        enter_py(e);
        if (polls || !want) progress_locked(e); /* a take first looks at what is already here */
        got = want && ctr_take(e, imm, want);
        evs = e->ev_count > 0;
        leave_py(e);
        if (got || evs || now_ns() - t0 >= ns) break;
        if ((++polls & 31) == 0) sched_yield(); /* see progress_main */
        else cpu_relax();
    }
    atomic_fetch_sub(&e->spinners, 1);
    e->st.spins++;
    return got | (evs << 1);
}

/* Poll until an event is ready or `ns` passes; nonzero when events are ready. */
int afe_spin(af_engine *e, uint64_t ns) { return spin_poll(e, ns, 0, 0) >> 1; }

/* The fast path of a wait (nobody queued ahead): take `want` arrivals of `imm`
 * if they are here or come within `ns`; gives up early when other events are
 * ready, so their waiters do not wait on this spin. */
int afe_counter_take_spin(af_engine *e, uint32_t imm, uint64_t want, uint64_t ns) {
    return spin_poll(e, ns, imm, want);
}

int afe_kick(af_engine *e) {
    kick(e);
    return 0;
}

/* Python goes idle (about to block in its event loop): hand polling back. */
void afe_release(af_engine *e) {
    atomic_store_explicit(&e->py_until, 0, memory_order_relaxed);
    if (atomic_load(&e->sleeping)) kick(e);
}

int afe_notify_fd(af_engine *e) { return e->notify_fd; }

void afe_stats(af_engine *e, af_stats *out) {
    pthread_mutex_lock(&e->lock);
    *out = e->st;
    out->live_ops = e->live_ops;
    uint64_t live = 0;
    for (int i = 0; i < e->nmrs; i++) live += e->mrs[i].live ? 1 : 0;
    out->live_mrs = live;
    pthread_mutex_unlock(&e->lock);
}

/* ------------------------------------------------------------------ setup */

static struct fi_info *make_hints(const char *prov, int want_hmem) {
    struct fi_info *h = fi_allocinfo();
    if (!h) return NULL;
    h->caps = FI_MSG | FI_RMA | FI_READ | FI_WRITE | FI_REMOTE_READ | FI_REMOTE_WRITE | FI_SEND | FI_RECV;
    if (want_hmem) h->caps |= FI_HMEM;
    h->mode = FI_CONTEXT | FI_CONTEXT2 | FI_RX_CQ_DATA;
    h->ep_attr->type = FI_EP_RDM;
    h->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY |
                              FI_MR_ENDPOINT | (want_hmem ? FI_MR_HMEM : 0);
    h->domain_attr->threading = FI_THREAD_DOMAIN;
    h->domain_attr->cq_data_size = 4;
    h->fabric_attr->prov_name = strdup(prov);
    return h;
}

static int getinfo(const char *prov, const char *node, int want_hmem, struct fi_info **out,
                   char *err, size_t errlen) {
    struct fi_info *h = make_hints(prov, want_hmem);
    if (!h) return -FI_ENOMEM;
    int rc = fi_getinfo(FI_VERSION(FI_MAJOR_VERSION, FI_MINOR_VERSION), node, NULL,
                        node ? FI_SOURCE : 0, h, out);
    fi_freeinfo(h);
    if (rc) {
        seterr(err, errlen, "libfabric has no usable '%s' provider here (fi_getinfo: %d, %s)", prov, rc);
        return rc;
    }
    if ((*out)->domain_attr->cq_data_size < 4) {
        seterr(err, errlen, "provider '%s' carries fewer than 4 bytes of CQ data (%d): %s", prov,
               (int)(*out)->domain_attr->cq_data_size);
        fi_freeinfo(*out);
        *out = NULL;
        return -FI_ENODATA;
    }
    return 0;
}

int afe_probe(const char *prov, const char *node, char *err, size_t errlen) {
    struct fi_info *info = NULL;
    int rc = getinfo(prov, node, 0, &info, err, errlen);
    if (info) fi_freeinfo(info);
    return rc;
}

static uint64_t rand64(void) {
    uint64_t v = 0;
    if (getrandom(&v, sizeof v, 0) != sizeof v) v = now_ns() * 0x9E3779B97F4A7C15ull;
    return v;
}

/* Register one buffer in one domain, choosing an unguessable key where the
 * provider lets us, and binding it to the endpoint where it must be. */
static int reg_one(af_dom *d, void *addr, uint64_t len, uint64_t access, int iface, uint64_t device,
                   struct fid_mr **mr) {
    struct iovec iov = {addr, len};
    struct fi_mr_attr attr;
    int rc = -FI_ENOKEY;
    for (int tries = 0; tries < 8 && rc == -FI_ENOKEY; tries++) {
        memset(&attr, 0, sizeof attr);
        attr.mr_iov = &iov;
        attr.iov_count = 1;
        attr.access = access;
        attr.iface = (enum fi_hmem_iface)iface;
        if (iface == FI_HMEM_CUDA) attr.device.cuda = (int)device;
        if (!(d->mr_mode & FI_MR_PROV_KEY)) {
            uint64_t k = rand64();
            if (d->key_size && d->key_size < 8) k &= (1ull << (8 * d->key_size)) - 1;
            attr.requested_key = k;
        }
        rc = fi_mr_regattr(d->domain, &attr, 0, mr);
    }
    if (rc) return rc;
    if (d->mr_mode & FI_MR_ENDPOINT) {
        rc = fi_mr_bind(*mr, &d->ep->fid, 0);
        if (!rc) rc = fi_mr_enable(*mr);
        if (rc) {
            fi_close(&(*mr)->fid);
            *mr = NULL;
        }
    }
    return rc;
}

static int open_dom(af_engine *e, af_dom *d, struct fi_info *info, int is_ctrl, uint32_t rx_slots,
                    char *err, size_t errlen) {
    int rc;
    const char *prov = info->fabric_attr->prov_name;
    d->wait_fd = -1;
    d->info = fi_dupinfo(info);
    if (!d->info) return -FI_ENOMEM;
    d->max_msg = info->ep_attr->max_msg_size;
    /* No fi_inject* on tcp: libfabric 1.17's tcp provider segfaults in fi_cq_read
     * when a peer dies with injected writes queued to it (reproduced by SIGKILLing
     * a peer mid-stream), and an injected write to a dead peer would "succeed"
     * silently. Every tcp transfer takes a completion instead (afpeer.c, docs/
     * failure-semantics.md). */
    d->inject = strstr(prov, "tcp") ? 0 : info->tx_attr->inject_size;
    d->mr_mode = info->domain_attr->mr_mode;
    d->key_size = info->domain_attr->mr_key_size;
    d->rx_cq_data = (info->mode & FI_RX_CQ_DATA) != 0;

    if ((rc = fi_fabric(info->fabric_attr, &d->fabric, NULL))) goto fail_fabric;
    if ((rc = fi_domain(d->fabric, info, &d->domain, NULL))) goto fail_domain;

    uint32_t txs = info->tx_attr->size ? (uint32_t)info->tx_attr->size : 256;
    d->nwr = txs < 1024 ? txs : 1024;
    d->credits = d->nwr;
    d->wrs = calloc(d->nwr, sizeof(af_wr));
    if (!d->wrs) return -FI_ENOMEM;
    for (uint32_t i = 0; i < d->nwr; i++) {
        d->wrs[i].tag = TAG_TX;
        d->wrs[i].next_free = i + 1 < d->nwr ? i + 1 : AF_NONE;
    }
    d->wr_free = 0;

    uint32_t rxs = info->rx_attr->size ? (uint32_t)info->rx_attr->size : 256;
    d->nrx = rx_slots < rxs ? rx_slots : rxs;

    struct fi_cq_attr cq_attr;
    memset(&cq_attr, 0, sizeof cq_attr);
    cq_attr.format = FI_CQ_FORMAT_DATA;
    cq_attr.size = (size_t)d->nwr + d->nrx + 64;
    cq_attr.wait_obj = FI_WAIT_FD;
    if (fi_cq_open(d->domain, &cq_attr, &d->cq, NULL)) {
        /* No fd to sleep on: the progress thread sleeps by the clock instead. */
        cq_attr.wait_obj = FI_WAIT_NONE;
        if ((rc = fi_cq_open(d->domain, &cq_attr, &d->cq, NULL))) goto fail_cq;
    } else if (fi_control(&d->cq->fid, FI_GETWAIT, &d->wait_fd)) {
        d->wait_fd = -1;
    }

    struct fi_av_attr av_attr;
    memset(&av_attr, 0, sizeof av_attr);
    av_attr.type = FI_AV_TABLE;
    if ((rc = fi_av_open(d->domain, &av_attr, &d->av, NULL))) goto fail_av;
    if ((rc = fi_endpoint(d->domain, info, &d->ep, NULL))) goto fail_ep;
    if (!strcmp(prov, "shm")) {
        /* A region name of our own: shmname.h says why. */
        char name[64];
        af_shm_name(name, sizeof name, rand64());
        if ((rc = fi_setname(&d->ep->fid, name, strlen(name) + 1))) goto fail_ep;
    }
    if ((rc = fi_ep_bind(d->ep, &d->av->fid, 0))) goto fail_ep;
    if ((rc = fi_ep_bind(d->ep, &d->cq->fid, FI_TRANSMIT | FI_RECV))) goto fail_ep;
    if ((rc = fi_enable(d->ep))) goto fail_ep;

    /* Receive pool. On FI_MR_LOCAL providers the pools are registered once. */
    size_t rxbytes = (size_t)d->nrx * e->ctrl_max;
    if (posix_memalign((void **)&d->rxmem, 4096, rxbytes ? rxbytes : 4096)) return -FI_ENOMEM;
    d->rx = calloc(d->nrx ? d->nrx : 1, sizeof(af_rx));
    if (!d->rx) return -FI_ENOMEM;
    if (d->mr_mode & FI_MR_LOCAL) {
        if ((rc = reg_one(d, d->rxmem, rxbytes, FI_RECV, FI_HMEM_SYSTEM, 0, &d->rx_mr))) goto fail_mr;
        d->rx_desc = fi_mr_desc(d->rx_mr);
    }
    for (uint32_t i = 0; i < d->nrx; i++) {
        d->rx[i].tag = TAG_RX;
        d->rx[i].slot = i;
        d->rx[i].buf = d->rxmem + (size_t)i * e->ctrl_max;
        post_rx(e, d, &d->rx[i]); /* a failure is retried by progress */
    }
    if (is_ctrl) {
        d->ntx = 64;
        size_t txbytes = (size_t)d->ntx * e->ctrl_max;
        if (posix_memalign((void **)&d->txmem, 4096, txbytes)) return -FI_ENOMEM;
        d->tx_free = calloc((size_t)d->ntx, sizeof(int32_t));
        if (!d->tx_free) return -FI_ENOMEM;
        for (int32_t i = 0; i < d->ntx; i++) d->tx_free[i] = i;
        d->tx_top = d->ntx;
        if (d->mr_mode & FI_MR_LOCAL) {
            if ((rc = reg_one(d, d->txmem, txbytes, FI_SEND, FI_HMEM_SYSTEM, 0, &d->tx_mr))) goto fail_mr;
            d->tx_desc = fi_mr_desc(d->tx_mr);
        }
    }
    return 0;

fail_fabric:
    seterr(err, errlen, "fi_fabric failed for provider '%s': %d (%s)", prov, rc);
    return rc;
fail_domain:
    seterr(err, errlen, "fi_domain failed for provider '%s': %d (%s)", prov, rc);
    return rc;
fail_cq:
    seterr(err, errlen, "fi_cq_open failed for provider '%s': %d (%s)", prov, rc);
    return rc;
fail_av:
    seterr(err, errlen, "fi_av_open failed for provider '%s': %d (%s)", prov, rc);
    return rc;
fail_ep:
    seterr(err, errlen, "opening the endpoint failed for provider '%s': %d (%s)", prov, rc);
    return rc;
fail_mr:
    seterr(err, errlen, "registering the message pools failed for provider '%s': %d (%s)", prov, rc);
    return rc;
}

static void close_dom(af_dom *d) {
    if (d->ep) fi_close(&d->ep->fid);
    if (d->rx_mr) fi_close(&d->rx_mr->fid);
    if (d->tx_mr) fi_close(&d->tx_mr->fid);
    if (d->av) fi_close(&d->av->fid);
    if (d->cq) fi_close(&d->cq->fid);
    if (d->domain) fi_close(&d->domain->fid);
    if (d->fabric) fi_close(&d->fabric->fid);
    if (d->info) fi_freeinfo(d->info);
    free(d->wrs);
    free(d->rx);
    free(d->rxmem);
    free(d->txmem);
    free(d->tx_free);
    memset(d, 0, sizeof *d);
}

int afe_open(const char *prov, const char *node, int ndom, uint32_t ctrl_max, uint32_t rx_slots,
             int want_hmem, af_engine **out, char *err, size_t errlen) {
    *out = NULL;
    if (ndom < 1 || ndom > AF_MAX_DOMS) {
        if (err) snprintf(err, errlen, "domains must be between 1 and %d, got %d", AF_MAX_DOMS, ndom);
        return -FI_EINVAL;
    }
    struct fi_info *infos = NULL;
    int rc = getinfo(prov, node, want_hmem, &infos, err, errlen);
    if (rc) return rc;

    /* Distinct domains (NICs) in the order the provider lists them; with fewer
     * NICs than asked for, domains share a NIC, as on loopback. */
    struct fi_info *distinct[AF_MAX_DOMS];
    int ndistinct = 0;
    for (struct fi_info *i = infos; i && ndistinct < AF_MAX_DOMS; i = i->next) {
        int seen = 0;
        for (int j = 0; j < ndistinct; j++)
            if (!strcmp(distinct[j]->domain_attr->name, i->domain_attr->name) &&
                !strcmp(distinct[j]->fabric_attr->prov_name, i->fabric_attr->prov_name))
                seen = 1;
        if (!seen) distinct[ndistinct++] = i;
    }

    af_engine *e = calloc(1, sizeof *e);
    if (!e) {
        fi_freeinfo(infos);
        return -FI_ENOMEM;
    }
    pthread_mutex_init(&e->lock, NULL);
    e->ctrl_max = ctrl_max;
    e->ndom = ndom;
    e->op_free = AF_NONE;
    e->pend_head = e->pend_tail = AF_NONE;
    e->mr_free = -1;
    e->ctr_cap = 1024;
    e->ctr = calloc(e->ctr_cap, sizeof(af_ctr));
    e->ev_cap = 1024;
    e->ev = malloc(sizeof(af_event) * e->ev_cap);
    e->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->bell_fd = -1;
    e->watch_fd = -1;
    e->need_min = UINT64_MAX;
    if (!e->ctr || !e->ev || e->notify_fd < 0 || e->wake_fd < 0) {
        rc = -FI_ENOMEM;
        if (err) snprintf(err, errlen, "out of memory or file descriptors opening the engine");
        goto fail;
    }
    if (!strcmp(distinct[0]->fabric_attr->prov_name, "shm")) af_shm_sweep();
    for (int i = 0; i < ndom; i++) {
        pthread_mutex_lock(&e->lock);
        rc = open_dom(e, &e->dom[i], distinct[i % ndistinct], i == 0, rx_slots, err, errlen);
        pthread_mutex_unlock(&e->lock);
        if (rc) goto fail;
    }
    {
        char name[1024];
        size_t len = sizeof name;
        if (fi_getname(&e->dom[0].ep->fid, name, &len) == 0 &&
            bell_create(bell_hash(name, len), (uint32_t)af_pidns(), &e->bell_page, &e->bell_fd, e->bell_name,
                        sizeof e->bell_name)) {
            e->bell_page = NULL;
            e->bell_fd = -1;
        }
    }
    e->all_shm = 1;
    for (int i = 0; i < ndom; i++)
        if (strcmp(e->dom[i].info->fabric_attr->prov_name, "shm")) e->all_shm = 0;
    fi_freeinfo(infos);
    e->opened = 1;
    *out = e;
    return 0;
fail:
    fi_freeinfo(infos);
    afe_close(e);
    return rc;
}

int afe_dominfo(af_engine *e, int i, af_dominfo *out) {
    if (i < 0 || i >= e->ndom) return -FI_EINVAL;
    af_dom *d = &e->dom[i];
    memset(out, 0, sizeof *out);
    snprintf(out->provider, sizeof out->provider, "%s", d->info->fabric_attr->prov_name);
    snprintf(out->fabric, sizeof out->fabric, "%s", d->info->fabric_attr->name);
    snprintf(out->domain, sizeof out->domain, "%s", d->info->domain_attr->name);
    out->max_msg_size = d->max_msg;
    out->inject_size = d->inject;
    out->cq_data_size = d->info->domain_attr->cq_data_size;
    out->mr_mode = d->mr_mode;
    out->mr_key_size = d->key_size;
    out->tx_credits = d->nwr;
    out->rx_slots = d->nrx;
    out->wait_fd = d->wait_fd;
    out->rx_cq_data = d->rx_cq_data;
    return 0;
}

int afe_getname(af_engine *e, int i, void *buf, size_t *len) {
    if (i < 0 || i >= e->ndom) return -FI_EINVAL;
    pthread_mutex_lock(&e->lock);
    int rc = fi_getname(&e->dom[i].ep->fid, buf, len);
    pthread_mutex_unlock(&e->lock);
    return rc;
}

int afe_add_peer(af_engine *e, int ndom, const void *const *addrs, size_t addr_len0,
                 int64_t *out_peer) {
    if (ndom < 1 || ndom > e->ndom) return -FI_EINVAL;
    enter_py(e);
    int rc = 0;
    if (e->npeers == e->cap_peers) {
        uint32_t ncap = e->cap_peers ? e->cap_peers * 2 : 64;
        af_peer *n = realloc(e->peers, sizeof(af_peer) * ncap);
        if (!n) rc = -FI_ENOMEM;
        else {
            e->peers = n;
            e->cap_peers = ncap;
        }
    }
    if (!rc) {
        af_peer *p = &e->peers[e->npeers];
        memset(p, 0, sizeof *p);
        for (int d = 0; d < AF_MAX_DOMS; d++) p->addr[d] = FI_ADDR_NOTAVAIL;
        p->pidfd = -1;
        p->pid = 0;
        p->dead = 0;
        p->inflight = 0;
        p->t_progress = 0;
        for (int d = 0; d < ndom && !rc; d++) {
            int n = fi_av_insert(e->dom[d].av, addrs[d], 1, &p->addr[d], 0, NULL);
            if (n != 1) rc = n < 0 ? n : -FI_EADDRNOTAVAIL;
        }
        if (!rc) {
            bell_open_peer(bell_hash(addrs[0], addr_len0), &p->bell);
            *out_peer = e->npeers++;
        }
    }
    leave_py(e);
    return rc;
}

int afe_mr_reg(af_engine *e, void *addr, uint64_t len, uint64_t access, int iface, uint64_t device,
               uint64_t *keys, uint64_t *bases) {
    uint64_t fa = FI_READ | FI_WRITE | FI_SEND | FI_RECV;
    if (access & AF_ACCESS_REMOTE_WRITE) fa |= FI_REMOTE_WRITE;
    if (access & AF_ACCESS_REMOTE_READ) fa |= FI_REMOTE_READ;
    enter_py(e);
    int rc = 0, idx = -1;
    if (e->mr_free >= 0) {
        idx = e->mr_free;
        e->mr_free = e->mrs[idx].next_free;
    } else {
        if (e->nmrs == e->cap_mrs) {
            int ncap = e->cap_mrs ? e->cap_mrs * 2 : 64;
            af_mr *n = realloc(e->mrs, sizeof(af_mr) * (size_t)ncap);
            if (!n) rc = -FI_ENOMEM;
            else {
                e->mrs = n;
                e->cap_mrs = ncap;
            }
        }
        if (!rc) idx = e->nmrs++;
    }
    if (!rc) {
        af_mr *m = &e->mrs[idx];
        memset(m, 0, sizeof *m);
        for (int d = 0; d < e->ndom && !rc; d++) {
            af_dom *dm = &e->dom[d];
            rc = reg_one(dm, addr, len, fa, iface, device, &m->mr[d]);
            if (rc) break;
            m->desc[d] = fi_mr_desc(m->mr[d]);
            keys[d] = fi_mr_key(m->mr[d]);
            bases[d] = (dm->mr_mode & FI_MR_VIRT_ADDR) ? (uint64_t)(uintptr_t)addr : 0;
        }
        if (rc) {
            for (int d = 0; d < e->ndom; d++)
                if (m->mr[d]) fi_close(&m->mr[d]->fid);
            m->next_free = e->mr_free;
            e->mr_free = idx;
        } else {
            m->live = 1;
            m->iface = iface;
        }
    }
    leave_py(e);
    return rc ? rc : idx;
}

int afe_mr_close(af_engine *e, int idx) {
    enter_py(e);
    int rc = -FI_EINVAL;
    if (idx >= 0 && idx < e->nmrs && e->mrs[idx].live) {
        af_mr *m = &e->mrs[idx];
        rc = 0;
        for (int d = 0; d < e->ndom; d++) {
            if (m->mr[d]) {
                int r = fi_close(&m->mr[d]->fid);
                if (r && !rc) rc = r;
            }
            m->mr[d] = NULL;
        }
        m->live = 0;
        m->next_free = e->mr_free;
        e->mr_free = idx;
    }
    leave_py(e);
    return rc;
}

void afe_close(af_engine *e) {
    if (!e) return;
    if (e->started) {
        atomic_store(&e->stop, 1);
        kick(e);
        pthread_join(e->thr, NULL);
        e->started = 0;
    }
    /* Let providers finish handling connection events (a peer that died, a
     * shutdown in flight) before their endpoints go: rxm in libfabric 1.17 can
     * crash closing an endpoint with such events unread. Not after a failed
     * open: nothing was connected, and progressing an endpoint that never got
     * enabled crashes shm (its CQ polls a region that does not exist). */
    if (e->opened) {
        uint64_t t0 = now_ns();
        pthread_mutex_lock(&e->lock);
        e->py_ctx = 1;
        while (now_ns() - t0 < 20000000ull) progress_locked(e);
        e->py_ctx = 0;
        pthread_mutex_unlock(&e->lock);
    }
    for (int i = 0; i < e->nmrs; i++)
        for (int d = 0; d < e->ndom; d++)
            if (e->mrs[i].live && e->mrs[i].mr[d]) fi_close(&e->mrs[i].mr[d]->fid);
    for (int i = 0; i < AF_MAX_DOMS; i++) close_dom(&e->dom[i]);
    for (uint32_t i = 0; i < e->cap_ops; i++)
        if (e->ops[i].active) {
            free(e->ops[i].offs);
            free(e->ops[i].msg);
        }
    free(e->ops);
    for (uint32_t i = 0; i < e->npeers; i++) bell_close_peer(&e->peers[i].bell);
    peer_close_all(e);
    free(e->peers);
    bell_destroy(e->bell_page, e->bell_fd, e->bell_name);
    free(e->mrs);
    free(e->ctr);
    free(e->ev);
    if (e->notify_fd >= 0) close(e->notify_fd);
    if (e->wake_fd >= 0) close(e->wake_fd);
    pthread_mutex_destroy(&e->lock);
    free(e);
}
