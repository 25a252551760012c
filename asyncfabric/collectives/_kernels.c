/* Native kernels of the all-reduce's data path on the CPU: block quantization
 * to int8 with one bf16 scale per block, dequantization (stored or added into
 * an fp32 accumulator), and the conversions between fp32, fp16 and bf16.
 *
 * Why native: the all-reduce quantizes every value before a send and
 * dequantizes it on arrival; in numpy or torch ops that is five or six passes
 * over memory with temporaries, which on two cores costs more than the bytes
 * the quantization saves on the wire. Here each kernel is one pass, written so
 * that gcc vectorizes it at -O3 with the baseline instruction set (no -march),
 * and it runs without the GIL so the event loop's other coroutines and the
 * engine's progress thread keep going.
 *
 * Pointers come in as integers (a numpy array's ctypes.data, a torch tensor's
 * data_ptr()); the Python side (kernels.py) checks sizes and dtypes: these
 * functions trust them.
 *
 * Rounding: conversions to fp16 and bf16 round to nearest even; quantized
 * values round to nearest even (the magic-number add below), then clamp to
 * [-127, 127]; a block's scale is absmax / 127 rounded *up* to bf16, so no
 * value of the block needs more than 127 steps and |x - q * s| <= s / 2.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
/* A block's values are converted to fp32 into a stack buffer first. */
#define MAX_BLOCK 1024

static inline float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float bf16_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

static inline uint16_t f32_bf16(float f) {
    uint32_t u = f32_bits(f);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    /* NaN: keep it a (quiet) NaN; a select, not a branch, so loops vectorize */
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? ((u >> 16) | 0x40u) : r);
}

/* fp16 <-> fp32 without F16C (F. Giesen's branch-free forms, public domain). */
static inline float f16_f32(uint16_t h) {
    const float magic = bits_f32(113u << 23);
    const uint32_t shifted_exp = 0x7c00u << 13;
    uint32_t o = ((uint32_t)h & 0x7fffu) << 13;
    uint32_t exp = shifted_exp & o;
    o += (uint32_t)(127 - 15) << 23;
    if (exp == shifted_exp) {
        o += (uint32_t)(128 - 16) << 23; /* Inf/NaN */
    } else if (exp == 0) {
        o += 1u << 23; /* zero/subnormal: renormalize */
        o = f32_bits(bits_f32(o) - magic);
    }
    return bits_f32(o | (((uint32_t)h & 0x8000u) << 16));
}

static inline uint16_t f32_f16(float f) {
    const uint32_t f32infty = 255u << 23;
    const uint32_t f16max = (127u + 16u) << 23;
    const float denorm_magic = bits_f32(((127u - 15u) + (23u - 10u) + 1u) << 23);
    uint32_t u = f32_bits(f);
    uint32_t sign = u & 0x80000000u;
    uint16_t o;
    u ^= sign;
    if (u >= f16max) {
        o = (u > f32infty) ? 0x7e00 : 0x7c00; /* NaN stays NaN, overflow to Inf */
    } else if (u < (113u << 23)) {
        o = (uint16_t)(f32_bits(bits_f32(u) + denorm_magic) - f32_bits(denorm_magic));
    } else {
        uint32_t mant_odd = (u >> 13) & 1u;
        u += ((uint32_t)(15 - 127) << 23) + 0xfffu;
        u += mant_odd;
        o = (uint16_t)(u >> 13);
    }
    return (uint16_t)(o | (sign >> 16));
}

