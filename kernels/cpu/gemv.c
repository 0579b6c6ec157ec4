/*
 * Memory-bound matrix-vector products y = W x for one-row steps on x86-64 CPUs (AVX2 + FMA + F16C).
 *
 * W is row-major [N, K] (bf16 bits, int8 with one scale per output row, or int4 codes two to a byte with a
 * scale and a min per group of 32 inputs), x has K elements,
 * y has N. (The batched rows further down multiply each weight row into B vectors at once, for the native
 * step of B > 1 rows.) Decoding one token at batch 1 reads every weight exactly once, so the speed of a GEMV is
 * bytes(W) / DRAM bandwidth as long as the arithmetic keeps up: the kernels below are built so that
 * converting and multiplying a 32-byte load costs fewer cycles than DRAM needs to deliver it.
 *
 * The int8 and int4 weights' row kernels live in q8.c (they multiply an int8-quantized x); this file
 * has the bf16 and fp32 ones, the drivers and the exported entry points.
 *
 * Accumulation is in fp32 (fused multiply-add); the summation order differs from PyTorch's but every
 * product and partial sum is an ordinary IEEE fp32 operation, so NaN and inf propagate as usual.
 * Results are rounded once to the requested output dtype (round-to-nearest-even, like torch's casts)
 * after the bias (and, for int8, the row scale) has been applied in fp32. Every row is summed in the
 * same order whatever the thread count, so results do not depend on it.
 *
 * Plain C with C linkage, built at first use by kernels/cpu/build.py together with step.c (see common.h
 * for the command and the declarations they share) and called through ctypes (which releases the GIL).
 * OpenMP splits the output rows into one contiguous slab per thread (static schedule): rows are long
 * (K >= 1024 in the models we care about) and equally expensive, so a static split has no imbalance.
 */
#include "common.h"

/* Output rows handled together: each x vector load serves ROWS rows, which cuts the L1 load traffic per
 * weight, and 4 rows x 2 accumulators = 8 independent FMA chains, enough to cover the FMA latency.
 * hsum8x4 assumes 4. */
#define ROWS NK_ROWS

/* Software prefetch distance in bytes, per stream. Each thread reads ROWS streams; the hardware
 * prefetchers alone leave too few misses in flight, and a prefetch 1 KB ahead streams markedly faster
 * (tools/bench_cpu_gemv.py measures the GEMVs against the machine's read bandwidth). Into L2, not L1
 * (NK_PREFETCH_HINT in common.h: the 620M model's bf16 decode step 1.23x on a Zen 4, alternated in one process). */
#ifndef PF
#define PF 1024
#endif

/* Below this many weights a GEMV takes a few microseconds on one core, about what waking the OpenMP
 * team costs, so small products run single-threaded. */
#define MIN_WEIGHTS_PER_THREAD 65536

NK_EXPORT int nekomata_abi_version(void) { return NK_ABI_VERSION; }

/* ---------------------------------------------------------------------------------------------------- */
/* Horizontal sums (hsum8, the one-row form, is in common.h).                                          */

/* The four horizontal sums of a, b, c, d at once (3 hadds instead of 4 separate reductions): the row
 * epilogue is not negligible next to a 1024-weight int8 row. */
static inline __m128 hsum8x4(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

/* ---------------------------------------------------------------------------------------------------- */
/* The activation vector, in the layout the inner loops want.                                           */
/*
 * bf16: a 32-byte load holds 16 weights, i.e. 8 dwords whose low halves are the even-indexed weights
 * and whose high halves are the odd-indexed ones. `w << 16` turns the even ones into fp32 and
 * `w & 0xffff0000` the odd ones, with no shuffle (vpmovzxwd would need one per 8 weights). The price is
 * that x must be split the same way, once per call: block j of 16 stores x[16j+0,2,..,14] then
 * x[16j+1,3,..,15].
 *
 * fp32 weights keep the natural order. Either way x is converted to fp32 here, once per call (int8 and
 * int4 weights take it quantized instead: nk_q8_load_x).
 *
 * The elements after the last full block (the tail) stay in place and are handled by scalar code.
 * The buffer is thread-local and grows as needed, so steady-state calls allocate nothing; thread-local
 * because two Python threads may call in concurrently (ctypes releases the GIL). It is never freed: at
 * most 4 * K bytes per calling thread.
 */
static __thread float* xbuf = NULL;
static __thread int64_t xbuf_len = 0;

float* nk_xbuf_get(int64_t K) {
    if (K > xbuf_len) {
        free(xbuf);
        int64_t len = (K + 63) & ~(int64_t)63;
        xbuf = (float*)aligned_alloc(64, (size_t)len * sizeof(float));
        xbuf_len = xbuf ? len : 0;
    }
    return xbuf;
}

/* x converted to fp32 into dst: in natural order (split = 0, int8), or split (split = 1, bf16: every
 * block of 16 stores its 8 even-indexed elements, then its 8 odd-indexed ones); the tail after the last
 * block of 16 stays in natural order. Vectorised, as it runs serially on every call. */
void nk_load_x(float* dst, const void* x, int x_dtype, int64_t K, int layout) {
    if (layout == X_Q8_INT8 || layout == X_Q8_INT4) {
        nk_q8_load_x(dst, x, x_dtype, K, layout);
        return;
    }
    const int split = layout == X_SPLIT;
    int64_t full = K - K % 16;
    for (int64_t j = 0; j < full; j += 16) {
        __m256 c0 = load8_f32(x, x_dtype, j), c1 = load8_f32(x, x_dtype, j + 8);
        if (split) {
            /* shuffle_ps picks elements 0,2 (or 1,3) of each 128-bit half of c0 and c1; the 64-bit
             * permute (0, 2, 1, 3) then puts c0's picks before c1's. */
            __m256 even = _mm256_shuffle_ps(c0, c1, _MM_SHUFFLE(2, 0, 2, 0));
            __m256 odd = _mm256_shuffle_ps(c0, c1, _MM_SHUFFLE(3, 1, 3, 1));
            c0 = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(even), _MM_SHUFFLE(3, 1, 2, 0)));
            c1 = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(odd), _MM_SHUFFLE(3, 1, 2, 0)));
        }
        _mm256_store_ps(dst + j, c0);
        _mm256_store_ps(dst + j + 8, c1);
    }
    for (int64_t k = full; k < K; k++) dst[k] = load_scalar(x, x_dtype, k);
