/* The event ring Python drains, and the two eventfds: notify (Python's event
 * loop waits on it) and wake (the progress thread's nap). push_event, the hot
 * part, is inline in afint.h. */
#include "afint.h"

void ev_grow(af_engine *e) {
    uint32_t ncap = e->ev_cap * 2;
    af_event *n = malloc(sizeof(af_event) * ncap);
    if (!n) abort(); /* losing an event would hang a waiter forever */
    for (uint32_t i = 0; i < e->ev_count; i++) n[i] = e->ev[(e->ev_head + i) & (e->ev_cap - 1)];
    free(e->ev);
    e->ev = n;
    e->ev_cap = ncap;
    e->ev_head = 0;
}

void ev_notify(af_engine *e) {
    uint64_t one = 1;
    if (write(e->notify_fd, &one, sizeof one) < 0) { /* counter saturated: already readable */ }
    e->st.wakeups++;
}

void kick(af_engine *e) {
    uint64_t one = 1;
    if (write(e->wake_fd, &one, sizeof one) < 0) { /* a full counter already wakes it */ }
    for (int i = 0; i < e->nworkers; i++)
        if (e->wk[i].started && write(e->wk[i].wake_fd, &one, sizeof one) < 0) { /* as above */ }
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

/* The leading run of plain ends (an op event, status 0, not held): their
 * tokens, up to `max`; anything else stays queued for afe_drain. */
int afe_take_done(af_engine *e, uint64_t *tokens, int max) {
    if (!__atomic_load_n(&e->ev_count, __ATOMIC_RELAXED)) return 0;
    pthread_mutex_lock(&e->lock);
    int n = 0;
    while (n < max && e->ev_count) {
        const af_event *ev = &e->ev[e->ev_head];
        if (ev->kind != AF_EV_OP || ev->status || ev->len) break;
        tokens[n++] = ev->token;
        e->ev_head = (e->ev_head + 1) & (e->ev_cap - 1);
        e->ev_count--;
    }
    pthread_mutex_unlock(&e->lock);
    return n;
}

int afe_nevents(af_engine *e) { return (int)__atomic_load_n(&e->ev_count, __ATOMIC_RELAXED); }

int afe_notify_fd(af_engine *e) { return e->notify_fd; }

int afe_kick(af_engine *e) {
    kick(e);
    return 0;
}
