/* cudanote.c: a CUDA host function that tells the event loop a copy finished.
 *
 * It needs no CUDA headers. Python launches afc_note_fire with
 * cuLaunchHostFunc on a notify stream that waits for a copy's event. CUDA runs
 * it on its own thread and forbids CUDA calls there, so it only counts and
 * rings the engine's notify eventfd; the event loop then runs the follow-ups
 * (post the immediates, credit a counter) in the same drain that reaps fabric
 * completions, with no helper thread of ours.
 */
#include "afint.h" /* only for the build rules every unit of ours follows */

#include "cudanote.h"

void afc_note_fire(void *arg) {
    af_cuda_note *n = (af_cuda_note *)arg;
    __atomic_add_fetch(&n->fired, 1, __ATOMIC_RELEASE);
    uint64_t one = 1;
    if (write(n->fd, &one, sizeof one) < 0) { /* saturated or closed: already readable */ }
}

uint64_t afc_note_fired(const af_cuda_note *n) {
    return __atomic_load_n(&n->fired, __ATOMIC_ACQUIRE);
}

uintptr_t afc_note_fn(void) { return (uintptr_t)&afc_note_fire; }