/* n values of dtype dt at src, as fp32, into dst (no aliasing). */
static void load_f32(const void *src, int dt, Py_ssize_t n, float *restrict dst) {
    Py_ssize_t i;
    if (dt == DT_F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (dt == DT_BF16) {
        const uint16_t *s = (const uint16_t *)src;
        for (i = 0; i < n; i++) dst[i] = bf16_f32(s[i]);
    } else {
        const uint16_t *s = (const uint16_t *)src;
        for (i = 0; i < n; i++) dst[i] = f16_f32(s[i]);
    }
}

/* A block's scale from the largest |value|'s fp32 bits (a NaN's bits are larger
 * than Inf's, so a NaN anywhere wins): absmax / 127 rounded up to bf16. */
static inline uint16_t scale_bits(uint32_t amax_bits) {
    float scale = bits_f32(amax_bits) / 127.0f;
    uint32_t u = f32_bits(scale);
    uint16_t sb = (uint16_t)(u >> 16);
    if ((u & 0xffffu) && (u & 0x7f800000u) != 0x7f800000u) sb++; /* round up */
    return sb;
}

/* One block of n values of dtype dt at src: int8 values into q, returns the
 * bf16 bits of its scale. always_inline so that, called with a constant n (the
 * common block of 32), every loop has a constant trip count and vectorizes. */
static inline __attribute__((always_inline)) uint16_t
quant_block(const void *src, int dt, Py_ssize_t n, int8_t *restrict q) {
    const float round_magic = 12582912.0f; /* 1.5 * 2^23: x + m - m rounds to nearest even */
    float v[MAX_BLOCK];
    uint32_t amax = 0;
    uint16_t sb;
    float scale, inv;
    Py_ssize_t i;
    if (dt == DT_BF16) {
        const uint16_t *s = (const uint16_t *)src;
        uint16_t m = 0;
        for (i = 0; i < n; i++) {
            uint16_t a = s[i] & 0x7fffu;
            m = a > m ? a : m;
        }
        amax = (uint32_t)m << 16;
        for (i = 0; i < n; i++) v[i] = bf16_f32(s[i]);
    } else if (dt == DT_F32) {
        const uint32_t *s = (const uint32_t *)src;
        for (i = 0; i < n; i++) {
            uint32_t a = s[i] & 0x7fffffffu;
            amax = a > amax ? a : amax;
        }
        memcpy(v, src, (size_t)n * 4);
    } else {
        const uint16_t *s = (const uint16_t *)src;
        for (i = 0; i < n; i++) v[i] = f16_f32(s[i]);
        for (i = 0; i < n; i++) {
            uint32_t a = f32_bits(v[i]) & 0x7fffffffu;
            amax = a > amax ? a : amax;
        }
    }
    sb = scale_bits(amax);
    scale = bf16_f32(sb);
    if (!(scale > 0.0f) || amax >= 0x7f800000u) {
        /* all zeros: zeros; Inf or NaN: zeros with a non-finite scale, so q * s is NaN */
        memset(q, 0, (size_t)n);
        return sb;
    }
    inv = 1.0f / scale;
    for (i = 0; i < n; i++) {
        float r = (v[i] * inv + round_magic) - round_magic;
        r = r > 127.0f ? 127.0f : r;
        r = r < -127.0f ? -127.0f : r;
        q[i] = (int8_t)(int)r;
    }
    return sb;
}


/* AVX-512 forms of the two hot loops (bf16 tensors, blocks of 32: the all-reduce's
 * default), picked at load time when the CPU has AVX-512 F/BW/VL. Profiling showed
 * the auto-vectorized loops above at 0.6 ns a value for quantize and 1.2 ns for the
 * fused reduce: every block paid a scalar absmax reduction and a spill of 32 fp32
 * values to the stack. Here one 32-value block is one zmm of bf16 (or one ymm of
 * int8), its absmax a few in-register shuffles. Same arithmetic as the portable
 * forms (absmax from the bits, scale rounded up to bf16, round to nearest even,
 * clamp to +-127, bf16 stores rounded to nearest even, products fused into FMAs
 * where gcc fuses them in the portable loops' x86-64-v4 clone): the same bytes. */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_X86_FAST 1
static int use_avx512 = 0;

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

AVX512 static inline __m512 bf16x16_f32(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

AVX512 static inline __m512 i8x16_f32(__m128i q) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
}

/* 16 fp32 (finite or not) to bf16, nearest even, NaN stays a quiet NaN (f32_bf16). */
AVX512 static inline __m256i f32x16_bf16(__m512 f) {
    __m512i u = _mm512_castps_si512(f);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    __m512i nanq = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    __mmask16 isnan = _mm512_cmpgt_epu32_mask(
        _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(isnan, r, nanq));
}

/* 32 fp32 values (a0, a1) with absmax bits amax: int8 into q, returns the scale bits;
 * *sc gets the scale. */
AVX512 static inline uint16_t quant32(__m512 a0, __m512 a1, uint32_t amax, int8_t *q,
                                      float *sc) {
    uint16_t sb = scale_bits(amax);
    float scale = bf16_f32(sb);
    __m512 inv;
    __m512i i0, i1, lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    const __m512 magic = _mm512_set1_ps(12582912.0f);
    *sc = scale;
    if (!(scale > 0.0f) || amax >= 0x7f800000u) {
        memset(q, 0, 32);
        return sb;
    }
    inv = _mm512_set1_ps(1.0f / scale);
    /* x * inv + magic - magic, the product fused as gcc contracts the portable loop on
     * an FMA machine (so both paths give the same bytes there) */
    i0 = _mm512_cvtps_epi32(_mm512_sub_ps(_mm512_fmadd_ps(a0, inv, magic), magic));
    i1 = _mm512_cvtps_epi32(_mm512_sub_ps(_mm512_fmadd_ps(a1, inv, magic), magic));
    i0 = _mm512_min_epi32(_mm512_max_epi32(i0, lo), hi);
    i1 = _mm512_min_epi32(_mm512_max_epi32(i1, lo), hi);
    _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(i0));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtepi32_epi8(i1));
    return sb;
}

