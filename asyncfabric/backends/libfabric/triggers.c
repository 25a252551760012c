/* Triggers: batches posted when a host word reaches a value, and counter
 * release words that the counter table stores when arrivals come.
 *
 * Triggered batches. A batch (afcore.h's entries and targets, checked at arm
 * time) is armed against a 32-bit word in host memory: pinned and mapped into
 * a GPU's address space when a CUDA stream is to fire it (cuStreamWriteValue32),
 * any host word otherwise. A watcher thread of this engine, started on the
 * first arm, polls the armed words; when one reaches its value (cyclic >=, the
 * compare of cuStreamWaitValue32's GEQ) it stores the optional reset value into
 * the word and posts the batch at once under the engine lock (batch_launch, as
 * afe_post_batch does from Python): no Python and no host function in between.
 * The batch ends in the usual AF_EV_OP for its token. A repeating trigger stays
 * armed; its next fire waits until the previous one ended (one fire in flight).
 * The watcher also fails armed triggers whose peer is gone (afpeer.c marks it)
 * with that peer's errno, so a dead peer fails them in bounded time.
 *
 * The watcher spins (pausing, yielding every 32 polls) for spin_ns after an arm
 * or a fire, then polls every nap_ns; with nothing armed it sleeps on its
 * eventfd. It is a thread of its own, not a duty of the progress thread: the
 * progress thread naps for up to idle_block_ns and stands aside while Python
 * polls, and a GPU gives it nothing to wake on, so a word would be seen late.
 *
 * Release words. afe_rel_arm(imm, n, word, value) makes the counter table, on
 * the arrival that brings imm's count to n (count_imm, afint.h, under the
 * engine lock), take the n arrivals and store value into the word with a
 * release store, so a CUDA stream waiting on it (cuStreamWaitValue32 GEQ)
 * proceeds with the data already in place (immediates are counted after their
 * data landed). A release word counts as an armed counter: writers on this
 * host ring our doorbell for it (doorbell.h), and need_now includes it.
 *
 * Locks: the trigger table has its own lock (the watcher holds it across a
 * pass over the words); whoever needs both takes it before the engine lock.
 * Release words live under the engine lock, like the counter table.
 */
#include "afint.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>

#include "triggers.h"

typedef struct af_trig {
    int used;
    int repeat;
    int inflight; /* a fire's batch has not ended: its group op is `opi` */
    uint32_t opi;
    uint64_t token;
    uint32_t *word;
    uint32_t value;
    int64_t reset;
    const af_btgt *tgts;
    uint32_t ntgt;
    const af_bent *ents;
    uint64_t n;
    int32_t *status;
    int64_t fires;
} af_trig;

typedef struct af_rel {
    int used; /* armed: a one-shot word goes as it stores */
    int repeat;
    uint32_t imm;
    uint32_t value;
    uint32_t *word;
    uint64_t n;
    int64_t id;
    int64_t fired;
} af_rel;

struct af_trigs {
    pthread_mutex_t lock; /* the trigger table; taken before the engine lock */
    af_trig *t;
    uint32_t cap, armed;
    af_rel *rel; /* under the engine lock */
    uint32_t rcap;
    int64_t next_id;
    pthread_t thr;
    int started;
    atomic_int stop;
    int wake_fd;
    _Atomic uint64_t hot_until; /* spin until then (an arm or a fire) */
    uint64_t spin_ns, nap_ns;
};

#define AF_TRIG_CHECK_NS 1000000ull /* how often armed triggers' peers are checked */

static inline int reached(uint32_t w, uint32_t v) { return (int32_t)(w - v) >= 0; }

static inline void word_store(uint32_t *w, uint32_t v) { __atomic_store_n(w, v, __ATOMIC_RELEASE); }

