/* The immediate counter table (afint.h has the hot part: lookup, count, take)
 * and what the table publishes to writers on this host: whether anybody waits,
 * and how many arrivals the nearest waiter still needs (doorbell.h). */
#include "afint.h"

void ctr_grow(af_engine *e) {
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

void ctr_delete(af_engine *e, af_ctr *c) {
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

/* What writers compare their pending count with while we sleep (lock held). */
static uint64_t need_scan(af_engine *e, uint64_t t);

uint64_t need_now(af_engine *e, uint64_t t) {
    uint64_t m = need_scan(e, t);
    if (e->rel_armed) { /* release words wait too (triggers.c) */
        uint64_t r = rel_need(e);
        if (r < m) m = r;
    }
    return m;
}

static uint64_t need_scan(af_engine *e, uint64_t t) {
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
    eng_lock(e);
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
    if (e->rel_armed && rel_count(e, c)) { /* credited arrivals (the staged wrapper's) count too */
        leave_py(e);
        return;
    }
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
    eng_lock(e);
    uint64_t n = e->ctr_n;
    pthread_mutex_unlock(&e->lock);
    return n;
}
