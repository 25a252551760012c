/* Names of this host's shared-memory objects, and reclaiming those of dead
 * processes (shmname.c).
 *
 * libfabric 1.17's shm provider names an endpoint's region "<pid>:<dom>:<ep>"
 * and creates it with O_EXCL. A process killed with SIGKILL leaves its region
 * (16 MiB of tmpfs) in /dev/shm, and a later process that is given the same
 * pid cannot enable its endpoint. So each engine names its shm regions itself:
 * "af-<pidns>-<pid>-<random>", unique per endpoint, and saying whose it is.
 * Opening an engine unlinks the regions (and doorbell pages) that processes of
 * this pid namespace left behind when they died. Other names are never
 * touched: they belong to somebody else. (quirks.c says which providers.)
 *
 * Internal: included through afint.h (AF_INTERNAL comes from there).
 */
#ifndef AF_SHMNAME_H
#define AF_SHMNAME_H

#include <stddef.h>
#include <stdint.h>

/* The pid namespace's inode number: a pid means something only inside it. */
AF_INTERNAL uint64_t af_pidns(void);
/* The region name for one shm endpoint of this process. */
AF_INTERNAL void af_shm_name(char *out, size_t n, uint64_t rnd);
/* Unlink what dead processes of this pid namespace left in /dev/shm. Returns how many. */
AF_INTERNAL int af_shm_sweep(void);

#endif
