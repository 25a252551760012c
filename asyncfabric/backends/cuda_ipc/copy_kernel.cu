// cuda_ipc's copy kernel: small GPU-to-GPU copies by the SMs instead of a copy engine.
//
// A copy-engine copy of a few bytes costs several microseconds of GPU time before
// its first byte moves (docs/gpu.md, "Small writes"); a one-block kernel starts
// sooner. After the copy, thread 0 may store `value` into `word` (pinned host memory
// mapped into the GPU, or GPU memory) behind a system-scope fence, so whoever polls
// the word sees the copied bytes first: a triggered write's stream work is then this
// one launch.
//
// The PTX that cuda_ipc loads is generated from this file by scripts/build_ptx.py
// (NVRTC from PyPI, no GPU needed) into _copy_ptx.py. Edit here, then run it.

typedef unsigned long long u64;

extern "C" __global__ void af_copy(unsigned char *dst, const unsigned char *src, u64 n,
                                   unsigned int *word, unsigned int value)
{
    const u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 nt = (u64)gridDim.x * blockDim.x;
    const u64 align = ((u64)dst | (u64)src);
    u64 head = 0;
    if ((align & 15) == 0) {
        const u64 nv = n >> 4;
        const uint4 *s = (const uint4 *)src;
        uint4 *d = (uint4 *)dst;
        for (u64 i = tid; i < nv; i += nt)
            d[i] = s[i];
        head = nv << 4;
    } else if ((align & 7) == 0) {
        const u64 nv = n >> 3;
        const u64 *s = (const u64 *)src;
        u64 *d = (u64 *)dst;
        for (u64 i = tid; i < nv; i += nt)
            d[i] = s[i];
        head = nv << 3;
    }
    for (u64 i = head + tid; i < n; i += nt)
        dst[i] = src[i];
    if (word != 0) {
        // One block only (the launcher's rule when a word is given). Each thread
        // fences its own stores system-wide, the barrier waits for every thread's
        // fence, and only then does thread 0 store the word.
        __threadfence_system();
        __syncthreads();
        if (threadIdx.x == 0)
            *(volatile unsigned int *)word = value;
    }
}