#ifdef __AVX512BF16__
    if (layout == X_BF16_PAIRS) {
        /* x again as bf16 bits, and whether that copy is exact: vdpbf16ps multiplies bf16 by bf16, which
         * equals the fp32 product only if x holds bf16 values (it does in bf16 models, whose activations
         * PyTorch rounds to bf16). An fp32 x that is not sends the kernel to the fp32 path instead. */
        uint16_t* xb = (uint16_t*)(dst + nk_x_bf16_at(K));
        __mmask16 inexact = 0;
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            __m512 v = _mm512_load_ps(dst + k);
            inexact |= _mm512_test_epi32_mask(_mm512_castps_si512(v), _mm512_set1_epi32(0xffff));
            _mm256_storeu_si256((__m256i*)(xb + k), (__m256i)_mm512_cvtneps_pbh(v));
        }
        int tail_inexact = 0;
        for (; k < K; k++) {
            uint32_t u;
            memcpy(&u, dst + k, sizeof u);
            tail_inexact |= (u & 0xffffu) != 0;
            xb[k] = (uint16_t)(u >> 16);
        }
        if (K & 1) xb[K] = 0; /* the odd element's pair partner (never multiplied: tails are scalar) */
        dst[nk_x_flag_at(K)] = (inexact || tail_inexact) ? 0.0f : 1.0f;
    }
#endif
}

static int team_size(int64_t N, int64_t K, int nthreads) {
    int64_t by_work = (N * K) / MIN_WEIGHTS_PER_THREAD;
    int64_t by_rows = (N + ROWS - 1) / ROWS;
    int64_t t = nthreads;
    if (t > by_work) t = by_work;
    if (t > by_rows) t = by_rows;
    return t < 1 ? 1 : (int)t;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Dot products of ROWS rows with x. Each row pointer advances independently (see nk_gemv_rows).         */

static inline void bf16_rows(const uint16_t* const w[ROWS], int64_t K, const float* xp, float out[ROWS]) {
    const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
    __m256 ae[ROWS], ao[ROWS];
    for (int r = 0; r < ROWS; r++) ae[r] = ao[r] = _mm256_setzero_ps();
    int64_t k = 0;
    /* 32 weights = one 64-byte line per row and iteration, so one prefetch per line. */
    for (; k + 32 <= K; k += 32) {
        __m256 xe0 = _mm256_load_ps(xp + k), xo0 = _mm256_load_ps(xp + k + 8);
        __m256 xe1 = _mm256_load_ps(xp + k + 16), xo1 = _mm256_load_ps(xp + k + 24);
        for (int r = 0; r < ROWS; r++) {
            if (PF) _mm_prefetch((const char*)(w[r] + k) + PF, NK_PREFETCH_HINT);
            __m256i v0 = _mm256_loadu_si256((const __m256i*)(w[r] + k));
            __m256i v1 = _mm256_loadu_si256((const __m256i*)(w[r] + k + 16));
            ae[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)), xe0, ae[r]);
            ao[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v0, hi)), xo0, ao[r]);
            ae[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v1, 16)), xe1, ae[r]);
            ao[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v1, hi)), xo1, ao[r]);
        }
    }
    for (; k + 16 <= K; k += 16) {
        __m256 xe = _mm256_load_ps(xp + k), xo = _mm256_load_ps(xp + k + 8);
        for (int r = 0; r < ROWS; r++) {
            __m256i v = _mm256_loadu_si256((const __m256i*)(w[r] + k));
            ae[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), xe, ae[r]);
            ao[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, hi)), xo, ao[r]);
        }
    }
    _mm_storeu_ps(out, hsum8x4(_mm256_add_ps(ae[0], ao[0]), _mm256_add_ps(ae[1], ao[1]),
                               _mm256_add_ps(ae[2], ao[2]), _mm256_add_ps(ae[3], ao[3])));
    for (; k < K; k++)
        for (int r = 0; r < ROWS; r++) out[r] = fmaf(bf16_to_f32(w[r][k]), xp[k], out[r]);
}

static inline float bf16_row(const uint16_t* w, int64_t K, const float* xp) {
    const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
    __m256 ae = _mm256_setzero_ps(), ao = _mm256_setzero_ps();
    int64_t full = K - K % 16;
    for (int64_t k = 0; k < full; k += 16) {
        __m256i v = _mm256_loadu_si256((const __m256i*)(w + k));
        ae = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), _mm256_load_ps(xp + k), ae);
        ao = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, hi)), _mm256_load_ps(xp + k + 8), ao);
    }
    float s = hsum8(_mm256_add_ps(ae, ao));
    for (int64_t k = full; k < K; k++) s = fmaf(bf16_to_f32(w[k]), xp[k], s);
    return s;
}

/* fp32 weights (used by the fused step of step.c for fp32 models): x in natural order. */
static inline void f32_rows(const float* const w[ROWS], int64_t K, const float* xp, float out[ROWS]) {
    __m256 a0[ROWS], a1[ROWS];
    for (int r = 0; r < ROWS; r++) a0[r] = a1[r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) { /* 16 floats = one 64-byte line per row */
        __m256 x0 = _mm256_load_ps(xp + k), x1 = _mm256_load_ps(xp + k + 8);
        for (int r = 0; r < ROWS; r++) {
            if (PF) _mm_prefetch((const char*)(w[r] + k) + PF, NK_PREFETCH_HINT);
            a0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w[r] + k), x0, a0[r]);
            a1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w[r] + k + 8), x1, a1[r]);
        }
    }
    _mm_storeu_ps(out, hsum8x4(_mm256_add_ps(a0[0], a1[0]), _mm256_add_ps(a0[1], a1[1]),
                               _mm256_add_ps(a0[2], a1[2]), _mm256_add_ps(a0[3], a1[3])));
    for (; k < K; k++)
        for (int r = 0; r < ROWS; r++) out[r] = fmaf(w[r][k], xp[k], out[r]);
}

static inline float f32_row(const float* w, int64_t K, const float* xp) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t full = K - K % 16;
    for (int64_t k = 0; k < full; k += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_load_ps(xp + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_load_ps(xp + k + 8), a1);
    }
    float s = hsum8(_mm256_add_ps(a0, a1));
    for (int64_t k = full; k < K; k++) s = fmaf(w[k], xp[k], s);
    return s;
}

#ifdef __AVX512F__
/* ---------------------------------------------------------------------------------------------------- */
/* 512-bit row kernels (the "avx512" and "avx512bf16" builds).                                          */
/*
 * Twice the weights per instruction of the AVX2 kernels: what they save is instructions, which leaves
 * them closer to the bandwidth (the int8 and int4 ones are in q8.c). Each kernel takes `nrows` = ROWS or 1 rows and sums every row in the
 * same order either way (always inlined, so each count gets its own code), so a row's value does not
 * depend on which kernel computes it, hence on the thread count. Horizontal sums: _mm512_reduce_add_ps,
 * a fixed tree. */

#define ZROWS_KERNEL static inline __attribute__((always_inline))

