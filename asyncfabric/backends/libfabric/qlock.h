/* Posting to a shm endpoint whose queue lock a dead process holds (qlock.c).
 *
 * libfabric 1.17's shm provider guards each endpoint's region with a
 * process-shared spin lock that lives in the region itself. A post to a peer
 * takes the peer's lock in the posting thread; the owner takes its own lock
 * in its progress (fi_cq_read). A process SIGKILLed while holding one leaves
 * it held for good, and every later post to that region, or its owner's next
 * progress, spins inside libfabric where no timeout of ours reaches it.
 *
 * So the core looks before it calls: it maps the first page of each shm
 * peer's region (read-only) and of its own regions, and reads the lock word
 * before a post or a CQ read. Free (the common case: one load), it calls
 * libfabric. Held, it does not: a post waits outside libfabric, yielding,
 * and fails with ESRCH once the peer's process has exited (the watch's
 * pidfd, afpeer.c, open until the engine closes) or ENOLCK once the lock
 * stayed held for the bound (a live peer whose lock a dead third process
 * holds); a CQ read is skipped for this pass. What is left is the instant between seeing the lock free and
 * libfabric taking it.
 *
 * The region's layout is libfabric's, not a public API: the guard is on only
 * where the running libfabric is 1.17 and the mapped header says region
 * version 4 and the expected pid. Elsewhere every word is NULL and nothing
 * is checked.
 *
 * Internal: included through afint.h (AF_INTERNAL, cpu_relax and now_ns come from there).
 */
#ifndef AF_QLOCK_H
#define AF_QLOCK_H

#include <stdint.h>

/* The value of an unlocked pthread spin lock on this libc (1 on x86-64
 * glibc, 0 on the generic one), learned once; -1 until then. */
AF_INTERNAL extern int af_qlock_free;

/* Once per process: whether the guard can be on (the running libfabric's
 * region layout is the one this file knows). */
AF_INTERNAL int qlock_init(void);

/* Map the lock word of the shm region `name` (an endpoint address of ours:
 * "af-..."), owned by process `pid` (0: any). NULL where the guard is off or
 * the region is not one we know; *map gets what qlock_unmap releases. */
AF_INTERNAL const volatile int *qlock_map(const char *name, size_t len, int32_t *pid, void **map);
AF_INTERNAL void qlock_unmap(void *map);

/* The slow path: wait outside libfabric while `word` is held. 0: free now;
 * -ESRCH: the process behind `pidfd` exited; -ENOLCK: held for bound_ns. */
AF_INTERNAL int qlock_wait(const volatile int *word, int pidfd, uint64_t bound_ns);

/* Before a post into the region of `word`: 0 to go on, or the errno to fail with. */
static inline int qlock_check(const volatile int *word, int pidfd, uint64_t bound_ns) {
    if (!word || *word == af_qlock_free) return 0;
    return qlock_wait(word, pidfd, bound_ns);
}

/* Before reading a CQ whose progress takes `word`: whether it is free, now
 * or after a short spin (a live poster holds it for a moment). */
static inline int qlock_free_soon(const volatile int *word) {
    if (!word || *word == af_qlock_free) return 1;
    for (int i = 0; i < 256; i++) {
        if (*word == af_qlock_free) return 1;
        cpu_relax();
    }
    return 0;
}

#endif
