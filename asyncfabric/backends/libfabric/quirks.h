/* Provider quirks: everything the core does differently per libfabric
 * provider, looked up in one table (quirks.c) instead of provider names
 * compared where the difference bites.
 *
 * Internal: included through afint.h (AF_INTERNAL comes from there).
 */
#ifndef AF_QUIRKS_H
#define AF_QUIRKS_H

typedef struct af_quirks {
    /* Never fi_inject* (d->inject = 0): every transfer takes a completion. */
    unsigned no_inject : 1;
    /* Name the endpoint's shared-memory region ourselves (fi_setname; shmname.h). */
    unsigned own_name : 1;
    /* Before opening: unlink what dead processes of this host left in /dev/shm. */
    unsigned sweep_shm : 1;
    /* Every peer is a process on this host that rings our doorbell when an
     * arrival matters (doorbell.h), so armed counters need no short naps. */
    unsigned host_only : 1;
    /* A plain write (no CQ data) is copied by the posting thread and placed
     * when it completes, while a write with CQ data is queued for the target
     * to copy: pieces carrying an immediate go as a plain write followed by a
     * zero-byte write with the immediate (cq.c, "Owed immediates"). Such a
     * write is not checked against the target's keys: only where the user
     * turns it on (ASYNCFABRIC_SHM_SENDER_COPY, docs/failure-semantics.md). */
    unsigned sender_copy : 1;
    /* Plain RMA (no CQ data) skips the target's key check: post it with
     * FI_DELIVERY_COMPLETE, which the target carries out (afint.h post_plain). */
    unsigned plain_unchecked : 1;
} af_quirks;

/* The quirks of provider `prov` ("tcp;ofi_rxm", "shm", ...): every table row
 * that matches it, merged. */
AF_INTERNAL af_quirks af_quirks_for(const char *prov);

/* Once per process, before its first fi_getinfo (libfabric reads some
 * environment variables only then): the table's process-wide fix-ups. */
AF_INTERNAL void af_quirks_init(void);

#endif
