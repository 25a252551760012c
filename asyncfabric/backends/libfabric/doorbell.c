/* Doorbells: creating, mapping and draining them (doorbell.h says why). */
#include "afint.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

uint64_t bell_hash(const void *p, size_t n) {
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

int bell_create(uint64_t tag, uint32_t pidns, af_bell_page **page, int *fd, char *shm_name,
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

void bell_destroy(af_bell_page *page, int fd, const char *shm_name) {
    if (page) {
        munmap(page, 4096);
        shm_unlink(shm_name);
    }
    if (fd >= 0) close(fd);
}

void bell_open_peer(uint64_t tag, af_bell *b) {
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

void bell_close_peer(af_bell *b) {
    if (b->page) munmap(b->page, 4096);
    b->page = NULL;
}

void bell_drain(int fd) {
    char buf[64];
    while (recv(fd, buf, sizeof buf, MSG_DONTWAIT) > 0) {
    }
}