AVX512 static void quant_bf16_32_avx512(const uint16_t *src, Py_ssize_t nblk, int8_t *q,
                                        uint16_t *scales) {
    Py_ssize_t b;
    const __m512i absm = _mm512_set1_epi16(0x7fff);
    for (b = 0; b < nblk; b++) {
        __m512i v = _mm512_loadu_si512((const void *)(src + b * 32));
        __m512i a = _mm512_and_si512(v, absm);
        __m256i m = _mm256_max_epu16(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1));
        __m128i m2 = _mm_max_epu16(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
        /* the largest of 8 u16: the smallest of their complements (minpos) */
        uint32_t mx = 0xffffu ^ (uint32_t)(uint16_t)_mm_cvtsi128_si32(
                                    _mm_minpos_epu16(_mm_xor_si128(m2, _mm_set1_epi16(-1))));
        float sc;
        scales[b] = quant32(bf16x16_f32(_mm512_castsi512_si256(v)),
                            bf16x16_f32(_mm512_extracti64x4_epi64(v, 1)), mx << 16, q + b * 32,
                            &sc);
    }
}

/* dequantize_run for bf16 out, block 32: nblk whole blocks. */
AVX512 static void dequant_bf16_32_avx512(const int8_t *q, const uint16_t *scales,
                                          Py_ssize_t nblk, uint16_t *dst) {
    Py_ssize_t b;
    for (b = 0; b < nblk; b++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(q + b * 32));
        __m512 s = _mm512_set1_ps(bf16_f32(scales[b]));
        _mm256_storeu_si256((__m256i *)(dst + b * 32),
                            f32x16_bf16(_mm512_mul_ps(i8x16_f32(_mm256_castsi256_si128(v)), s)));
        _mm256_storeu_si256(
            (__m256i *)(dst + b * 32 + 16),
            f32x16_bf16(_mm512_mul_ps(i8x16_f32(_mm256_extracti128_si256(v, 1)), s)));
    }
}

/* Scales of 16 blocks at once from their absmax bits (scale_bits, in lanes): the
 * bf16 scale bits into sb, the scales into sc, 1 / scale into inv, and a mask of the
 * blocks that quantize to zeros (all zero, or Inf/NaN: see quant_block). */
AVX512 static inline __mmask16 scales16(__m512i amax, uint16_t *sb, float *sc, float *inv) {
    __m512 s = _mm512_div_ps(_mm512_castsi512_ps(amax), _mm512_set1_ps(127.0f));
    __m512i u = _mm512_castps_si512(s);
    __m512i hi = _mm512_srli_epi32(u, 16);
    __mmask16 frac = _mm512_test_epi32_mask(u, _mm512_set1_epi32(0xffff));
    __mmask16 fin = _mm512_cmpneq_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7f800000)),
                                             _mm512_set1_epi32(0x7f800000));
    __m512 scale;
    __mmask16 zero;
    hi = _mm512_mask_add_epi32(hi, frac & fin, hi, _mm512_set1_epi32(1)); /* round up */
    _mm256_storeu_si256((__m256i *)sb, _mm512_cvtepi32_epi16(hi));
    scale = _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16));
    _mm512_storeu_ps(sc, scale);
    _mm512_storeu_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.0f), scale));
    zero = _mm512_cmp_ps_mask(scale, _mm512_setzero_ps(), _CMP_NGT_UQ) |
           _mm512_cmpge_epu32_mask(amax, _mm512_set1_epi32(0x7f800000));
    return zero;
}

/* reduce_run for bf16, block 32, quant: nblk whole blocks, 16 blocks a group: first
 * every block's sum (fp32, on the stack) and absmax, then the 16 scales in one go
 * (two vector divisions instead of 32 scalar ones), then quantize and store. */