/* fp32 weights, x natural. 32 floats = two lines per row and iteration. */
ZROWS_KERNEL void f32_rows_z(const float* const w[ROWS], int64_t K, const float* xp, float* out, const int nrows) {
    __m512 a0[ROWS], a1[ROWS];
    for (int r = 0; r < nrows; r++) a0[r] = a1[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512 x0 = _mm512_load_ps(xp + k), x1 = _mm512_load_ps(xp + k + 16);
        for (int r = 0; r < nrows; r++) {
            if (PF) {
                _mm_prefetch((const char*)(w[r] + k) + PF, NK_PREFETCH_HINT);
                _mm_prefetch((const char*)(w[r] + k + 16) + PF, NK_PREFETCH_HINT);
            }
            a0[r] = _mm512_fmadd_ps(_mm512_loadu_ps(w[r] + k), x0, a0[r]);
            a1[r] = _mm512_fmadd_ps(_mm512_loadu_ps(w[r] + k + 16), x1, a1[r]);
        }
    }
    for (int r = 0; r < nrows; r++) {
        float s = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
        for (int64_t j = k; j < K; j++) s = fmaf(w[r][j], xp[j], s);
        out[r] = s;
    }
}

#endif /* __AVX512F__ */

#ifdef __AVX512BF16__
/* bf16 weights, x as bf16 pairs (X_BF16_PAIRS, exact copy): vdpbf16ps multiplies 32 weights by 32
 * elements of x and adds the pairs into 16 fp32 lanes, one instruction per 64 bytes of weights. The
 * products are exact (bf16 x bf16 fits fp32's 24-bit significand); the instruction rounds to nearest
 * even and treats subnormal inputs and results as zero (a bf16 subnormal is below 1.2e-38). */
ZROWS_KERNEL void bf16_rows_dp(const uint16_t* const w[ROWS], int64_t K, const float* xp, float* out, const int nrows) {
    const uint16_t* xb = (const uint16_t*)(xp + nk_x_bf16_at(K));
    __m512 a0[ROWS], a1[ROWS];
    for (int r = 0; r < nrows; r++) a0[r] = a1[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) { /* two lines per row and iteration */
        __m512bh x0 = (__m512bh)_mm512_loadu_si512(xb + k), x1 = (__m512bh)_mm512_loadu_si512(xb + k + 32);
        for (int r = 0; r < nrows; r++) {
            if (PF) {
                _mm_prefetch((const char*)(w[r] + k) + PF, NK_PREFETCH_HINT);
                _mm_prefetch((const char*)(w[r] + k + 32) + PF, NK_PREFETCH_HINT);
            }
            a0[r] = _mm512_dpbf16_ps(a0[r], (__m512bh)_mm512_loadu_si512(w[r] + k), x0);
            a1[r] = _mm512_dpbf16_ps(a1[r], (__m512bh)_mm512_loadu_si512(w[r] + k + 32), x1);
        }
    }
    for (; k + 32 <= K; k += 32) {
        __m512bh x0 = (__m512bh)_mm512_loadu_si512(xb + k);
        for (int r = 0; r < nrows; r++) a0[r] = _mm512_dpbf16_ps(a0[r], (__m512bh)_mm512_loadu_si512(w[r] + k), x0);
    }
    for (int r = 0; r < nrows; r++) {
        float s = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
        for (int64_t j = k; j < K; j++) s = fmaf(bf16_to_f32(w[r][j]), xp[j], s);
        out[r] = s;
    }
}

/* bf16 weights with an fp32 x that is not all bf16 values (X_BF16_PAIRS, inexact copy): each weight
 * widened to fp32 (vpmovzxwd, shift) and multiplied in fp32 with the natural-order x. */
ZROWS_KERNEL void bf16_rows_f32(const uint16_t* const w[ROWS], int64_t K, const float* xp, float* out, const int nrows) {
    __m512 a0[ROWS], a1[ROWS];
    for (int r = 0; r < nrows; r++) a0[r] = a1[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512 x0 = _mm512_load_ps(xp + k), x1 = _mm512_load_ps(xp + k + 16);
        for (int r = 0; r < nrows; r++) {
            __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(w[r] + k))), 16));
            __m512 w1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(w[r] + k + 16))), 16));
            a0[r] = _mm512_fmadd_ps(w0, x0, a0[r]);
            a1[r] = _mm512_fmadd_ps(w1, x1, a1[r]);
        }
    }
    for (int r = 0; r < nrows; r++) {
        float s = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
        for (int64_t j = k; j < K; j++) s = fmaf(bf16_to_f32(w[r][j]), xp[j], s);
        out[r] = s;
    }
}
#endif /* __AVX512BF16__ */

/* ---------------------------------------------------------------------------------------------------- */
/* Driver                                                                                               */

/* Scale (int8), bias, one rounding to the output dtype. With both a scale and a bias, acc * scale + bias
 * is one fused multiply-add (spelled out, so it does not depend on the compiler's contraction choice). */
static inline void finish_row(const gemv_args* a, int64_t n, float acc) {
    float bias = a->bias ? load_scalar(a->bias, a->bias_dtype, n) : 0.0f;
    if (a->kind == KIND_INT8) /* (int4's scales are applied per group, inside the dot product) */
        acc = a->bias ? fmaf(acc, load_scalar(a->scales, a->scales_dtype, n), bias)
                      : acc * load_scalar(a->scales, a->scales_dtype, n);
    else if (a->bias)
        acc += bias;
    store_scalar(a->y, a->y_dtype, n, acc);
}

/* The dot products of rows n[0 .. nrows) (nrows = ROWS or 1) with the prepared x, by the widest kernel
 * this build has for the weight kind. */
static inline __attribute__((always_inline)) void rows_kernel(const gemv_args* a, const int64_t n[ROWS], float* acc,
                                                              const int nrows) {
    const int64_t K = a->K;
    switch (a->kind) {
        case KIND_INT4:
        case KIND_INT8: nk_q8_rows(a, n, acc, nrows); return;
        case KIND_BF16: {
            const uint16_t* w[ROWS];
            for (int r = 0; r < nrows; r++) w[r] = (const uint16_t*)a->W + n[r] * K;
#ifdef __AVX512BF16__
            if (a->xp[nk_x_flag_at(K)] != 0.0f)
                bf16_rows_dp(w, K, a->xp, acc, nrows);
            else
                bf16_rows_f32(w, K, a->xp, acc, nrows);
#else
            if (nrows == ROWS)
                bf16_rows(w, K, a->xp, acc);
            else
                acc[0] = bf16_row(w[0], K, a->xp);
#endif
            return;
        }
        case KIND_F32: {
            const float* w[ROWS];
            for (int r = 0; r < nrows; r++) w[r] = (const float*)a->W + n[r] * K;
#ifdef __AVX512F__
            f32_rows_z(w, K, a->xp, acc, nrows);
#else
            if (nrows == ROWS)
                f32_rows(w, K, a->xp, acc);
            else
                acc[0] = f32_row(w[0], K, a->xp);
#endif
            return;
        }
        default: return; /* no other kinds reach here (the exported GEMVs set the kind) */
    }
}

