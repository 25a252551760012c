/* shm region names of our own, and sweeping dead processes' leftovers (shmname.h says why). */
#include "afint.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>

#define AF_SHM_PREFIX "af-"

uint64_t af_pidns(void) {
    struct stat st;
    return stat("/proc/self/ns/pid", &st) == 0 ? (uint64_t)st.st_ino : 0;
}

void af_shm_name(char *out, size_t n, uint64_t rnd) {
    snprintf(out, n, AF_SHM_PREFIX "%llx-%d-%016llx", (unsigned long long)af_pidns(), (int)getpid(),
             (unsigned long long)rnd);
}

static int af_pid_gone(long pid) { return pid > 0 && kill((pid_t)pid, 0) < 0 && errno == ESRCH; }

/* A doorbell page whose owner, in this pid namespace, is gone. */
static int af_stale_bell(const char *name, uint32_t ns32) {
    char path[300];
    snprintf(path, sizeof path, "/%s", name);
    int fd = shm_open(path, O_RDONLY | O_CLOEXEC, 0);
    if (fd < 0) return 0;
    struct stat st;
    af_bell_page pg;
    int stale = fstat(fd, &st) == 0 && st.st_size >= (off_t)sizeof pg &&
                pread(fd, &pg, sizeof pg, 0) == (ssize_t)sizeof pg && pg.magic == AF_BELL_MAGIC &&
                pg.pidns == ns32 && ns32 && af_pid_gone((long)pg.pid);
    close(fd);
    return stale;
}

int af_shm_sweep(void) {
    uint64_t ns = af_pidns();
    if (!ns) return 0;
    DIR *dir = opendir("/dev/shm");
    if (!dir) return 0;
    int n = 0;
    struct dirent *de;
    while ((de = readdir(dir)) != NULL) {
        const char *name = de->d_name;
        int stale = 0;
        if (!strncmp(name, AF_SHM_PREFIX, strlen(AF_SHM_PREFIX))) {
            unsigned long long fns, rnd;
            long pid;
            char tail;
            stale = sscanf(name, AF_SHM_PREFIX "%llx-%ld-%16llx%c", &fns, &pid, &rnd, &tail) == 3 &&
                    fns == ns && pid != (long)getpid() && af_pid_gone(pid);
        } else if (!strncmp(name, AF_BELL_PREFIX, strlen(AF_BELL_PREFIX))) {
            stale = af_stale_bell(name, (uint32_t)ns);
        }
        if (stale) {
            char path[300];
            snprintf(path, sizeof path, "/%s", name);
            if (shm_unlink(path) == 0) n++;
        }
    }
    closedir(dir);
    return n;
}