/* The tables, made on first use (engine lock held). */
static struct af_trigs *trigs(af_engine *e) {
    if (e->trig) return e->trig;
    struct af_trigs *T = calloc(1, sizeof *T);
    if (!T) return NULL;
    pthread_mutex_init(&T->lock, NULL);
    T->wake_fd = -1;
    T->next_id = 1;
    e->trig = T;
    return T;
}

/* ------------------------------------------------------------------ release words */

/* The arrival that brings imm's count to a release word's n (lock held): take
 * the arrivals and store. Returns 1 when c was deleted (nothing left in it). */
int rel_count(af_engine *e, af_ctr *c) {
    struct af_trigs *T = e->trig;
    if (!T) return 0;
    for (uint32_t i = 0; i < T->rcap; i++) {
        af_rel *r = &T->rel[i];
        if (!r->used || r->imm != c->imm) continue;
        if (c->avail < r->n) return 0;
        while (c->avail >= r->n) {
            c->avail -= r->n;
            r->fired++;
            word_store(r->word, r->value);
            if (!r->repeat) { /* done: its slot goes (afe_rel_fired then says -FI_ENOENT) */
                r->used = 0;
                e->rel_armed--;
                e->armed--;
                need_raise(e);
                publish_waiting(e);
                break;
            }
        }
        if (c->avail || c->want) return 0; /* c stays: count_imm goes on with it */
        ctr_delete(e, c);
        return 1;
    }
    return 0;
}

uint64_t rel_need(af_engine *e) {
    struct af_trigs *T = e->trig;
    uint64_t m = UINT64_MAX;
    if (!T) return m;
    for (uint32_t i = 0; i < T->rcap; i++) {
        af_rel *r = &T->rel[i];
        if (!r->used) continue;
        af_ctr *c = ctr_find(e, r->imm, 0);
        uint64_t have = c ? c->avail : 0;
        uint64_t need = have >= r->n ? 1 : r->n - have;
        if (need < m) m = need;
    }
    return m;
}

int afe_rel_arm(af_engine *e, uint32_t imm, uint64_t n, uint32_t *word, uint32_t value, int repeat,
                int64_t *id_out) {
    if (!word || n == 0 || ((uintptr_t)word & 3)) return -FI_EINVAL;
    enter_py(e);
    int rc = 0;
    struct af_trigs *T = trigs(e);
    af_rel *r = NULL;
    if (!T) rc = -FI_ENOMEM;
    for (uint32_t i = 0; !rc && i < T->rcap; i++)
        if (T->rel[i].used && T->rel[i].imm == imm) rc = -FI_EBUSY;
    for (uint32_t i = 0; !rc && i < T->rcap && !r; i++)
        if (!T->rel[i].used) r = &T->rel[i];
    if (!rc && !r) {
        uint32_t ncap = T->rcap ? T->rcap * 2 : 8;
        af_rel *nr = realloc(T->rel, sizeof(af_rel) * ncap);
        if (!nr) rc = -FI_ENOMEM;
        else {
            memset(nr + T->rcap, 0, sizeof(af_rel) * (ncap - T->rcap));
            r = &nr[T->rcap];
            T->rel = nr;
            T->rcap = ncap;
        }
    }
    if (!rc) {
        memset(r, 0, sizeof *r);
        r->used = 1;
        r->repeat = repeat;
        r->imm = imm;
        r->value = value;
        r->word = word;
        r->n = n;
        r->id = T->next_id++;
        *id_out = r->id;
        e->rel_armed++;
        e->armed++;
        publish_waiting(e);
        /* what is here already counts now */
        af_ctr *c = ctr_find(e, imm, 0);
        if (c && c->avail >= n) rel_count(e, c);
        c = ctr_find(e, imm, 0);
        if (r->used) { /* still armed (a one-shot word that stored is gone) */
            uint64_t have = c ? c->avail : 0, need = have < n ? n - have : 1;
            if (need < e->need_min) e->need_min = need;
            if (e->bell_page) { /* as counters.c's need_publish_arm */
                if (need < atomic_load(&e->bell_page->need)) atomic_store(&e->bell_page->need, need);
                atomic_thread_fence(memory_order_seq_cst);
                if (atomic_load(&e->bell_page->sleeping) &&
                    atomic_load(&e->bell_page->pending) >= (int64_t)need)
                    kick(e);
            }
        }
    }
    leave_py(e);
    return rc;
}

