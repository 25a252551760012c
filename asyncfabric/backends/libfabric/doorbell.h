/* Doorbells: waking a sleeping engine on the same host (doorbell.c).
 *
 * libfabric's shm provider needs the target to progress before a write is
 * complete or its immediate is seen, and gives the target nothing to sleep on.
 * So each engine publishes a one-page shared-memory flag, "I am asleep", and
 * sleeps in ppoll on a datagram socket in the abstract namespace. A writer
 * that posted to a sleeping peer sends it one byte. Both names derive from the
 * engine's domain-0 address, which every peer already has: no wire-format
 * change, and for a peer on another host the page simply does not exist.
 *
 * Ordering (a Dekker pair): the sleeper sets the flag, fences, then polls its
 * queues once more before sleeping; the writer posts, fences, then reads the
 * flag. One of the two always sees the other's work.
 *
 * Internal: included through afint.h (AF_INTERNAL comes from there).
 */
#ifndef AF_DOORBELL_H
#define AF_DOORBELL_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/un.h>

#define AF_BELL_MAGIC 0x6c6c6562666661ull /* "affbell" */
#define AF_BELL_PREFIX "asyncfabric-bell-"

typedef struct af_bell_page {
    _Atomic uint32_t sleeping;
    _Atomic uint32_t waiting; /* the engine has armed counters: arrivals matter now */
    uint32_t pid;
    uint32_t pidns; /* low 32 bits of the pid namespace's inode: lets shmname.c reclaim the page */
    uint64_t magic;
    /* While we sleep: how many immediates writers posted to us since we went to
     * sleep (they add), and how many arrivals our nearest armed counter still
     * needs (we publish it as we go to sleep). A writer rings when the sum
     * reaches the need, not on every write. A page of an older build has both
     * at 0 there (the page is zero-filled): its writers then ring as before. */
    _Atomic int64_t pending;
    _Atomic uint64_t need;
} af_bell_page;

typedef struct af_bell {
    af_bell_page *page; /* NULL: no doorbell (another host, or not an asyncfabric engine) */
    struct sockaddr_un addr;
    socklen_t alen;
} af_bell;

/* The tag both names derive from: a hash of the engine's domain-0 address. */
AF_INTERNAL uint64_t bell_hash(const void *p, size_t n);
/* Create this engine's doorbell. Failure (-1) is not fatal: the engine then
 * relies on its nap timeout alone. */
AF_INTERNAL int bell_create(uint64_t tag, uint32_t pidns, af_bell_page **page, int *fd,
                                char *shm_name, size_t nshm);
AF_INTERNAL void bell_destroy(af_bell_page *page, int fd, const char *shm_name);
/* Map a peer's page, if it has one on this host (b->page stays NULL otherwise). */
AF_INTERNAL void bell_open_peer(uint64_t tag, af_bell *b);
AF_INTERNAL void bell_close_peer(af_bell *b);
/* Read what woke us. */
AF_INTERNAL void bell_drain(int fd);

/* After posting to a peer: wake it if it sleeps. Returns 1 if it rang. On the
 * post path, so inline. */
static inline int bell_ring(int txfd, af_bell *b) {
    if (!b->page || txfd < 0) return 0;
    atomic_thread_fence(memory_order_seq_cst);
    if (!atomic_load_explicit(&b->page->sleeping, memory_order_relaxed)) return 0;
    char c = 0;
    sendto(txfd, &c, 1, MSG_DONTWAIT, (struct sockaddr *)&b->addr, b->alen);
    return 1;
}

#endif
