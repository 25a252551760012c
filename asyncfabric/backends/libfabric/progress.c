/* Progress: one pass over every domain (completions, queued posts, peer
 * watch), the progress thread that runs it and sleeps between passes, and the
 * Python thread's spins that run it instead while Python is busy. */
#include "afint.h"

#include <poll.h>
#include <sys/prctl.h>

int progress_locked(af_engine *e) {
    int n = 0;
    /* With workers each domain is its worker's to progress: on shm reading a
     * CQ runs the copies of arriving writes, which from here would run under
     * the engine lock and stop every worker (workers.c). */
    if (e->nworkers < 2)
        for (int i = 0; i < e->ndom; i++) n += progress_dom(e, &e->dom[i]);
    /* Posting queued work counts as progress: the caller keeps polling
     * instead of napping while a full queue drains. */
    if (e->pend_head != AF_NONE) n += pump_pending(e);
    peer_watch(e);
    return n;
}

static int block(af_engine *e, uint64_t ns, uint64_t gen_seen) {
    struct pollfd pfd[AF_MAX_DOMS + 2];
    int n = 0;
    pfd[n].fd = e->wake_fd;
    pfd[n++].events = POLLIN;
    eng_lock(e);
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

/* Whether the pollers (the progress thread, a Python spin) make way for the
 * trigger watcher (afint.h): they do not take the lock while it waits for it,
 * and the progress thread retries while it holds it instead of standing aside
 * for a whole py_hold as for Python. On with four or more CPUs: on the 16-core
 * GPU machine it made the cuda_ipc paths 7-23 % faster (benchmarks/GPU.md,
 * 2026-12-07, late); on 2 cores it measured slower (trigger_latency.py:
 * standing aside gives the watcher, the event loop and the peer the cores).
 * ASYNCFABRIC_WATCHER_YIELD=0 or 1 decides either way. */
static int g_yield = -1;

int watcher_yield(void) {
    if (g_yield < 0) {
        const char *v = getenv("ASYNCFABRIC_WATCHER_YIELD");
        g_yield = v && *v ? *v != '0' : sysconf(_SC_NPROCESSORS_ONLN) >= 4;
    }
    return g_yield;
}

/* Let a trigger watcher that waits for the lock have it first. */
static inline void make_way(af_engine *e) {
    while (atomic_load_explicit(&e->watcher_wants, memory_order_relaxed) && watcher_yield())
        sched_yield();
}

/* How long the progress thread may sleep. Transfers of ours in flight: short
 * naps (queued posts to retry, peers to watch). Only counters armed: arrivals
 * that matter ring the doorbell when every writer is a peer on this host (a
 * host_only provider, quirks.h), so the nap is the idle one; on other
 * providers the wait fds wake us, and the short nap stays as a backstop. */
static uint64_t nap_ns(af_engine *e) {
    if (e->live_ops > 0) return e->pol.busy_block_ns;
    if (e->armed > 0 && !(e->all_local && e->bell_page)) return e->pol.busy_block_ns;
    return e->pol.idle_block_ns;
}

static void *progress_main(void *arg) {
    af_engine *e = arg;
    int slot = 0;
    /* Naps of tens of microseconds mean nothing with Linux's default 50 us
     * timer slack. */
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
    prctl(PR_SET_NAME, "af-progress", 0, 0, 0); /* seen in top -H */
    if (e->pol.ncpus) pin_thread(e->pol.cpus[0]);
    uint64_t last = now_ns();
    uint32_t idle_polls = 0;
    while (!atomic_load(&e->stop)) {
        uint64_t until = atomic_load_explicit(&e->py_until, memory_order_relaxed);
        int hooked = atomic_load_explicit(&e->hook_held, memory_order_relaxed);
        if (hooked || atomic_load(&e->spinners) || until > now_ns()) {
            /* The Python thread is polling the CQs itself (spinning in a wait,
             * or posting and reaping); two pollers on two cores would only
             * fight. Stay out of its way, waking if it says it goes idle. The
             * same while C code outside the core holds the native hook (the
             * raw benchmark loop, for a whole stream): sleep until
             * hook_unlock kicks us, not a wake-up every 20 us. */
            drop_spin_slot(&slot);
            atomic_store(&e->sleeping, 2); /* standing aside: posts need not kick us */
            struct pollfd pfd = {e->wake_fd, POLLIN, 0};
            /* Sleep until Python's hold ends (afe_release kicks us earlier). */
            uint64_t t = now_ns(), wait = hooked ? e->pol.idle_block_ns : until > t ? until - t : 20000;
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
        make_way(e);
        if (pthread_mutex_trylock(&e->lock)) {
            if (atomic_load_explicit(&e->watcher_held, memory_order_relaxed) && watcher_yield()) {
                /* The trigger watcher, for one fire: microseconds, and it
                 * reaps nothing. Standing aside (as for Python, below) would
                 * leave arrivals unpolled for a whole py_hold after each fire
                 * (docs/gpu.md, "Who polls"). Try again, yielding the core: a
                 * bare spin could keep the watcher from running on it. */
                sched_yield();
                continue;
            }
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

void pin_thread(int cpu) {
    if (cpu < 0 || cpu >= CPU_SETSIZE) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set); /* a CPU we may not use: left as is */
}

int afe_start(af_engine *e, const af_policy *policy) {
    if (e->started) return -FI_EALREADY;
    e->pol = *policy;
    if (e->pol.ncpus > 16) e->pol.ncpus = 16;
    if (e->pol.workers > 1) {
        if ((int)e->pol.workers > e->ndom) return -FI_EINVAL;
        int rc = workers_start(e);
        if (rc) return rc;
        e->started = 1;
        return 0;
    }
    if (pthread_create(&e->thr, NULL, progress_main, e)) return -FI_EOTHER;
    e->started = 1;
    return 0;
}

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
        make_way(e);
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

/* Python goes idle (about to block in its event loop): hand polling back. */
void afe_release(af_engine *e) {
    atomic_store_explicit(&e->py_until, 0, memory_order_relaxed);
    if (atomic_load(&e->sleeping)) kick(e);
}