AVX512 static void reduce_bf16_32_avx512(const uintptr_t *srcs, int nsrc, int own,
                                         Py_ssize_t nblk, Py_ssize_t scoff, uintptr_t wire,
                                         uintptr_t y) {
    Py_ssize_t g, b;
    int k;
    const __m512i absm = _mm512_set1_epi32(0x7fffffff);
    const __m512 magic = _mm512_set1_ps(12582912.0f);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    float acc[16 * 32] __attribute__((aligned(64)));
    uint32_t amax[16] __attribute__((aligned(64)));
    uint16_t sb[16];
    float sc[16], inv[16];
    int8_t qb[32];
    for (g = 0; g < nblk; g += 16) {
        Py_ssize_t nb = nblk - g < 16 ? nblk - g : 16;
        __mmask16 zero;
        for (b = 0; b < nb; b++) {
            Py_ssize_t off = (g + b) * 32;
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), t0, t1;
            for (k = 0; k < nsrc; k++) {
                /* acc += q * s fused, as gcc contracts the portable loop with FMA */
                if (k == own) {
                    __m512i v =
                        _mm512_loadu_si512((const void *)((const uint16_t *)srcs[k] + off));
                    t0 = bf16x16_f32(_mm512_castsi512_si256(v));
                    t1 = bf16x16_f32(_mm512_extracti64x4_epi64(v, 1));
                    a0 = k == 0 ? t0 : _mm512_add_ps(a0, t0);
                    a1 = k == 0 ? t1 : _mm512_add_ps(a1, t1);
                } else {
                    __m256i q =
                        _mm256_loadu_si256((const __m256i *)((const int8_t *)srcs[k] + off));
                    __m512 s =
                        _mm512_set1_ps(bf16_f32(((const uint16_t *)(srcs[k] + scoff))[g + b]));
                    t0 = i8x16_f32(_mm256_castsi256_si128(q));
                    t1 = i8x16_f32(_mm256_extracti128_si256(q, 1));
                    a0 = k == 0 ? _mm512_mul_ps(t0, s) : _mm512_fmadd_ps(t0, s, a0);
                    a1 = k == 0 ? _mm512_mul_ps(t1, s) : _mm512_fmadd_ps(t1, s, a1);
                }
            }
            _mm512_store_ps(acc + b * 32, a0);
            _mm512_store_ps(acc + b * 32 + 16, a1);
            amax[b] = _mm512_reduce_max_epu32(
                _mm512_max_epu32(_mm512_and_si512(_mm512_castps_si512(a0), absm),
                                 _mm512_and_si512(_mm512_castps_si512(a1), absm)));
        }
        for (b = nb; b < 16; b++) amax[b] = 0;
        zero = scales16(_mm512_load_si512((const void *)amax), sb, sc, inv);
        for (b = 0; b < nb; b++) {
            Py_ssize_t off = (g + b) * 32;
            int8_t *qo = wire ? (int8_t *)wire + off : qb;
            if (wire) ((uint16_t *)(wire + scoff))[g + b] = sb[b];
            __m512i i0 = _mm512_setzero_si512(), i1 = _mm512_setzero_si512();
            if (!((zero >> b) & 1)) {
                __m512 iv = _mm512_set1_ps(inv[b]);
                i0 = _mm512_cvtps_epi32(_mm512_sub_ps(
                    _mm512_fmadd_ps(_mm512_load_ps(acc + b * 32), iv, magic), magic));
                i1 = _mm512_cvtps_epi32(_mm512_sub_ps(
                    _mm512_fmadd_ps(_mm512_load_ps(acc + b * 32 + 16), iv, magic), magic));
                i0 = _mm512_min_epi32(_mm512_max_epi32(i0, lo), hi);
                i1 = _mm512_min_epi32(_mm512_max_epi32(i1, lo), hi);
            }
            _mm_storeu_si128((__m128i *)qo, _mm512_cvtepi32_epi8(i0));
            _mm_storeu_si128((__m128i *)(qo + 16), _mm512_cvtepi32_epi8(i1));
            if (y) { /* from the registers: reloading qo would stall on store forwarding */
                __m512 s = _mm512_set1_ps(sc[b]);
                uint16_t *d = (uint16_t *)y + off;
                _mm256_storeu_si256((__m256i *)d,
                                    f32x16_bf16(_mm512_mul_ps(_mm512_cvtepi32_ps(i0), s)));
                _mm256_storeu_si256((__m256i *)(d + 16),
                                    f32x16_bf16(_mm512_mul_ps(_mm512_cvtepi32_ps(i1), s)));
            }
        }
    }
}
#endif