static af_rel *rel_by_id(af_engine *e, int64_t id) {
    struct af_trigs *T = e->trig;
    if (!T) return NULL;
    for (uint32_t i = 0; i < T->rcap; i++)
        if (T->rel[i].used && T->rel[i].id == id) return &T->rel[i];
    return NULL;
}

int64_t afe_rel_fired(af_engine *e, int64_t id) {
    pthread_mutex_lock(&e->lock);
    af_rel *r = rel_by_id(e, id);
    int64_t v = r ? r->fired : -FI_ENOENT;
    pthread_mutex_unlock(&e->lock);
    return v;
}

int64_t afe_rel_disarm(af_engine *e, int64_t id) {
    enter_py(e);
    af_rel *r = rel_by_id(e, id);
    int64_t v = r ? r->fired : -FI_ENOENT;
    if (r) {
        e->rel_armed--;
        e->armed--;
        need_raise(e);
        publish_waiting(e);
        r->used = 0;
    }
    leave_py(e);
    return v;
}

/* ------------------------------------------------------------------ triggered batches */

static void trig_drop(struct af_trigs *T, af_trig *tr) {
    tr->used = 0;
    T->armed--;
}

/* Fire tr (both locks held): reset the word, post the batch, report at once
 * what ended inside the call. */
static void trig_fire(af_engine *e, struct af_trigs *T, af_trig *tr) {
    if (tr->repeat && tr->fires)
        for (uint64_t j = 0; j < tr->n; j++)
            if (tr->status[j]) { /* the last fire failed: its event said so; stop */
                trig_drop(T, tr);
                return;
            }
    if (tr->reset >= 0) word_store(tr->word, (uint32_t)tr->reset);
    if (tr->repeat) memset(tr->status, 0, sizeof(int32_t) * tr->n);
    uint32_t g = AF_NONE;
    int rc = batch_launch(e, tr->token, tr->tgts, tr->ntgt, tr->ents, tr->n, tr->status, &g);
    tr->fires++;
    atomic_store_explicit(&T->hot_until, now_ns() + T->spin_ns, memory_order_relaxed);
    if (rc == 0) {
        tr->inflight = 1;
        tr->opi = g;
        if (!tr->repeat) trig_drop(T, tr);
        return;
    }
    int32_t st = 0;
    if (rc < 0) {
        st = rc;
        for (uint64_t j = 0; j < tr->n; j++) tr->status[j] = rc; /* nothing went out */
    } else if (rc == 2) {
        for (uint64_t j = 0; j < tr->n && !st; j++) st = tr->status[j];
        if (!st) st = -FI_EIO;
    }
    push_event(e, AF_EV_OP, 0, st, 0, tr->token);
    if (!tr->repeat || st) trig_drop(T, tr);
}

/* Whether tr's last fire is still in flight (engine lock held): its group op
 * is live under its token. */
static int still_inflight(af_engine *e, af_trig *tr) {
    if (!tr->inflight) return 0;
    af_op *op = tr->opi < e->cap_ops ? &e->ops[tr->opi] : NULL;
    if (op && op->active && op->kind == OP_GROUP && op->token == tr->token) return 1;
    tr->inflight = 0;
    return 0;
}

/* A peer of tr that is gone: its errno (as the core fails posts to it), else 0. */
static int32_t dead_peer(af_engine *e, const af_trig *tr) {
    for (uint32_t t = 0; t < tr->ntgt; t++) {
        uint32_t p = tr->tgts[t].peer;
        if (p < e->npeers && e->peers[p].dead) return -e->peers[p].dead;
    }
    return 0;
}