/* Rows [begin, end) of one thread. `streams` consecutive sub-ranges of q rows each are walked in
 * lockstep (row i of every sub-range together), so the thread reads that many long sequential streams: each
 * sub-range is contiguous in memory, across row ends. Taking adjacent rows instead puts several
 * streams in one 4 KB page when rows are short (K=1024 bf16 is 2 KB), which the hardware prefetchers
 * track poorly. q is made odd so that the streams are not a large power of two bytes apart (same DRAM
 * bank and cache sets, which measurably slows e.g. N=2^k, K=1024); the rows left after the sub-ranges
 * (at most 2 * streams - 1) are done one at a time. */
static inline __attribute__((always_inline)) void rows_in_streams(const gemv_args* a, int64_t begin, int64_t end,
                                                                  const int streams) {
    const int64_t len = end - begin;
    int64_t q = len / streams;
    if (q > 0 && q % 2 == 0) q -= 1;
    float acc[ROWS];
    for (int64_t i = 0; i < q; i++) {
        int64_t n[ROWS];
        for (int r = 0; r < streams; r++) n[r] = begin + r * q + i;
        if (streams == ROWS)
            rows_kernel(a, n, acc, ROWS);
        else
            nk_q8_rows(a, n, acc, streams);
        for (int r = 0; r < streams; r++) finish_row(a, n[r], acc[r]);
    }
    for (int64_t n = begin + streams * q; n < end; n++) {
        const int64_t one[ROWS] = {n};
        rows_kernel(a, one, acc, 1);
        finish_row(a, n, acc[0]);
    }
}

/* int4 rows take 2 streams, not ROWS: each drags along its scale and min codes (arrays of their own) and its
 * tile's units, so 4 rows made 20 streams a thread. On 2 cores of a Zen 4, alternated in one process, 2 streams
 * ran the int4 decode step of nekomata-7b 1.08x and 1.16x as fast (two runs), of the 620M model 1.09x; a row's
 * value does not depend on the rows it is computed with, so the results are the same. */
#define INT4_STREAMS 2

void nk_gemv_rows(const gemv_args* a, int64_t begin, int64_t end) {
    if (a->kind == KIND_INT4)
        rows_in_streams(a, begin, end, INT4_STREAMS);
    else
        rows_in_streams(a, begin, end, ROWS);
}

/* ---------------------------------------------------------------------------------------------------- */
/* Batched rows: one weight row against B prepared activation vectors (the native step for B > 1).      */
/*
 * A step of B rows multiplies every weight by B vectors. Reading the weight from DRAM once per vector
 * would cost B times the bandwidth of a batch-1 step; here each weight chunk is loaded and converted
 * once and then multiplied into up to NK_BATCH_TILE vectors' accumulators (two per vector, as in the
 * batch-1 kernels: 2 x 4 accumulators + the converted weights fit the 16 AVX2 registers). A batch of
 * more than NK_BATCH_TILE vectors walks the same weight row again for each further tile of vectors; that
 * row (at most a few tens of KB) is then still in L1/L2, so DRAM is read once per step either way.
 *
 * Every (weight row, vector) sum is the same sequence of IEEE operations, in the same order, as the
 * one-row kernel of the same weight kind above (bf16_row, f32_row, which the 4-row kernels equal; int8
 * and int4: the same q8.c kernel serves both): chunk by chunk into the same accumulators, the same horizontal sum,
 * the same scalar tail, the same finish_row. So a vector's result is bit-identical to the avx2 build's
 * batch-1 GEMV of that vector alone, and does not depend on the batch size, the tile it falls in or the
 * thread count. (The bf16 and fp32 ones are AVX2 in every build, except bf16 in avx512bf16;
 * the AVX-512 builds' other batch-1 kernels sum in another order, so there the two agree to fp32
 * rounding. int8 and int4 are bit-identical to batch 1 in every build.)
 */

/* Software prefetch distance of the batched rows, in bytes. They read ONE stream per thread (the batch-1
 * kernels read ROWS streams, PF ahead each), so they need a longer distance to keep as many misses in
 * flight (measured with a single-thread microbenchmark, N = 8192, K = 1024, bf16). */
#ifndef PF_BATCH
#define PF_BATCH 2048
#endif

/* The weight bytes of one block of rows that q8.c's register tiles sweep once per tile of vectors (see
 * nk_gemv_rows_batch): well inside a core's L2 (1.25-2 MB on the CPUs we run on), with room for the
 * activations. Measured on an Ice Lake Xeon (2 cores, 128 rows of x, int8 and int4 at [2816, 1024],
 * [1024, 2816] and [11008, 4096]): 128 KB 210-290 GOP/s, 256 and 512 KB about the same or a little less,
 * no blocking (each row tile swept over every vector's activations) 110-220. int4 blocks come with their
 * prepared scales (q8.c's nk_q8_tile_prepare, 1.1 times the weights' bytes), also in L2. */
#define TILE_BLOCK_BYTES (128 * 1024)

/* The prepared scales of the block of int4 rows a thread's tiles sweep (nk_q8_tile_prepare): thread-local,
 * grown as needed and never freed, like xbuf (at most TILE_BLOCK_BYTES * 10 / 9 per thread that ran a
 * tile). NULL when it cannot be allocated: the rows then go one by one, to the same results. */
static __thread float* tile_prepared = NULL;
static __thread int64_t tile_prepared_len = 0;

static float* tile_prepared_get(int64_t floats) {
    if (floats > tile_prepared_len) {
        free(tile_prepared);
        const int64_t len = (floats + 63) & ~(int64_t)63;
        tile_prepared = (float*)aligned_alloc(64, (size_t)len * sizeof(float));
        tile_prepared_len = tile_prepared ? len : 0;
    }
    return tile_prepared;
}

/* bf16 weights, x split (see nk_load_x); nb vectors xp + b * xs. */
static inline __attribute__((always_inline)) void bf16_row_batch(const uint16_t* w, int64_t K, const float* xp,
                                                                 int64_t xs, float* out, const int nb,
                                                                 const int prefetch) {
    const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
    __m256 ae[NK_BATCH_TILE], ao[NK_BATCH_TILE];
    for (int b = 0; b < nb; b++) ae[b] = ao[b] = _mm256_setzero_ps();
    const int64_t full = K - K % 16;
    for (int64_t k = 0; k < full; k += 16) {
        /* one prefetch per 64-byte line (32 weights), for the first tile only: later tiles hit cache */
        if (PF_BATCH && prefetch && (k & 16) == 0) _mm_prefetch((const char*)(w + k) + PF_BATCH, NK_PREFETCH_HINT);
        __m256i v = _mm256_loadu_si256((const __m256i*)(w + k));
        __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
        for (int b = 0; b < nb; b++) {
            ae[b] = _mm256_fmadd_ps(we, _mm256_load_ps(xp + b * xs + k), ae[b]);
            ao[b] = _mm256_fmadd_ps(wo, _mm256_load_ps(xp + b * xs + k + 8), ao[b]);
        }
    }
    for (int b = 0; b < nb; b++) {
        const float* x = xp + b * xs;
        float s = hsum8(_mm256_add_ps(ae[b], ao[b]));
        for (int64_t k = full; k < K; k++) s = fmaf(bf16_to_f32(w[k]), x[k], s);
        out[b] = s;
    }
}