static int parse_block(Py_ssize_t block) {
    if (block < 1 || block > MAX_BLOCK) {
        PyErr_Format(PyExc_ValueError, "block must be from 1 to %d values, got %zd", MAX_BLOCK,
                     block);
        return -1;
    }
    return 0;
}

static int parse_dtype(int dt) {
    if (dt != DT_F32 && dt != DT_F16 && dt != DT_BF16) {
        PyErr_Format(PyExc_ValueError, "unknown dtype code %d (0 fp32, 1 fp16, 2 bf16)", dt);
        return -1;
    }
    return 0;
}

/* The quantize loop, compiled for AVX-512, AVX2 and the baseline, picked at load
 * time by the CPU: one 32-value block is then one or two vector operations. */
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default"))) static void
quantize_run(uintptr_t src, int dt, Py_ssize_t n, Py_ssize_t block, uintptr_t q, uintptr_t sc) {
    size_t isz = dt == DT_F32 ? 4 : 2;
    Py_ssize_t b, full = n / block;
    uint16_t *scales = (uint16_t *)sc;
    const char *p = (const char *)src;
    int8_t *qq = (int8_t *)q;
    /* Specialized for the usual block and dtypes (constant trip counts). */
    if (block == 32 && dt == DT_BF16)
        for (b = 0; b < full; b++)
        scales[b] = quant_block(p + (size_t)b * 64, DT_BF16, 32, qq + b * 32);
    else if (block == 32 && dt == DT_F32)
        for (b = 0; b < full; b++)
        scales[b] = quant_block(p + (size_t)b * 128, DT_F32, 32, qq + b * 32);
    else
        for (b = 0; b < full; b++)
        scales[b] = quant_block(p + (size_t)(b * block) * isz, dt, block, qq + b * block);
    if (full * block < n) /* the last, partial block */
        scales[full] = quant_block(p + (size_t)(full * block) * isz, dt, n - full * block,
                       qq + full * block);
}

/* quantize(src, dtype, n, block, q, scales): n values -> n int8 at q and
 * ceil(n / block) bf16 scales (uint16) at scales. */
