/* The provider quirks table (quirks.h).
 *
 * A row matches a provider by name: exactly ("shm"), or as one layer of a
 * layered name ("tcp" matches "tcp" and "tcp;ofi_rxm"). Providers with no row
 * (efa, hardware verbs, rxm on its own) need nothing special in the core.
 * One difference is not per provider and stays where it is: afe_close drains
 * connection events for 20 ms before closing endpoints, for every provider
 * (rxm is the one known to crash otherwise; setup.c).
 */
#include "afint.h"

#include <dirent.h>

/* SoftRoCE (rxe) allows at most 32767 CQ entries, and verbs;ofi_rxm sizes its
 * MSG CQ from FI_UNIVERSE_SIZE (default 256), so fi_enable fails with EINVAL
 * there. libfabric reads the variable once, at its first fi_getinfo, so it is
 * set before any, when an rxe device exists and the user has not set it.
 * Hardware HCAs (mlx5: millions of CQEs) are unaffected. */
static void rxe_universe_size(void) {
    if (getenv("FI_UNIVERSE_SIZE")) return;
    DIR *dir = opendir("/sys/class/infiniband");
    if (!dir) return;
    struct dirent *de;
    while ((de = readdir(dir)) != NULL) {
        const char *dev = de->d_name;
        if (!strcmp(dev, ".") || !strcmp(dev, "..")) continue;
        char path[512], link[512];
        snprintf(path, sizeof path, "/sys/class/infiniband/%s/device/driver", dev);
        ssize_t n = readlink(path, link, sizeof link - 1);
        const char *drv = "";
        if (n > 0) {
            link[n] = 0;
            const char *slash = strrchr(link, '/');
            drv = slash ? slash + 1 : link;
        }
        if (!strncmp(dev, "rxe", 3) || !strcmp(drv, "rdma_rxe")) {
            setenv("FI_UNIVERSE_SIZE", "8", 0);
            break;
        }
    }
    closedir(dir);
}

typedef struct af_quirk_row {
    const char *name;
    int exact; /* 1: the whole provider name; 0: any ';'-separated layer of it */
    af_quirks q;
    void (*before_getinfo)(void); /* process-wide, once, before the first fi_getinfo */
} af_quirk_row;

static const af_quirk_row g_quirks[] = {
    /* shm: regions named by us (a SIGKILLed process's region would block its
     * pid's next owner), swept when opening, and only local peers, which ring
     * our doorbell (shm gives a sleeping target nothing to wait on). Its
     * writes with CQ data go through the target's progress thread, which does
     * the copy (process_vm_readv) and answers; a plain write of a host buffer
     * is copied by the sender itself (process_vm_writev, "fast RMA") and done
     * when the call returns: sender_copy, if the user asks for it. That copy
     * (and a plain read's) never looks at the target's registrations, so a
     * revoked key would still be written through: plain RMA goes with
     * FI_DELIVERY_COMPLETE, which takes the checked path (plain_unchecked). */
    {"shm", 1, {.own_name = 1, .sweep_shm = 1, .host_only = 1, .sender_copy = 1,
                .plain_unchecked = 1}, NULL},
    /* tcp (and tcp;ofi_rxm): no fi_inject*. libfabric 1.17's tcp provider
     * segfaults in fi_cq_read when a peer dies with injected writes queued to
     * it (reproduced by SIGKILLing a peer mid-stream), and an injected write
     * to a dead peer would "succeed" silently. Every tcp transfer takes a
     * completion instead (afpeer.c, docs/failure-semantics.md). */
    {"tcp", 0, {.no_inject = 1}, NULL},
    /* verbs (verbs;ofi_rxm) on SoftRoCE: a universe its CQs can hold. */
    {"verbs", 0, {0}, rxe_universe_size},
};

#define NQUIRKS (sizeof g_quirks / sizeof g_quirks[0])

static int has_layer(const char *prov, const char *name) {
    size_t n = strlen(name);
    for (const char *p = prov; p && *p;) {
        const char *end = strchr(p, ';');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len == n && !strncmp(p, name, n)) return 1;
        p = end ? end + 1 : NULL;
    }
    return 0;
}

af_quirks af_quirks_for(const char *prov) {
    af_quirks q = {0};
    for (size_t i = 0; i < NQUIRKS; i++) {
        const af_quirk_row *r = &g_quirks[i];
        if (r->exact ? strcmp(prov, r->name) != 0 : !has_layer(prov, r->name)) continue;
        q.no_inject |= r->q.no_inject;
        q.own_name |= r->q.own_name;
        q.sweep_shm |= r->q.sweep_shm;
        q.host_only |= r->q.host_only;
        q.sender_copy |= r->q.sender_copy;
        q.plain_unchecked |= r->q.plain_unchecked;
    }
    return q;
}

static pthread_once_t g_quirks_once = PTHREAD_ONCE_INIT;

static void quirks_init_once(void) {
    for (size_t i = 0; i < NQUIRKS; i++)
        if (g_quirks[i].before_getinfo) g_quirks[i].before_getinfo();
}

void af_quirks_init(void) { pthread_once(&g_quirks_once, quirks_init_once); }