/* fp32 weights, x in natural order. */
static inline __attribute__((always_inline)) void f32_row_batch(const float* w, int64_t K, const float* xp,
                                                                int64_t xs, float* out, const int nb,
                                                                const int prefetch) {
    __m256 a0[NK_BATCH_TILE], a1[NK_BATCH_TILE];
    for (int b = 0; b < nb; b++) a0[b] = a1[b] = _mm256_setzero_ps();
    const int64_t full = K - K % 16;
    for (int64_t k = 0; k < full; k += 16) { /* 16 floats = one 64-byte line */
        if (PF_BATCH && prefetch) _mm_prefetch((const char*)(w + k) + PF_BATCH, NK_PREFETCH_HINT);
        __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + k + 8);
        for (int b = 0; b < nb; b++) {
            a0[b] = _mm256_fmadd_ps(w0, _mm256_load_ps(xp + b * xs + k), a0[b]);
            a1[b] = _mm256_fmadd_ps(w1, _mm256_load_ps(xp + b * xs + k + 8), a1[b]);
        }
    }
    for (int b = 0; b < nb; b++) {
        const float* x = xp + b * xs;
        float s = hsum8(_mm256_add_ps(a0[b], a1[b]));
        for (int64_t k = full; k < K; k++) s = fmaf(w[k], x[k], s);
        out[b] = s;
    }
}

#ifdef __AVX512BF16__
/* Whether vectors xp .. xp + (nb - 1) * xs (prepared as X_BF16_PAIRS) all carry exact bf16 copies. */
static inline int bf16_copies_exact(const float* xp, int64_t xs, int64_t K, int64_t nb) {
    int exact = 1;
    for (int64_t b = 0; b < nb; b++) exact &= xp[b * xs + nk_x_flag_at(K)] != 0.0f;
    return exact;
}

/* `rows` (1..BF16_TILE_ROWS) consecutive bf16 weight rows from w0 against nb vectors prepared as
 * X_BF16_PAIRS with exact bf16 copies (the avx512bf16 build): each 64-byte chunk of a row goes through
 * vdpbf16ps with every vector, in exactly bf16_rows_dp's order, so every (row, vector) sum equals that
 * build's batch-1 GEMV, bit for bit. Why two rows: with one, each vector chunk loaded feeds one vdpbf16ps
 * (10 loads per 8 of them, and Zen 4 takes one 512-bit load per cycle); with two it feeds two (12 loads
 * per 16). 2 rows x 4 vectors x 2 accumulators + 4 weight chunks + 1 of x: 21 of the 32 registers.
 * out[r * NK_BATCH_TILE + b] = row r against vector b. pf: the prefetch distance in bytes, 0 for none
 * (only the first pass over a row prefetches). */
#define BF16_TILE_ROWS 2
/* Unrolled completely, so that every accumulator is a register of its own (as q8.c's TILE_UNROLL). */
#define BF16_TILE_UNROLL _Pragma("GCC unroll 8")

static inline __attribute__((always_inline)) void bf16_tile_dp(const uint16_t* w0, int64_t K, const float* xp,
                                                               int64_t xs, float* out, const int rows,
                                                               const int nb, const int64_t pf) {
    const int64_t at = nk_x_bf16_at(K);
    const uint16_t* w[BF16_TILE_ROWS];
    BF16_TILE_UNROLL
    for (int r = 0; r < rows; r++) w[r] = w0 + r * K;
    __m512 a0[BF16_TILE_ROWS][NK_BATCH_TILE], a1[BF16_TILE_ROWS][NK_BATCH_TILE];
    BF16_TILE_UNROLL
    for (int r = 0; r < rows; r++)
        BF16_TILE_UNROLL
        for (int b = 0; b < nb; b++) a0[r][b] = a1[r][b] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        __m512bh c0[BF16_TILE_ROWS], c1[BF16_TILE_ROWS];
        BF16_TILE_UNROLL
        for (int r = 0; r < rows; r++) {
            if (pf) {
                _mm_prefetch((const char*)(w[r] + k) + pf, NK_PREFETCH_HINT);
                _mm_prefetch((const char*)(w[r] + k + 32) + pf, NK_PREFETCH_HINT);
            }
            c0[r] = (__m512bh)_mm512_loadu_si512(w[r] + k);
            c1[r] = (__m512bh)_mm512_loadu_si512(w[r] + k + 32);
        }
        BF16_TILE_UNROLL
        for (int b = 0; b < nb; b++) {
            const uint16_t* xb = (const uint16_t*)(xp + b * xs + at);
            const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xb + k), x1 = (__m512bh)_mm512_loadu_si512(xb + k + 32);
            BF16_TILE_UNROLL
            for (int r = 0; r < rows; r++) {
                a0[r][b] = _mm512_dpbf16_ps(a0[r][b], c0[r], x0);
                a1[r][b] = _mm512_dpbf16_ps(a1[r][b], c1[r], x1);
            }
        }
    }
    for (; k + 32 <= K; k += 32)
        BF16_TILE_UNROLL
        for (int b = 0; b < nb; b++) {
            const __m512bh x0 = (__m512bh)_mm512_loadu_si512((const uint16_t*)(xp + b * xs + at) + k);
            BF16_TILE_UNROLL
            for (int r = 0; r < rows; r++)
                a0[r][b] = _mm512_dpbf16_ps(a0[r][b], (__m512bh)_mm512_loadu_si512(w[r] + k), x0);
        }
    BF16_TILE_UNROLL
    for (int r = 0; r < rows; r++)
        BF16_TILE_UNROLL
        for (int b = 0; b < nb; b++) {
            const float* x = xp + b * xs;
            float s = _mm512_reduce_add_ps(_mm512_add_ps(a0[r][b], a1[r][b]));
            for (int64_t j = k; j < K; j++) s = fmaf(bf16_to_f32(w[r][j]), x[j], s);
            out[r * NK_BATCH_TILE + b] = s;
        }
}

/* The same rows when some vector is not all bf16 values: each vector on its own through bf16_rows_f32
 * (the weight row is in cache after the first). */
static inline void bf16_row_batch_f32(const uint16_t* w, int64_t K, const float* xp, int64_t xs, float* out, int nb) {
    const uint16_t* rows[ROWS] = {w};
    for (int b = 0; b < nb; b++) bf16_rows_f32(rows, K, xp + b * xs, out + b, 1);
}
#endif

