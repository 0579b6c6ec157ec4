/*
 * Memory-bound matrix-vector products y = W x for batch-1 decoding on x86-64 CPUs (AVX2 + FMA + F16C).
 *
 * W is row-major [N, K] (bf16 bits, or int8 with one fp32 scale per output row), x has K elements,
 * y has N. Decoding one token at batch 1 reads every weight exactly once, so the speed of a GEMV is
 * bytes(W) / DRAM bandwidth as long as the arithmetic keeps up: the kernels below are built so that
 * converting and multiplying a 32-byte load costs fewer cycles than DRAM needs to deliver it.
 *
 * Accumulation is in fp32 (fused multiply-add); the summation order differs from PyTorch's but every
 * product and partial sum is an ordinary IEEE fp32 operation, so NaN and inf propagate as usual.
 * Results are rounded once to the requested output dtype (round-to-nearest-even, like torch's casts)
 * after the bias (and, for int8, the row scale) has been applied in fp32.
 *
 * Plain C with C linkage: built at first use by kernels/cpu_gemv.py with
 * `cc -O3 -mavx2 -mfma -mf16c -fopenmp -fPIC -shared` and called through ctypes (which releases the GIL).
 * OpenMP parallelises over blocks of output rows with a static schedule: rows are long (K >= 1024 in the
 * models we care about), equally expensive and contiguous in memory, so a static split has no imbalance
 * and each thread streams one contiguous slab of W.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* Bumped whenever an exported signature or a semantic changes: the Python loader refuses a library whose
 * version differs from the one it was written for (a stale build picked up from an old cache). */
#define NEKOMATA_GEMV_ABI_VERSION 1

/* Dtype codes shared with kernels/cpu_gemv.py (x, bias, scales and y may each be any of these). */
enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

/* Output rows handled together: the x vector is loaded once per R rows, which cuts the L1 load traffic
 * per weight. 4 rows x 2 accumulators = 8 independent FMA chains, enough to cover the FMA latency. */
#define ROWS 4

/* Below this many weights a GEMV takes a few microseconds on one core, about what waking the OpenMP
 * team costs, so small products run single-threaded. */
#define MIN_WEIGHTS_PER_THREAD 65536

int nekomata_gemv_abi_version(void) { return NEKOMATA_GEMV_ABI_VERSION; }

/* ---------------------------------------------------------------------------------------------------- */
/* Scalar conversions (tails, bias, scales, outputs).                                                   */

