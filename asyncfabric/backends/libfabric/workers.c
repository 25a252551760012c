/* Workers: several progress threads, each owning some of the engine's domains.
 *
 * With policy.workers = W > 1 (and W <= domains), worker i owns the domains d
 * with d % W == i, in place of progress.c's one thread: it alone reads their
 * completion queues, so CQ processing (and, on shm, the copying a target does
 * while it progresses) runs on W cores. Worker 0 also retries queued posts
 * and runs peer failure detection.
 *
 * Locks. Each domain has a lock, held for every libfabric call on it; a worker
 * holds its domains' locks only across its CQ reads and never while it takes
 * the engine lock, which guards the tables (ops, counters, events) as before.
 * The completions a read returned are handled under the engine lock, once
 * per batch of up to 64. Whoever holds both takes the engine lock first.
 * A post from Python only tries a domain's lock: when its worker is reading,
 * the op is queued and worker 0 posts it (lazy submission from the poll loop).
 *
 * Sleep. A worker with nothing to do spins for spin_ns, then naps on its own
 * eventfd (kick() rings every worker) for busy_block_ns while anything is in
 * flight or armed, idle_block_ns otherwise. The doorbell of same-host peers
 * is not used in this mode: the naps bound how late an arrival is seen.
 * Workers are meant for machines with cores to spare; on two cores keep one.
 */
#include "afint.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>

/* Read a batch from domain d under its lock, handle it under the engine lock. */
static int worker_poll(af_engine *e, af_dom *d) {
    struct fi_cq_data_entry ents[64];
    struct fi_cq_err_entry err;
    int total = 0;
    for (;;) {
        int have_err = 0;
        if (!qlock_free_soon(d->own_qlock)) break; /* held by a poster, maybe a dead one (qlock.h) */
        pthread_mutex_lock(&d->lock);
        ssize_t n = fi_cq_read(d->cq, ents, 64);
        if (n == -FI_EAVAIL) {
            memset(&err, 0, sizeof err);
            have_err = fi_cq_readerr(d->cq, &err, 0) >= 0;
        }
        pthread_mutex_unlock(&d->lock);
        if (n == -FI_EAGAIN) {
            if (d->rx_retry || d->owe_head != AF_NONE) {
                eng_lock(e);
                cq_handle(e, d, ents, 0); /* receive buffers to repost, owed immediates */
                pthread_mutex_unlock(&e->lock);
            }
            break;
        }
        eng_lock(e);
        if (n > 0) {
            cq_handle(e, d, ents, n);
        } else if (have_err) {
            cq_hook_error(e, (int)(d - e->dom), &err);
        } else if (n != -FI_EAVAIL) {
            push_event(e, AF_EV_FATAL, (uint32_t)(d - e->dom), (int32_t)n, 0, 0);
        }
        pthread_mutex_unlock(&e->lock);
        if (n < 0 && n != -FI_EAVAIL) break;
        total += n > 0 ? (int)n : 1;
        if (n >= 0 && n < 64) break;
    }
    return total;
}

static void *worker_main(void *arg) {
    af_worker *w = arg;
    af_engine *e = w->e;
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
    char name[16]; /* seen in top -H and /proc/PID/task/TID/comm */
    snprintf(name, sizeof name, "af-worker-%d", w->id);
    prctl(PR_SET_NAME, name, 0, 0, 0);
    pin_thread(w->cpu);
    uint64_t last = now_ns();
    uint32_t idle = 0;
    while (!atomic_load(&e->stop)) {
        int n = 0;
        for (int d = 0; d < e->ndom; d++)
            if (e->dom[d].owner == w->id) n += worker_poll(e, &e->dom[d]);
        n += wq_pass(e, w);
        if (w->id == 0) {
            eng_lock(e);
            if (e->pend_head != AF_NONE) n += pump_pending(e);
            peer_watch(e);
            pthread_mutex_unlock(&e->lock);
        }
        uint64_t t = now_ns();
        if (n > 0) {
            last = t;
            continue;
        }
        if (t - last < e->pol.spin_ns) {
            if ((++idle & 31) == 0) sched_yield();
            else cpu_relax();
            continue;
        }
        /* unlocked reads: a stale value only picks the other nap */
        uint64_t ns = (__atomic_load_n(&e->live_ops, __ATOMIC_RELAXED) ||
                       __atomic_load_n(&e->armed, __ATOMIC_RELAXED))
                          ? e->pol.busy_block_ns
                          : e->pol.idle_block_ns;
        struct pollfd pfd = {w->wake_fd, POLLIN, 0};
        struct timespec ts = {(time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull)};
        /* Say we nap, then look at the queue once more: a poster that queued
         * before the flag is seen here, one after it rings (workers_wake). */
        atomic_store(&w->napping, 1);
        atomic_thread_fence(memory_order_seq_cst);
        if (wq_waiting(e, w)) {
            atomic_store(&w->napping, 0);
            last = now_ns();
            continue;
        }
        e->st.blocks++;
        if (ppoll(&pfd, 1, &ts, NULL) > 0) {
            uint64_t v;
            if (read(w->wake_fd, &v, sizeof v) < 0) { /* drained already */ }
        }
        atomic_store(&w->napping, 0);
        last = now_ns();
    }
    return NULL;
}

int workers_start(af_engine *e) {
    int nw = (int)e->pol.workers;
    for (int i = 0; i < nw; i++) e->wk[i].ndoms = 0;
    for (int d = 0; d < e->ndom; d++) {
        af_worker *w = &e->wk[d % nw];
        e->dom[d].owner = d % nw;
        w->doms[w->ndoms++] = d;
    }
    e->nworkers = nw; /* from here on, posts and reads take the domain locks */
    for (int i = 0; i < nw; i++) {
        af_worker *w = &e->wk[i];
        w->e = e;
        w->id = i;
        w->cpu = e->pol.ncpus ? e->pol.cpus[i % e->pol.ncpus] : -1;
        w->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        w->pc = calloc(AF_WQ_PIECES, sizeof *w->pc);
        w->npc = 0;
        if (w->wake_fd < 0 || !w->pc || pthread_create(&w->thr, NULL, worker_main, w)) {
            if (w->wake_fd >= 0) close(w->wake_fd);
            free(w->pc);
            w->pc = NULL;
            atomic_store(&e->stop, 1);
            workers_stop(e);
            atomic_store(&e->stop, 0);
            e->nworkers = 0;
            return -FI_EOTHER;
        }
        w->started = 1;
    }
    return 0;
}

/* Work was queued for the workers (lock held): wake those that nap. */
void workers_wake(af_engine *e) {
    atomic_thread_fence(memory_order_seq_cst);
    uint64_t one = 1;
    for (int i = 0; i < e->nworkers; i++)
        if (atomic_load_explicit(&e->wk[i].napping, memory_order_relaxed) && e->wk[i].started &&
            write(e->wk[i].wake_fd, &one, sizeof one) < 0) { /* a full counter wakes it already */ }
}

void workers_stop(af_engine *e) {
    kick(e);
    for (int i = 0; i < e->nworkers; i++) {
        af_worker *w = &e->wk[i];
        if (!w->started) continue;
        pthread_join(w->thr, NULL);
        close(w->wake_fd);
        free(w->pc);
        w->pc = NULL;
        w->started = 0;
    }
}