static PyObject *py_quantize(PyObject *self, PyObject *args) {
    unsigned long long src, q, sc;
    int dt;
    Py_ssize_t n, block;
    (void)self;
    if (!PyArg_ParseTuple(args, "KinnKK", &src, &dt, &n, &block, &q, &sc)) return NULL;
    if (parse_block(block) < 0 || parse_dtype(dt) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_X86_FAST
    if (use_avx512 && block == 32 && dt == DT_BF16) {
        Py_ssize_t full = n / 32;
        quant_bf16_32_avx512((const uint16_t *)(uintptr_t)src, full, (int8_t *)(uintptr_t)q,
                             (uint16_t *)(uintptr_t)sc);
        if (full * 32 < n) /* the partial block: the portable loop, from there */
            quantize_run((uintptr_t)src + (uintptr_t)full * 64, dt, n - full * 32, block,
                         (uintptr_t)q + (uintptr_t)full * 32, (uintptr_t)sc + (uintptr_t)full * 2);
    } else
#endif
    quantize_run((uintptr_t)src, dt, n, block, (uintptr_t)q, (uintptr_t)sc);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* One block of dequantize_run (always_inline: constant m, constant trip counts). */
static inline __attribute__((always_inline)) void
dequant_block(const int8_t *qq, float s, Py_ssize_t m, uintptr_t dst, Py_ssize_t off, int dt,
              int add) {
    Py_ssize_t i;
    if (dt == DT_F32) {
        float *restrict d = (float *)dst + off;
        if (add)
            for (i = 0; i < m; i++) d[i] += (float)qq[i] * s;
        else
            for (i = 0; i < m; i++) d[i] = (float)qq[i] * s;
    } else if (dt == DT_BF16) {
        uint16_t *restrict d = (uint16_t *)dst + off;
        for (i = 0; i < m; i++) d[i] = f32_bf16((float)qq[i] * s);
    } else {
        uint16_t *restrict d = (uint16_t *)dst + off;
        for (i = 0; i < m; i++) d[i] = f32_f16((float)qq[i] * s);
    }
}

__attribute__((target_clones("arch=x86-64-v4", "avx2", "default"))) static void
dequantize_run(uintptr_t q, uintptr_t sc, Py_ssize_t n, Py_ssize_t block, uintptr_t dst, int dt,
               int add) {
    const int8_t *qs = (const int8_t *)q;
    const uint16_t *scales = (const uint16_t *)sc;
    Py_ssize_t b, full = n / block;
    if (block == 32 && dt == DT_BF16)
        for (b = 0; b < full; b++)
            dequant_block(qs + b * 32, bf16_f32(scales[b]), 32, dst, b * 32, DT_BF16, 0);
    else
        for (b = 0; b < full; b++)
            dequant_block(qs + b * block, bf16_f32(scales[b]), block, dst, b * block, dt, add);
    if (full * block < n)
        dequant_block(qs + full * block, bf16_f32(scales[full]), n - full * block, dst,
                      full * block, dt, add);
}

/* dequantize(q, scales, n, block, dst, dtype, add): q * scale into dst (dtype);
 * with add (dst fp32 only) dst += q * scale. */
static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    unsigned long long q, sc, dst;
    int dt, add;
    Py_ssize_t n, block;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKnnKip", &q, &sc, &n, &block, &dst, &dt, &add)) return NULL;
    if (parse_block(block) < 0 || parse_dtype(dt) < 0) return NULL;
    if (add && dt != DT_F32) {
        PyErr_SetString(PyExc_ValueError, "dequantize adds into an fp32 accumulator only");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_X86_FAST
    if (use_avx512 && !add && block == 32 && dt == DT_BF16) {
        Py_ssize_t full = n / 32;
        dequant_bf16_32_avx512((const int8_t *)(uintptr_t)q, (const uint16_t *)(uintptr_t)sc, full,
                               (uint16_t *)(uintptr_t)dst);
        if (full * 32 < n)
            dequantize_run((uintptr_t)q + (uintptr_t)full * 32, (uintptr_t)sc + (uintptr_t)full * 2,
                           n - full * 32, block, (uintptr_t)dst + (uintptr_t)full * 64, dt, 0);
    } else
#endif
    dequantize_run((uintptr_t)q, (uintptr_t)sc, n, block, (uintptr_t)dst, dt, add);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* convert(src, src_dtype, dst, dst_dtype, n, add): dst = src converted; with
 * add (dst fp32 only) dst += src. Same dtypes copy. */
static PyObject *py_convert(PyObject *self, PyObject *args) {
    unsigned long long src, dst;
    int sdt, ddt, add;
    Py_ssize_t n;
    (void)self;
    if (!PyArg_ParseTuple(args, "KiKinp", &src, &sdt, &dst, &ddt, &n, &add)) return NULL;
    if (parse_dtype(sdt) < 0 || parse_dtype(ddt) < 0) return NULL;
    if (add && ddt != DT_F32) {
        PyErr_SetString(PyExc_ValueError, "convert adds into an fp32 accumulator only");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    {
        Py_ssize_t i;
        const void *s = (const void *)(uintptr_t)src;
        if (ddt == DT_F32) {
            float *restrict d = (float *)(uintptr_t)dst;
            if (!add) {
                load_f32(s, sdt, n, d);
            } else if (sdt == DT_F32) {
                const float *ss = (const float *)s;
                for (i = 0; i < n; i++) d[i] += ss[i];
            } else if (sdt == DT_BF16) {
                const uint16_t *ss = (const uint16_t *)s;
                for (i = 0; i < n; i++) d[i] += bf16_f32(ss[i]);
            } else {
                const uint16_t *ss = (const uint16_t *)s;
                for (i = 0; i < n; i++) d[i] += f16_f32(ss[i]);
            }
        } else if (sdt == ddt) {
            memmove((void *)(uintptr_t)dst, s, (size_t)n * 2);
        } else {
            /* 16-bit to the other 16-bit: through fp32 */
            uint16_t *restrict d = (uint16_t *)(uintptr_t)dst;
            const uint16_t *ss = (const uint16_t *)s;
            if (sdt == DT_F32) {
                const float *sf = (const float *)s;
                if (ddt == DT_BF16)
                    for (i = 0; i < n; i++) d[i] = f32_bf16(sf[i]);
                else
                    for (i = 0; i < n; i++) d[i] = f32_f16(sf[i]);
            } else if (ddt == DT_BF16) {
                for (i = 0; i < n; i++) d[i] = f32_bf16(f16_f32(ss[i]));
            } else {
                for (i = 0; i < n; i++) d[i] = f32_f16(bf16_f32(ss[i]));
            }
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* The reduce step, fused: for each block, the sum of the sources in rank order
 * (fp32), then - with quant - quantized into the wire form at `wire` and
 * dequantized into y, or - without - converted to dt into `wire` and y. One pass
 * over every input and output instead of five.
 *
 * srcs[i]: the i-th contribution in rank order; the one at index `own` is raw
 * values of dt (this rank's tensor), the others are in wire form: int8 values
 * with their scales at +align8(n) (quant), or raw values of dt. wire or y may
 * be 0 (not wanted). */
#define MAX_SRCS 32

static inline Py_ssize_t align8(Py_ssize_t n) { return (n + 7) & ~(Py_ssize_t)7; }

static inline __attribute__((always_inline)) void add_raw(float *restrict acc, const void *src, int dt, Py_ssize_t off,
                           Py_ssize_t m, int first) {
    Py_ssize_t i;
    if (dt == DT_F32) {
        const float *s = (const float *)src + off;
        if (first)
            for (i = 0; i < m; i++) acc[i] = s[i];
        else
            for (i = 0; i < m; i++) acc[i] += s[i];
    } else if (dt == DT_BF16) {
        const uint16_t *s = (const uint16_t *)src + off;
        if (first)
            for (i = 0; i < m; i++) acc[i] = bf16_f32(s[i]);
        else
            for (i = 0; i < m; i++) acc[i] += bf16_f32(s[i]);
    } else {
        const uint16_t *s = (const uint16_t *)src + off;
        if (first)
            for (i = 0; i < m; i++) acc[i] = f16_f32(s[i]);
        else
            for (i = 0; i < m; i++) acc[i] += f16_f32(s[i]);
    }
}

static inline __attribute__((always_inline)) void store_raw(const float *restrict acc, void *dst, int dt, Py_ssize_t off,
                             Py_ssize_t m) {
    Py_ssize_t i;
    if (dt == DT_F32) {
        memcpy((float *)dst + off, acc, (size_t)m * 4);
    } else if (dt == DT_BF16) {
        uint16_t *d = (uint16_t *)dst + off;
        for (i = 0; i < m; i++) d[i] = f32_bf16(acc[i]);
    } else {
        uint16_t *d = (uint16_t *)dst + off;
        for (i = 0; i < m; i++) d[i] = f32_f16(acc[i]);
    }
}

/* One block of reduce_run; always_inline so a constant m gives constant trip counts. */
static inline __attribute__((always_inline)) void
reduce_block(const uintptr_t *srcs, int nsrc, int own, int dt, int quant, Py_ssize_t b,
             Py_ssize_t off, Py_ssize_t m, Py_ssize_t scoff, uintptr_t wire, uintptr_t y) {
    float acc[MAX_BLOCK], tmp[MAX_BLOCK];
    Py_ssize_t i;
    int k;
    for (k = 0; k < nsrc; k++) {
        if (k == own || !quant) {
            add_raw(acc, (const void *)srcs[k], dt, off, m, k == 0);
        } else {
            const int8_t *q = (const int8_t *)srcs[k] + off;
            float sc = bf16_f32(((const uint16_t *)(srcs[k] + scoff))[b]);
            if (k == 0)
                for (i = 0; i < m; i++) acc[i] = (float)q[i] * sc;
            else
                for (i = 0; i < m; i++) acc[i] += (float)q[i] * sc;
        }
    }
    if (quant) {
        int8_t qb[MAX_BLOCK];
        int8_t *qo = wire ? (int8_t *)wire + off : qb;
        uint16_t sb = quant_block(acc, DT_F32, m, qo);
        float sc = bf16_f32(sb);
        if (wire) ((uint16_t *)(wire + scoff))[b] = sb;
        if (y) {
            for (i = 0; i < m; i++) tmp[i] = (float)qo[i] * sc;
            store_raw(tmp, (void *)y, dt, off, m);
        }
    } else {
        if (wire) store_raw(acc, (void *)wire, dt, off, m);
        if (y) store_raw(acc, (void *)y, dt, off, m);
    }
}

__attribute__((target_clones("arch=x86-64-v4", "avx2", "default"))) static void
reduce_run(const uintptr_t *srcs, int nsrc, int own, int dt, int quant, Py_ssize_t n,
           Py_ssize_t block, uintptr_t wire, uintptr_t y) {
    Py_ssize_t b, full = n / block, scoff = align8(n);
    if (block == 32 && dt == DT_BF16)
        for (b = 0; b < full; b++)
            reduce_block(srcs, nsrc, own, DT_BF16, quant, b, b * 32, 32, scoff, wire, y);
    else if (block == 32 && dt == DT_F32)
        for (b = 0; b < full; b++)
            reduce_block(srcs, nsrc, own, DT_F32, quant, b, b * 32, 32, scoff, wire, y);
    else
        for (b = 0; b < full; b++)
            reduce_block(srcs, nsrc, own, dt, quant, b, b * block, block, scoff, wire, y);
    if (full * block < n)
        reduce_block(srcs, nsrc, own, dt, quant, full, full * block, n - full * block, scoff,
                     wire, y);
}

/* The last, partial block of a bf16 block-32 quantized reduce (the AVX-512 path
 * does the whole ones). */
/* gcc cannot see that nsrc >= 1 fills acc before it is read */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
static void reduce_tail(const uintptr_t *srcs, int nsrc, int own, Py_ssize_t n, uintptr_t wire,
                        uintptr_t y) {
    Py_ssize_t full = n / 32;
    reduce_block(srcs, nsrc, own, DT_BF16, 1, full, full * 32, n - full * 32, align8(n), wire, y);
}
#pragma GCC diagnostic pop

/* reduce(srcs, own, dtype, quant, n, block, wire, y): see reduce_run above. */
static PyObject *py_reduce(PyObject *self, PyObject *args) {
    PyObject *seq, *fast;
    uintptr_t ptrs[MAX_SRCS];
    int own, dt, quant, nsrc, k;
    Py_ssize_t n, block;
    unsigned long long wire, y;
    (void)self;
    if (!PyArg_ParseTuple(args, "OiipnnKK", &seq, &own, &dt, &quant, &n, &block, &wire, &y))
        return NULL;
    if (parse_block(block) < 0 || parse_dtype(dt) < 0) return NULL;
    fast = PySequence_Fast(seq, "srcs must be a sequence of addresses");
    if (fast == NULL) return NULL;
    nsrc = (int)PySequence_Fast_GET_SIZE(fast);
    if (nsrc < 1 || nsrc > MAX_SRCS) {
        Py_DECREF(fast);
        return PyErr_Format(PyExc_ValueError, "reduce takes 1 to %d sources, got %d", MAX_SRCS,
                            nsrc);
    }
    for (k = 0; k < nsrc; k++) {
        ptrs[k] = (uintptr_t)PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(fast, k));
        if (PyErr_Occurred()) {
            Py_DECREF(fast);
            return NULL;
        }
    }
    Py_DECREF(fast);
    Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_X86_FAST
    if (use_avx512 && quant && block == 32 && dt == DT_BF16) {
        /* whole blocks here; the partial last block (if any) by the portable loop,
         * which takes the block index from the offset it is given */
        Py_ssize_t full = n / 32;
        reduce_bf16_32_avx512(ptrs, nsrc, own, full, align8(n), (uintptr_t)wire, (uintptr_t)y);
        if (full * 32 < n)
            reduce_tail(ptrs, nsrc, own, n, (uintptr_t)wire, (uintptr_t)y);
    } else
#endif
    reduce_run(ptrs, nsrc, own, dt, quant, n, block, (uintptr_t)wire, (uintptr_t)y);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef kernel_methods[] = {
    {"quantize", py_quantize, METH_VARARGS,
     "quantize(src, dtype, n, block, q, scales): int8 values and bf16 block scales"},
    {"dequantize", py_dequantize, METH_VARARGS,
     "dequantize(q, scales, n, block, dst, dtype, add): q * scale into (or added to) dst"},
    {"convert", py_convert, METH_VARARGS,
     "convert(src, src_dtype, dst, dst_dtype, n, add): dst = src (or dst += src, fp32 dst)"},
    {"reduce", py_reduce, METH_VARARGS,
     "reduce(srcs, own, dtype, quant, n, block, wire, y): sum in rank order, re-encode, store"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef kernels_module = {
    PyModuleDef_HEAD_INIT, "asyncfabric.collectives._kernels",
    "Quantize, dequantize and convert kernels of the all-reduce (see _kernels.c).", -1,
    kernel_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kernels(void) {
#ifdef HAVE_X86_FAST
    __builtin_cpu_init();
    use_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                 __builtin_cpu_supports("fma") &&
                 getenv("ASYNCFABRIC_NO_AVX512") == NULL;
#endif
    return PyModule_Create(&kernels_module);
}
