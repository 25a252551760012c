/* The sender's own copy into a shm peer, for sender_copy (quirks.h).
 *
 * With sender_copy on, a piece that carries an immediate goes as a plain
 * write, which libfabric 1.17's shm copies from the posting thread with
 * process_vm_writev ("fast RMA"), and its immediate follows once that write
 * completed (cq.c, "Owed immediates"). But fast RMA holds the target's queue
 * lock for the whole copy (the target's progress spins on it meanwhile) and
 * still queues a command per write that the target must process. The copy
 * needs neither: it is one system call into the target's address space, as
 * UCX's CMA transport makes it. So the core makes it itself, holding no lock,
 * and queues the immediate at once on the owed list, which posts it as a
 * zero-byte write: one command per piece instead of two, and the target's
 * lock taken for a moment instead of for the copy. The trust is the same as
 * fast RMA's (no key check: the user turned sender_copy on for trusted peers).
 * ASYNCFABRIC_SHM_DIRECT_COPY=0 keeps fast RMA, for comparison.
 */
#include "afint.h"

#include <sys/uio.h>

int cma_put(af_dom *d, int32_t pid, const void *src, uint64_t len, uint64_t dst) {
    if (!d->direct_copy || pid <= 0) return 1;
    const uint8_t *s = src;
    uint64_t done = 0;
    while (done < len) {
        struct iovec l = {(void *)(s + done), (size_t)(len - done)};
        struct iovec r = {(void *)(uintptr_t)(dst + done), (size_t)(len - done)};
        ssize_t n = process_vm_writev(pid, &l, 1, &r, 1, 0);
        if (n > 0) {
            done += (uint64_t)n;
            continue;
        }
        int err = n < 0 ? errno : EFAULT;
        if (done == 0 && (err == EPERM || err == ENOSYS)) {
            d->direct_copy = 0; /* not allowed here (ptrace rules): libfabric's path from now on */
            return 1;
        }
        return -err; /* ESRCH: the peer exited; EFAULT: not mapped there */
    }
    return 0;
}