/* One pass over the armed words (trigger lock held). Returns how many fired. */
static int trig_pass(af_engine *e, struct af_trigs *T, int check) {
    int fired = 0;
    for (uint32_t i = 0; i < T->cap; i++) {
        af_trig *tr = &T->t[i];
        if (!tr->used) continue;
        int hit = reached(__atomic_load_n(tr->word, __ATOMIC_ACQUIRE), tr->value);
        if (!hit && !check) continue;
        atomic_store_explicit(&e->watcher_wants, 1, memory_order_relaxed);
        pthread_mutex_lock(&e->lock);
        atomic_store_explicit(&e->watcher_wants, 0, memory_order_relaxed);
        atomic_store_explicit(&e->watcher_held, 1, memory_order_relaxed);
        if (still_inflight(e, tr)) {
            atomic_store_explicit(&e->watcher_held, 0, memory_order_relaxed);
            pthread_mutex_unlock(&e->lock);
            continue;
        }
        int32_t dead = dead_peer(e, tr);
        if (dead) {
            for (uint64_t j = 0; j < tr->n; j++) tr->status[j] = dead;
            push_event(e, AF_EV_OP, 0, dead, 0, tr->token);
            trig_drop(T, tr);
        } else if (hit) {
            trig_fire(e, T, tr);
            fired++;
        }
        atomic_store_explicit(&e->watcher_held, 0, memory_order_relaxed);
        pthread_mutex_unlock(&e->lock);
    }
    return fired;
}

static void *trig_main(void *arg) {
    af_engine *e = arg;
    struct af_trigs *T = e->trig;
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
    prctl(PR_SET_NAME, "af-trigger", 0, 0, 0);
    uint32_t polls = 0;
    uint64_t t_check = 0;
    while (!atomic_load(&T->stop)) {
        uint64_t t = now_ns();
        int check = t - t_check >= AF_TRIG_CHECK_NS;
        if (check) t_check = t;
        pthread_mutex_lock(&T->lock);
        uint32_t armed = T->armed;
        if (armed) trig_pass(e, T, check);
        pthread_mutex_unlock(&T->lock);
        polls++;
        uint64_t ns;
        if (!armed) {
            ns = 100000000ull; /* nothing armed: an arm kicks us */
        } else if (t < atomic_load_explicit(&T->hot_until, memory_order_relaxed)) {
            if ((polls & 31) == 0) sched_yield(); /* let a just-woken thread have the core */
            else cpu_relax();
            continue;
        } else {
            ns = T->nap_ns;
        }
        struct pollfd pfd = {T->wake_fd, POLLIN, 0};
        struct timespec ts = {(time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull)};
        if (ppoll(&pfd, 1, &ts, NULL) > 0) {
            uint64_t v;
            if (read(T->wake_fd, &v, sizeof v) < 0) { /* drained already */ }
        }
    }
    return NULL;
}

static af_trig *trig_by_token(struct af_trigs *T, uint64_t token) {
    for (uint32_t i = 0; i < T->cap; i++)
        if (T->t[i].used && T->t[i].token == token) return &T->t[i];
    return NULL;
}

