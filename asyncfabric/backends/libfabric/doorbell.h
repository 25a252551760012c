/* Doorbells: waking a sleeping engine on the same host.
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
 */
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#define AF_BELL_MAGIC 0x6c6c6562666661ull /* "affbell" */
#define AF_BELL_PREFIX "asyncfabric-bell-"

typedef struct af_bell_page {
    _Atomic uint32_t sleeping;
    _Atomic uint32_t waiting; /* the engine has armed counters: arrivals matter now */
    uint32_t pid;
    uint32_t pidns; /* low 32 bits of the pid namespace's inode: lets shmname.h reclaim the page */
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

static uint64_t bell_hash(const void *p, size_t n) {
    const uint8_t *b = p;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

static void bell_names(uint64_t tag, char *shm, size_t nshm, struct sockaddr_un *sa, socklen_t *alen) {
    snprintf(shm, nshm, "/" AF_BELL_PREFIX "%016llx", (unsigned long long)tag);
    memset(sa, 0, sizeof *sa);
    sa->sun_family = AF_UNIX;
    int n = snprintf(sa->sun_path + 1, sizeof sa->sun_path - 1, AF_BELL_PREFIX "%016llx",
                     (unsigned long long)tag);
    *alen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)n);
}

/* Create this engine's doorbell. Failure is not fatal: the engine then relies
 * on its nap timeout alone. */
static int bell_create(uint64_t tag, uint32_t pidns, af_bell_page **page, int *fd, char *shm_name,
                       size_t nshm) {
    struct sockaddr_un sa;
    socklen_t alen;
    bell_names(tag, shm_name, nshm, &sa, &alen);
    int s = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s < 0) return -1;
    if (bind(s, (struct sockaddr *)&sa, alen)) {
        close(s);
        return -1;
    }
    int m = shm_open(shm_name, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
    if (m < 0) {
        close(s);
        return -1;
    }
    void *p = MAP_FAILED;
    if (ftruncate(m, 4096) == 0) p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, m, 0);
    close(m);
    if (p == MAP_FAILED) {
        shm_unlink(shm_name);
        close(s);
        return -1;
    }
    *page = p;
    (*page)->pid = (uint32_t)getpid();
    (*page)->pidns = pidns;
    (*page)->magic = AF_BELL_MAGIC;
    *fd = s;
    return 0;
}

static void bell_destroy(af_bell_page *page, int fd, const char *shm_name) {
    if (page) {
        munmap(page, 4096);
        shm_unlink(shm_name);
    }
    if (fd >= 0) close(fd);
}

static void bell_open_peer(uint64_t tag, af_bell *b) {
    char name[64];
    memset(b, 0, sizeof *b);
    bell_names(tag, name, sizeof name, &b->addr, &b->alen);
    int m = shm_open(name, O_RDWR | O_CLOEXEC, 0);
    if (m < 0) return;
    struct stat st;
    void *p = MAP_FAILED;
    if (fstat(m, &st) == 0 && st.st_size >= 4096)
        p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, m, 0);
    close(m);
    if (p == MAP_FAILED) return;
    if (((af_bell_page *)p)->magic != AF_BELL_MAGIC) {
        munmap(p, 4096);
        return;
    }
    b->page = p;
}

static void bell_close_peer(af_bell *b) {
    if (b->page) munmap(b->page, 4096);
    b->page = NULL;
}

/* After posting to a peer: wake it if it sleeps. Returns 1 if it rang. */
static int bell_ring(int txfd, af_bell *b) {
    if (!b->page || txfd < 0) return 0;
    atomic_thread_fence(memory_order_seq_cst);
    if (!atomic_load_explicit(&b->page->sleeping, memory_order_relaxed)) return 0;
    char c = 0;
    sendto(txfd, &c, 1, MSG_DONTWAIT, (struct sockaddr *)&b->addr, b->alen);
    return 1;
}

static void bell_drain(int fd) {
    char buf[64];
    while (recv(fd, buf, sizeof buf, MSG_DONTWAIT) > 0) {
    }
}