static inline float bf16_to_f32(uint16_t bits) {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round-to-nearest-even, NaN kept quiet: the same rule as c10::BFloat16's float constructor. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float f16_to_f32(uint16_t bits) { return _cvtsh_ss(bits); }

static inline uint16_t f32_to_f16(float f) { return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }

static inline float load_scalar(const void* p, int dtype, int64_t i) {
    switch (dtype) {
        case DT_BF16: return bf16_to_f32(((const uint16_t*)p)[i]);
        case DT_F16: return f16_to_f32(((const uint16_t*)p)[i]);
        default: return ((const float*)p)[i];
    }
}

static inline void store_scalar(void* p, int dtype, int64_t i, float v) {
    switch (dtype) {
        case DT_BF16: ((uint16_t*)p)[i] = f32_to_bf16(v); break;
        case DT_F16: ((uint16_t*)p)[i] = f32_to_f16(v); break;
        default: ((float*)p)[i] = v; break;
    }
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
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
 * int8: the same idea with 4 bytes per dword: a 32-byte load holds 32 weights; byte b of every dword is
 * isolated and sign-extended with two shifts (`(w << (24 - 8b)) >> 24`, arithmetic). Block j of 32
 * stores x[32j + 4l + b] at position 32j + 8b + l.
 *
 * The elements after the last full block (the tail) stay in place and are handled by scalar code.
 * The buffer is thread-local and grows as needed, so steady-state calls allocate nothing; thread-local
 * because two Python threads may call in concurrently (ctypes releases the GIL).
 */
static __thread float* xbuf = NULL;
static __thread int64_t xbuf_len = 0;

static float* xbuf_get(int64_t K) {
    if (K > xbuf_len) {
        free(xbuf);
        int64_t len = (K + 63) & ~(int64_t)63;
        xbuf = (float*)aligned_alloc(64, (size_t)len * sizeof(float));
        xbuf_len = xbuf ? len : 0;
    }
    return xbuf;
}

static void load_x(float* dst, const void* x, int x_dtype, int64_t K, int64_t block, int64_t lanes_per_dword) {
    int64_t full = K - K % block;
    int64_t per = block / lanes_per_dword; /* dwords per block = 8 */
    for (int64_t j = 0; j < full; j += block)
        for (int64_t d = 0; d < per; d++)
            for (int64_t b = 0; b < lanes_per_dword; b++)
                dst[j + b * per + d] = load_scalar(x, x_dtype, j + d * lanes_per_dword + b);
    for (int64_t k = full; k < K; k++) dst[k] = load_scalar(x, x_dtype, k);
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
/* bf16                                                                                                 */

/* Dot products of ROWS consecutive rows with x (xp in the split layout). */
static inline void bf16_rows4(const uint16_t* w, int64_t K, const float* xp, float out[ROWS]) {
    const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
    __m256 ae[ROWS], ao[ROWS];
    for (int r = 0; r < ROWS; r++) ae[r] = ao[r] = _mm256_setzero_ps();
    int64_t full = K - K % 16;
    for (int64_t k = 0; k < full; k += 16) {
        __m256 xe = _mm256_load_ps(xp + k), xo = _mm256_load_ps(xp + k + 8);
        for (int r = 0; r < ROWS; r++) {
            __m256i v = _mm256_loadu_si256((const __m256i*)(w + r * K + k));
            ae[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), xe, ae[r]);
            ao[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, hi)), xo, ao[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) {
        float s = hsum8(_mm256_add_ps(ae[r], ao[r]));
        for (int64_t k = full; k < K; k++) s = fmaf(bf16_to_f32(w[r * K + k]), xp[k], s);
        out[r] = s;
    }
}

static inline float bf16_row1(const uint16_t* w, int64_t K, const float* xp) {
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

/* y[n] = sum_k W[n,k] x[k] + bias[n], rounded once to y_dtype. Returns 0, or -1 if out of memory. */
int nekomata_gemv_bf16(const uint16_t* W, const void* x, int x_dtype, const void* bias, int bias_dtype,
                       void* y, int y_dtype, int64_t N, int64_t K, int nthreads) {
    if (N <= 0) return 0;
    float* xp = xbuf_get(K > 0 ? K : 1);
    if (!xp) return -1;
    load_x(xp, x, x_dtype, K, 16, 2);
    int64_t nblocks = (N + ROWS - 1) / ROWS;
    int team = team_size(N, K, nthreads);
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t n0 = b * ROWS;
        float acc[ROWS];
        int64_t rows = N - n0 < ROWS ? N - n0 : ROWS;
        if (rows == ROWS) {
            bf16_rows4(W + n0 * K, K, xp, acc);
        } else {
            for (int64_t r = 0; r < rows; r++) acc[r] = bf16_row1(W + (n0 + r) * K, K, xp);
        }
        for (int64_t r = 0; r < rows; r++) {
            float v = acc[r];
            if (bias) v += load_scalar(bias, bias_dtype, n0 + r);
            store_scalar(y, y_dtype, n0 + r, v);
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------- */
/* int8 with per-row scales                                                                             */

/* Byte b (0..3) of every dword of v, sign-extended and converted to fp32. */
#define I8_LANE(v, b) _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32((v), 24 - 8 * (b)), 24))

static inline void int8_rows4(const int8_t* w, int64_t K, const float* xp, float out[ROWS]) {
    __m256 a0[ROWS], a1[ROWS];
    for (int r = 0; r < ROWS; r++) a0[r] = a1[r] = _mm256_setzero_ps();
    int64_t full = K - K % 32;
    for (int64_t k = 0; k < full; k += 32) {
        __m256 x0 = _mm256_load_ps(xp + k), x1 = _mm256_load_ps(xp + k + 8);
        __m256 x2 = _mm256_load_ps(xp + k + 16), x3 = _mm256_load_ps(xp + k + 24);
        for (int r = 0; r < ROWS; r++) {
            __m256i v = _mm256_loadu_si256((const __m256i*)(w + r * K + k));
            a0[r] = _mm256_fmadd_ps(I8_LANE(v, 0), x0, a0[r]);
            a1[r] = _mm256_fmadd_ps(I8_LANE(v, 1), x1, a1[r]);
            a0[r] = _mm256_fmadd_ps(I8_LANE(v, 2), x2, a0[r]);
            /* the top byte needs only the arithmetic shift */
            a1[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(v, 24)), x3, a1[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) {
        float s = hsum8(_mm256_add_ps(a0[r], a1[r]));
        for (int64_t k = full; k < K; k++) s = fmaf((float)w[r * K + k], xp[k], s);
        out[r] = s;
    }
}

static inline float int8_row1(const int8_t* w, int64_t K, const float* xp) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t full = K - K % 32;
    for (int64_t k = 0; k < full; k += 32) {
        __m256i v = _mm256_loadu_si256((const __m256i*)(w + k));
        a0 = _mm256_fmadd_ps(I8_LANE(v, 0), _mm256_load_ps(xp + k), a0);
        a1 = _mm256_fmadd_ps(I8_LANE(v, 1), _mm256_load_ps(xp + k + 8), a1);
        a0 = _mm256_fmadd_ps(I8_LANE(v, 2), _mm256_load_ps(xp + k + 16), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(v, 24)), _mm256_load_ps(xp + k + 24), a1);
    }
    float s = hsum8(_mm256_add_ps(a0, a1));
    for (int64_t k = full; k < K; k++) s = fmaf((float)w[k], xp[k], s);
    return s;
}

/* y[n] = scales[n] * sum_k W[n,k] x[k] + bias[n], rounded once to y_dtype. Returns 0, or -1 if out of
 * memory. */
int nekomata_gemv_int8(const int8_t* W, const void* scales, int scales_dtype, const void* x, int x_dtype,
                       const void* bias, int bias_dtype, void* y, int y_dtype, int64_t N, int64_t K,
                       int nthreads) {
    if (N <= 0) return 0;
    float* xp = xbuf_get(K > 0 ? K : 1);
    if (!xp) return -1;
    load_x(xp, x, x_dtype, K, 32, 4);
    int64_t nblocks = (N + ROWS - 1) / ROWS;
    int team = team_size(N, K, nthreads);
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t n0 = b * ROWS;
        float acc[ROWS];
        int64_t rows = N - n0 < ROWS ? N - n0 : ROWS;
        if (rows == ROWS) {
            int8_rows4(W + n0 * K, K, xp, acc);
        } else {
            for (int64_t r = 0; r < rows; r++) acc[r] = int8_row1(W + (n0 + r) * K, K, xp);
        }
        for (int64_t r = 0; r < rows; r++) {
            float v = acc[r] * load_scalar(scales, scales_dtype, n0 + r);
            if (bias) v += load_scalar(bias, bias_dtype, n0 + r);
            store_scalar(y, y_dtype, n0 + r, v);
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Plain fp32 entry points (x, bias, scales and y all fp32).                                            */

void gemv_bf16(const uint16_t* W, const float* x, const float* bias, float* y, int64_t N, int64_t K,
               int nthreads) {
    nekomata_gemv_bf16(W, x, DT_F32, bias, DT_F32, y, DT_F32, N, K, nthreads);
}

void gemv_int8(const int8_t* W, const float* scales, const float* x, const float* bias, float* y, int64_t N,
               int64_t K, int nthreads) {
    nekomata_gemv_int8(W, scales, DT_F32, x, DT_F32, bias, DT_F32, y, DT_F32, N, K, nthreads);
}