/* Weight row n against the nb (1..NK_BATCH_TILE, a constant after inlining) vectors at xp, stride xs. */
static inline __attribute__((always_inline)) void row_batch(const gemv_args* a, int64_t n, const float* xp,
                                                            int64_t xs, float* out, const int nb,
                                                            const int prefetch) {
    const int64_t K = a->K;
    switch (a->kind) {
        case KIND_INT4:
        case KIND_INT8: nk_q8_row_batch(a, n, xp, xs, out, nb, prefetch); break;
        case KIND_BF16: {
#ifdef __AVX512BF16__
            if (bf16_copies_exact(xp, xs, K, nb))
                bf16_tile_dp((const uint16_t*)a->W + n * K, K, xp, xs, out, 1, nb, prefetch ? PF_BATCH : 0);
            else
                bf16_row_batch_f32((const uint16_t*)a->W + n * K, K, xp, xs, out, nb);
#else
            bf16_row_batch((const uint16_t*)a->W + n * K, K, xp, xs, out, nb, prefetch);
#endif
            break;
        }
        case KIND_F32: f32_row_batch((const float*)a->W + n * K, K, xp, xs, out, nb, prefetch); break;
    }
}

/* The results acc[r * stride + b] of weight rows n0 .. n0 + rows - 1 against vectors b0 .. b0 + nb - 1,
 * finished into each vector's output row (row: a copy of a whose y is moved there). */
static inline void finish_tile(const gemv_args* a, gemv_args* row, size_t ysize, int64_t n0, int rows, int64_t b0,
                               int nb, const float* acc, int stride) {
    for (int r = 0; r < rows; r++)
        for (int b = 0; b < nb; b++) {
            row->y = (char*)a->y + (size_t)((b0 + b) * a->N) * ysize;
            finish_row(row, n0 + r, acc[r * stride + b]);
        }
}

/* Rows [begin, end) of the GEMVs of `batch` vectors (see common.h). Each weight row is taken once and
 * multiplied into every vector, NK_BATCH_TILE vectors per pass; the thread reads one sequential stream
 * (its rows are contiguous), prefetched ahead on the first pass over each row. int8 and int4 weights in
 * the AVX512-VNNI builds go a few rows at a time through q8.c's register tiles instead, and bf16 weights in
 * the avx512bf16 build two rows at a time through bf16_tile_dp (the rows left over one by one as above):
 * the same values, bit for bit, in a fraction of the instructions. */
_Static_assert(NK_BATCH_TILE == 4, "nk_gemv_rows_batch dispatches on 1..4 vectors per pass");

void nk_gemv_rows_batch(const gemv_args* a, int64_t batch, int64_t begin, int64_t end) {
    if (batch == 1) {
        nk_gemv_rows(a, begin, end);
        return;
    }
    const int64_t xs = nk_x_stride(a->K, nk_x_layout(a->kind));
    const size_t ysize = a->y_dtype == DT_F32 ? 4 : 2;
    float acc[NK_BATCH_TILE];
    gemv_args row = *a; /* row.y is moved to each vector's output row */
    int64_t n = begin;
    int tile_vectors = 0;
    const int tile_rows = nk_q8_tile_shape(a, &tile_vectors); /* a few rows at a time where q8.c has tiles */
    if (tile_rows > 0) {
        /* Blocked like a GEMM: a block of weight rows that stays in L2 is swept once per tile of vectors,
         * whose activations then stay in L1, so what is streamed from L2 is the weights (8 or 4 bytes of
         * them per multiply of 64 bytes of x) rather than the activations of every vector for every row
         * tile. Only the first sweep over a block prefetches: it reads it from DRAM. */
        float tile_acc[NK_Q8_TILE_MAX];
        const int64_t row_bytes = a->kind == KIND_INT4 ? a->K / 2 + 2 * (a->K / NK_INT4_GROUP) : a->K;
        int64_t block = TILE_BLOCK_BYTES / (row_bytes > 0 ? row_bytes : 1) / tile_rows * tile_rows;
        if (block < tile_rows) block = tile_rows;
        /* int4 scales prepared once per block when several tiles of vectors sweep it (a prefill). */
        const int64_t row_floats = batch > tile_vectors ? nk_q8_tile_prepared_floats(a, 1) : 0;
        float* prepared = row_floats ? tile_prepared_get(block * row_floats) : NULL;
        const int64_t tiled_end = row_floats && !prepared ? begin : begin + (end - begin) / tile_rows * tile_rows;
        for (int64_t b_begin = begin; b_begin < tiled_end; b_begin += block) {
            const int64_t b_end = b_begin + block < tiled_end ? b_begin + block : tiled_end;
            if (prepared) nk_q8_tile_prepare(a, b_begin, b_end - b_begin, prepared);
            for (int64_t b0 = 0; b0 < batch; b0 += tile_vectors) {
                const int64_t left = batch - b0;
                const int nb = left >= tile_vectors ? tile_vectors : (int)left;
                for (int64_t t = b_begin; t < b_end; t += tile_rows) {
                    nk_q8_tile(a, t, a->xp + b0 * xs, xs, nb, tile_acc, b0 == 0,
                               prepared ? prepared + (t - b_begin) * row_floats : NULL);
                    finish_tile(a, &row, ysize, t, tile_rows, b0, nb, tile_acc, tile_vectors);
                }
            }
        }
        n = tiled_end;
    }
#ifdef __AVX512BF16__
    if (a->kind == KIND_BF16) {
        /* Pairs of rows through bf16_tile_dp, a tile of vectors at a time, while every vector of the tile
         * has an exact bf16 copy (else, and for the odd row left, the rows go one by one below). */
        const uint16_t* W = (const uint16_t*)a->W;
        const int64_t pairs_end = begin + (end - begin) / BF16_TILE_ROWS * BF16_TILE_ROWS;
        const int64_t pf = nk_tile_prefetch_distance(BF16_TILE_ROWS * a->K * 2);
        const int exact = bf16_copies_exact(a->xp, xs, a->K, batch);
        for (; exact && n < pairs_end; n += BF16_TILE_ROWS)
            for (int64_t b0 = 0; b0 < batch; b0 += NK_BATCH_TILE) {
                const float* xp = a->xp + b0 * xs;
                const int64_t left = batch - b0;
                const int nb = left >= NK_BATCH_TILE ? NK_BATCH_TILE : (int)left;
                const int64_t pf_first = b0 == 0 ? pf : 0;
                float tile[BF16_TILE_ROWS * NK_BATCH_TILE];
                switch (nb) { /* a constant count per call, so that the loops over vectors unroll */
                    case 1: bf16_tile_dp(W + n * a->K, a->K, xp, xs, tile, BF16_TILE_ROWS, 1, pf_first); break;
                    case 2: bf16_tile_dp(W + n * a->K, a->K, xp, xs, tile, BF16_TILE_ROWS, 2, pf_first); break;
                    case 3: bf16_tile_dp(W + n * a->K, a->K, xp, xs, tile, BF16_TILE_ROWS, 3, pf_first); break;
                    default: bf16_tile_dp(W + n * a->K, a->K, xp, xs, tile, BF16_TILE_ROWS, 4, pf_first); break;
                }
                finish_tile(a, &row, ysize, n, BF16_TILE_ROWS, b0, nb, tile, NK_BATCH_TILE);
            }
    }
#endif
    for (; n < end; n++) {
        for (int64_t b0 = 0; b0 < batch; b0 += NK_BATCH_TILE) {
            const float* xp = a->xp + b0 * xs;
            const int64_t left = batch - b0;
            const int first = b0 == 0, nb = left >= NK_BATCH_TILE ? NK_BATCH_TILE : (int)left;
            switch (nb) { /* a constant count per call, so that the loops over vectors unroll */
                case 1: row_batch(a, n, xp, xs, acc, 1, first); break;
                case 2: row_batch(a, n, xp, xs, acc, 2, first); break;
                case 3: row_batch(a, n, xp, xs, acc, 3, first); break;
                default: row_batch(a, n, xp, xs, acc, 4, first); break;
            }
            finish_tile(a, &row, ysize, n, 1, b0, nb, acc, 0);
        }
    }
}

