/* cudanote.c's declarations for cffi's cdef (no preprocessor). */
typedef struct af_cuda_note {
    uint64_t fired;  /* host functions run so far (written by CUDA's callback thread) */
    int32_t fd;      /* eventfd to ring: the engine's notify fd */
} af_cuda_note;

void afc_note_fire(void *arg);
uint64_t afc_note_fired(const af_cuda_note *n);
uintptr_t afc_note_fn(void);