int afe_trig_arm(af_engine *e, uint64_t token, uint32_t *word, uint32_t value, int64_t reset,
                 int repeat, const af_btgt *tgts, uint32_t ntgt, const af_bent *ents, uint64_t n,
                 int32_t *status, uint64_t spin_ns, uint64_t nap_ns) {
    if (!word || ((uintptr_t)word & 3) || !status || reset > (int64_t)UINT32_MAX) return -FI_EINVAL;
    pthread_mutex_lock(&e->lock);
    struct af_trigs *T = trigs(e);
    pthread_mutex_unlock(&e->lock);
    if (!T) return -FI_ENOMEM;
    pthread_mutex_lock(&T->lock);
    enter_py(e);
    uint32_t runs;
    int rc = batch_check(e, tgts, ntgt, ents, n, &runs);
    if (!rc && trig_by_token(T, token)) rc = -FI_EBUSY;
    af_trig *tr = NULL;
    for (uint32_t i = 0; !rc && i < T->cap && !tr; i++)
        if (!T->t[i].used) tr = &T->t[i];
    if (!rc && !tr) {
        uint32_t ncap = T->cap ? T->cap * 2 : 8;
        af_trig *nt = realloc(T->t, sizeof(af_trig) * ncap);
        if (!nt) rc = -FI_ENOMEM;
        else {
            memset(nt + T->cap, 0, sizeof(af_trig) * (ncap - T->cap));
            tr = &nt[T->cap];
            T->t = nt;
            T->cap = ncap;
        }
    }
    if (!rc && !T->started) {
        T->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (T->wake_fd < 0 || pthread_create(&T->thr, NULL, trig_main, e)) {
            if (T->wake_fd >= 0) close(T->wake_fd);
            T->wake_fd = -1;
            rc = -FI_EOTHER;
        } else {
            T->started = 1;
        }
    }
    if (!rc) {
        memset(tr, 0, sizeof *tr);
        tr->used = 1;
        tr->repeat = repeat;
        tr->token = token;
        tr->word = word;
        tr->value = value;
        tr->reset = reset;
        tr->tgts = tgts;
        tr->ntgt = ntgt;
        tr->ents = ents;
        tr->n = n;
        tr->status = status;
        tr->opi = AF_NONE;
        T->armed++;
        T->spin_ns = spin_ns;
        T->nap_ns = nap_ns ? nap_ns : 1000;
        atomic_store_explicit(&T->hot_until, now_ns() + spin_ns, memory_order_relaxed);
        uint64_t one = 1;
        if (write(T->wake_fd, &one, sizeof one) < 0) { /* saturated: it wakes anyway */ }
    }
    leave_py(e);
    pthread_mutex_unlock(&T->lock);
    return rc;
}

int afe_trig_disarm(af_engine *e, uint64_t token) {
    struct af_trigs *T = e->trig;
    if (!T) return -FI_ENOENT;
    pthread_mutex_lock(&T->lock);
    af_trig *tr = trig_by_token(T, token);
    int rc = -FI_ENOENT;
    if (tr) {
        pthread_mutex_lock(&e->lock);
        rc = still_inflight(e, tr);
        pthread_mutex_unlock(&e->lock);
        trig_drop(T, tr);
    }
    pthread_mutex_unlock(&T->lock);
    return rc;
}

int64_t afe_trig_fires(af_engine *e, uint64_t token) {
    struct af_trigs *T = e->trig;
    if (!T) return -FI_ENOENT;
    pthread_mutex_lock(&T->lock);
    af_trig *tr = trig_by_token(T, token);
    int64_t v = tr ? tr->fires : -FI_ENOENT;
    pthread_mutex_unlock(&T->lock);
    return v;
}

/* Engine close (afe_close, before anything is torn down): stop the watcher and
 * forget every trigger and release word; no word is touched after this. */
void trig_stop(af_engine *e) {
    struct af_trigs *T = e->trig;
    if (!T) return;
    if (T->started) {
        atomic_store(&T->stop, 1);
        uint64_t one = 1;
        if (write(T->wake_fd, &one, sizeof one) < 0) { /* it wakes within its nap anyway */ }
        pthread_join(T->thr, NULL);
        close(T->wake_fd);
    }
    pthread_mutex_lock(&e->lock);
    e->armed -= e->rel_armed;
    e->rel_armed = 0;
    e->trig = NULL;
    pthread_mutex_unlock(&e->lock);
    pthread_mutex_destroy(&T->lock);
    free(T->t);
    free(T->rel);
    free(T);
}