void nk_load_rows(float* dst, const void* x, int x_dtype, int64_t K, int layout, int64_t rows) {
    const int64_t xs = nk_x_stride(K, layout);
    const size_t row = (size_t)K * (x_dtype == DT_F32 ? 4 : 2);
    for (int64_t m = 0; m < rows; m++) nk_load_x(dst + m * xs, (const char*)x + m * row, x_dtype, K, layout);
}

/* The GEMVs of M rows of x ([M, K] of x_dtype, row-major) into y [M, N], the output rows split over the
 * threads (nk_gemv_rows_batch: one row through the batch-1 rows, more each weight row read once for all). */
static int gemv_run(gemv_args* a, const void* x, int x_dtype, int nthreads, int64_t M) {
    if (a->N <= 0 || M <= 0) return 0;
    const int layout = nk_x_layout(a->kind);
    float* xp = nk_xbuf_get(a->K > 0 ? M * nk_x_stride(a->K, layout) : 1);
    if (!xp) return -1;
    const int team = team_size(a->N, a->K * M, nthreads);
    a->xp = xp;
    if (team == 1) { /* skip the OpenMP runtime entirely: it costs more than a small GEMV */
        nk_load_rows(xp, x, x_dtype, a->K, layout, M);
        nk_gemv_rows_batch(a, M, 0, a->N);
        return 0;
    }
    /* Many rows of x (a prefill) are prepared by the team, each row on its own (the same values whoever
     * prepares it): serially, quantizing 128 rows took ~4% of an int4 prefill. */
    const int team_loads = M >= 4 * team;
    if (!team_loads) nk_load_rows(xp, x, x_dtype, a->K, layout, M);
    const int64_t xs = nk_x_stride(a->K, layout);
    const size_t row_bytes = (size_t)a->K * (x_dtype == DT_F32 ? 4 : 2);
#pragma omp parallel num_threads(team)
    {
        if (team_loads) {
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) nk_load_x(xp + m * xs, (const char*)x + m * row_bytes, x_dtype, a->K, layout);
        } /* (the loop's implicit barrier: every row is ready before any GEMV reads it) */
        /* One contiguous slab of rows per thread (static schedule): rows cost the same, so this is balanced,
         * and threads share no cache line of W and only the boundary line of y. */
#pragma omp for schedule(static)
        for (int t = 0; t < team; t++) nk_gemv_rows_batch(a, M, a->N * t / team, a->N * (t + 1) / team);
    }
    return 0;
}

/* `flags` packs the dtype codes and the thread count (FLAG_* in common.h). */

/* Each exported GEMV takes M rows of x ([M, K]) and writes y [M, N].
 *
 * y[n] = sum_k W[n,k] x[k] + bias[n] (bias may be NULL), rounded once to the y dtype.
 * Returns 0, or -1 if the activation buffer cannot be allocated. */
NK_EXPORT int nekomata_gemv_bf16(const uint16_t* W, const void* x, const void* bias, void* y, int64_t N,
                                 int64_t K, int64_t M, int flags) {
    gemv_args a = {KIND_BF16, W, NULL, NULL, NULL, DT_F32, bias, FLAG_BIAS(flags), y, FLAG_Y(flags), N, K};
    return gemv_run(&a, x, FLAG_X(flags), FLAG_THREADS(flags), M);
}

/* y[n] = scales[n] * sum_k W[n,k] x[k] + bias[n] (bias may be NULL), rounded once to the y dtype.
 * Returns 0, or -1 if the activation buffer cannot be allocated. */
NK_EXPORT int nekomata_gemv_int8(const int8_t* W, const void* scales, const void* x, const void* bias, void* y,
                                 int64_t N, int64_t K, int64_t M, int flags) {
    gemv_args a = {KIND_INT8, W, NULL, scales, NULL, FLAG_SCALES(flags), bias, FLAG_BIAS(flags), y, FLAG_Y(flags), N, K};
    return gemv_run(&a, x, FLAG_X(flags), FLAG_THREADS(flags), M);
}

/* y[n] = sum_g scale[n,g] * sum_j code[n, g*G+j] x[g*G+j] + sum_g min[n,g] * sum_j x[g*G+j] + bias[n]
 * (bias may be NULL; G = NK_INT4_GROUP, K a multiple of G), rounded once to the y dtype. W is uint8
 * [N, K/2], scales uint8 and mins int8 [N, K/G], scale_units and min_units bf16 [ceil(N/T), K/G] (see
 * NK_INT4_GROUP and NK_INT4_TILE). Returns 0, -1 if the activation buffer cannot be allocated, -3 if K
 * is not a multiple of G. */
NK_EXPORT int nekomata_gemv_int4(const uint8_t* W, const uint8_t* scales, const int8_t* mins,
                                 const uint16_t* scale_units, const uint16_t* min_units, const void* x,
                                 const void* bias, void* y, int64_t N, int64_t K, int64_t M, int flags) {
    if (K % NK_INT4_GROUP) return -3;
    gemv_args a = {KIND_INT4, W, NULL, scales, mins, DT_BF16, bias, FLAG_BIAS(flags), y, FLAG_Y(flags), N, K,
                   scale_units, min_units};
    return gemv_run(&a, x, FLAG_X(flags), FLAG_THREADS(flags), M);
}

/* ---------------------------------------------------------------------------------------------------- */
/* int4 → float for wide products (a prefill multiplies the weight by many rows, so it pays to expand it   */
/* once into the dtype the CPU multiplies fastest and hand it to PyTorch's matmul).                        */

/* Round-to-nearest-even of 8 floats to bf16 bits (NaN kept quiet), as f32_to_bf16 does one at a time. */
static inline __m128i f32x8_to_bf16(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    __m256i nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x0040));
    __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    __m256i bits = _mm256_blendv_epi8(rounded, nan, is_nan);  /* each 32-bit lane holds 16 bits */
    __m256i packed = _mm256_packus_epi32(bits, bits);         /* lanes 0-3 and 4-7 in the two halves */
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0xd8));
}

/* Codes 8 .. 8+7 of a group (taken from `bytes`, low or high nibbles) times scale plus min, in fp32 with
 * two roundings (product, then sum: -ffp-contract=off), as `q * scale + min` in PyTorch. */
