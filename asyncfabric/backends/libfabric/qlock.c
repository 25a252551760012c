/* Looking at a shm region's queue lock before libfabric takes it (qlock.h says why). */
#include "afint.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/stat.h>

int af_qlock_free = -1;

/* The head of libfabric 1.17's struct smr_region (include/ofi_shm.h), up to
 * its lock: the only fields read here. */
typedef struct af_smr117_head {
    uint8_t version;
    uint8_t resv;
    uint16_t flags;
    int pid;
    uint8_t cma_cap_peer;
    uint8_t cma_cap_self;
    uint32_t max_sar_buf_per_peer;
    void *base_addr;
    pthread_spinlock_t lock;
} af_smr117_head;

#define AF_SMR117_VERSION 4
_Static_assert(offsetof(af_smr117_head, lock) == 24, "libfabric 1.17's smr_region layout (x86-64, aarch64)");

int qlock_init(void) {
    static int on = -1;
    if (on >= 0) return on;
    pthread_spinlock_t probe;
    pthread_spin_init(&probe, PTHREAD_PROCESS_SHARED);
    int v = *(const volatile int *)&probe;
    pthread_spin_destroy(&probe);
    af_qlock_free = v;
    /* the layout above is 1.17's; another libfabric leaves the guard off */
    uint32_t ver = fi_version();
    on = FI_MAJOR(ver) == 1 && FI_MINOR(ver) == 17 && sizeof(pthread_spinlock_t) == sizeof(int);
    return on;
}

const volatile int *qlock_map(const char *name, size_t len, int32_t *pid, void **map) {
    *map = NULL;
    if (!qlock_init() || !name) return NULL;
    size_t n = strnlen(name, len);
    if (n == 0 || n >= 250 || n == len || strncmp(name, "af-", 3)) return NULL; /* not a name of ours */
    char path[256];
    snprintf(path, sizeof path, "/%s", name);
    int fd = shm_open(path, O_RDONLY | O_CLOEXEC, 0);
    if (fd < 0) return NULL;
    struct stat st;
    void *m = MAP_FAILED;
    if (fstat(fd, &st) == 0 && st.st_size >= (off_t)sizeof(af_smr117_head))
        m = mmap(NULL, sizeof(af_smr117_head), PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) return NULL;
    const volatile af_smr117_head *h = m;
    if (h->version != AF_SMR117_VERSION || (*pid && h->pid != *pid) || h->pid <= 0) {
        munmap(m, sizeof(af_smr117_head));
        return NULL;
    }
    *pid = h->pid;
    *map = m;
    return (const volatile int *)&h->lock;
}

void qlock_unmap(void *map) {
    if (map) munmap(map, sizeof(af_smr117_head));
}

static int exited(int pidfd) {
    if (pidfd < 0) return 0;
    struct pollfd pf = {.fd = pidfd, .events = POLLIN};
    return poll(&pf, 1, 0) > 0;
}

int qlock_wait(const volatile int *word, int pidfd, uint64_t bound_ns) {
    /* A live holder keeps it for a few hundred nanoseconds: spin a little. */
    for (int i = 0; i < 256; i++) {
        if (*word == af_qlock_free) return 0;
        cpu_relax();
    }
    uint64_t t0 = now_ns(), t_check = 0;
    for (;;) {
        if (*word == af_qlock_free) return 0;
        uint64_t t = now_ns();
        if (t - t_check >= 1000000ull) { /* is the owner gone? once a millisecond */
            t_check = t;
            if (exited(pidfd)) return -ESRCH;
        }
        if (t - t0 > bound_ns) return -ENOLCK;
        sched_yield(); /* a holder preempted on a busy core needs the CPU to let go */
    }
}