static inline __m256 int4_values8(__m128i nibbles8, __m256 scale, __m256 min) {
    __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(nibbles8));
    return _mm256_add_ps(_mm256_mul_ps(q, scale), min);
}

/* out [N, K] (fp32 or bf16) = code * scale + min per group of NK_INT4_GROUP inputs, each value computed in
 * fp32 and rounded once to the out dtype: exactly `dequantize_int4(...).to(dtype)` of
 * nekomata_core/quantize.py. W, scales, mins and the units as for nekomata_gemv_int4 (row 0 starts a
 * tile). Rows are split over `nthreads` threads. Returns 0, -3 if K is not a multiple of G, -4 for an out
 * dtype other than fp32 or bf16. */
NK_EXPORT int nekomata_dequantize_int4(const uint8_t* W, const uint8_t* scales, const int8_t* mins,
                                       const uint16_t* scale_units, const uint16_t* min_units, void* out,
                                       int out_dtype, int64_t N, int64_t K, int nthreads) {
    if (K % NK_INT4_GROUP) return -3;
    if (out_dtype != DT_F32 && out_dtype != DT_BF16) return -4;
    const int64_t groups = K / NK_INT4_GROUP;
    const __m128i low4 = _mm_set1_epi8(0x0f);
#pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1) if (N * K >= 65536)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t* sc = scales + n * groups;
        const int8_t* mn = mins + n * groups;
        const uint16_t *su = scale_units + (n / NK_INT4_TILE) * groups, *mu = min_units + (n / NK_INT4_TILE) * groups;
        int64_t g = 0;
#ifdef __AVX512BF16__
        /* A group at a time in 512-bit vectors, rounded by vcvtne2ps2bf16 (round to nearest even, NaN made
         * quiet with its payload, as f32_to_bf16): several times the AVX2 loop below, which a prefill pays
         * on every weight. The instruction treats subnormal inputs as zero, so a group with a subnormal value
         * (scales and mins below 1e-38: no real weight) is left to the exact loop from there on. */
        if (out_dtype == DT_BF16) {
            const __m512i low = _mm512_set1_epi32(15);
            for (; g < groups; g++) {
                const __m512 scale = _mm512_set1_ps((float)sc[g] * bf16_to_f32(su[g]));
                const __m512 min = _mm512_set1_ps((float)mn[g] * bf16_to_f32(mu[g]));
                __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(W + n * (K / 2) + g * (NK_INT4_GROUP / 2))));
                __m512 lo = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low)), scale), min);
                __m512 hi = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), scale), min);
                if (_mm512_fpclass_ps_mask(lo, 0x20) | _mm512_fpclass_ps_mask(hi, 0x20)) break; /* 0x20: subnormal */
                _mm512_storeu_si512((uint16_t*)out + n * K + g * NK_INT4_GROUP, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
            }
        }
#endif
        for (; g < groups; g++) {
            const __m256 scale = _mm256_set1_ps((float)sc[g] * bf16_to_f32(su[g]));
            const __m256 min = _mm256_set1_ps((float)mn[g] * bf16_to_f32(mu[g]));
            const __m128i bytes = _mm_loadu_si128((const __m128i*)(W + n * (K / 2) + g * (NK_INT4_GROUP / 2)));
            const __m128i lo = _mm_and_si128(bytes, low4), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
            /* byte j holds code j (low nibble) and code j + 16 (high nibble) */
            const __m256 v[4] = {int4_values8(lo, scale, min), int4_values8(_mm_srli_si128(lo, 8), scale, min),
                                 int4_values8(hi, scale, min), int4_values8(_mm_srli_si128(hi, 8), scale, min)};
            const int64_t k = n * K + g * NK_INT4_GROUP;
            for (int i = 0; i < 4; i++) {
                if (out_dtype == DT_F32)
                    _mm256_storeu_ps((float*)out + k + 8 * i, v[i]);
                else
                    _mm_storeu_si128((__m128i*)((uint16_t*)out + k + 8 * i), f32x8_to_bf16(v[i]));
            }
        }
    }
    return 0;
}

/* int8 → float for wide products: out [N, K] (fp32 or bf16) = W, exactly (every int8 value is exact in
 * both: its fp32 bits end in 16 zeros, so the bf16 is the fp32's top half). Faster than PyTorch's copy
 * (a prefill converts every int8 weight once). Elements are split over `nthreads` threads. Returns 0, or
 * -4 for an out dtype other than fp32 or bf16. */
#define EXPAND_CHUNK 65536

NK_EXPORT int nekomata_expand_int8(const int8_t* W, void* out, int out_dtype, int64_t N, int64_t K, int nthreads) {
    if (out_dtype != DT_F32 && out_dtype != DT_BF16) return -4;
    const int64_t total = N * K, chunks = (total + EXPAND_CHUNK - 1) / EXPAND_CHUNK;
    float* of = (float*)out;
    uint16_t* ob = (uint16_t*)out;
#pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1) if (chunks > 1)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t end = (c + 1) * EXPAND_CHUNK < total ? (c + 1) * EXPAND_CHUNK : total;
        int64_t i = c * EXPAND_CHUNK;
#ifdef __AVX512F__
        for (; i + 16 <= end; i += 16) {
            __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(W + i))));
            if (out_dtype == DT_BF16)
                _mm256_storeu_si256((__m256i*)(ob + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(f), 16)));
            else
                _mm512_storeu_ps(of + i, f);
        }
#else
        for (; i + 16 <= end; i += 16) {
            __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(W + i))));
            __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(W + i + 8))));
            if (out_dtype == DT_BF16) {
                __m256i h = _mm256_packus_epi32(_mm256_srli_epi32(_mm256_castps_si256(f0), 16),
                                                _mm256_srli_epi32(_mm256_castps_si256(f1), 16));
                _mm256_storeu_si256((__m256i*)(ob + i), _mm256_permute4x64_epi64(h, 0xd8));
            } else {
                _mm256_storeu_ps(of + i, f0);
                _mm256_storeu_ps(of + i + 8, f1);
            }
        }
#endif
        for (; i < end; i++) {
            if (out_dtype == DT_BF16)
                ob[i] = f32_to_bf16((float)W[i]);
            else
                of[i] = (float)W[i];
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Plain fp32 entry points (x, bias, scales and y all fp32).                                            */

NK_EXPORT void gemv_bf16(const uint16_t* W, const float* x, const float* bias, float* y, int64_t N, int64_t K,
                         int nthreads) {
    nekomata_gemv_bf16(W, x, bias, y, N, K, 1, nthreads << 16);
}

NK_EXPORT void gemv_int8(const int8_t* W, const float* scales, const float* x, const float* bias, float* y,
                         int64_t N, int64_t K, int nthreads) {
    nekomata_gemv_int8(W, scales, x, bias, y, N, K, 1, nthreads << 16);
}
