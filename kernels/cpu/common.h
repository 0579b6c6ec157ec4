/*
 * What the CPU kernels' translation units share: gemv.c (the GEMV row kernels and the exported GEMVs),
 * q8.c (the int8 and int4 weights' kernels, on an int8-quantized x) and step.c (the whole step of a Qwen v1 model for B rows in one call, built on gemv.c's row kernels).
 * kernels/cpu/build.py compiles both, each including this header, into one shared library:
 *
 *     cc -O3 -flto -mavx2 -mfma -mf16c [ISA flags] -fopenmp -ffp-contract=off -fvisibility=hidden -fPIC
 *        -shared gemv.c q8.c step.c -o <cache>/nekomata_cpu-<isa>-<hash of sources, header, flags>.so -lm
 *
 * ISA variants (build.py picks the best one the CPU has at run time; NEKOMATA_CPU_ISA forces one):
 * "avx2" (the flags above), "avx512" (+ -mavx512f -mavx512bw -mavx512dq -mavx512vl: 512-bit row kernels
 * for fp32 weights), "avx512vnni" (+ -mavx512vnni: int8 and int4 weights through vpdpbusd, q8.c) and
 * "avx512bf16" (+ -mavx512bf16: bf16 weights through vdpbf16ps). The code for each lives under
 * #ifdef __AVX512F__ / __AVX512VNNI__ / __AVX512BF16__. int8 and int4 results are bit-identical in every
 * variant (q8.c); bf16 and fp32 ones differ between variants only in the order of the fp32 sums, never
 * between thread counts.
 *
 * Numerics, for every file: every float operation is an ordinary IEEE fp32 (or, where said, double)
 * operation, and -ffp-contract=off keeps `a * b + c` two roundings, as in PyTorch's elementwise ops;
 * fused multiply-adds are written out (fmaf, _mm256_fmadd_ps) where they are wanted.
 *
 * Symbols: -fvisibility=hidden keeps everything inside the library unless marked NK_EXPORT (the entry
 * points Python calls through ctypes); NK_INTERNAL functions are shared between the two files only.
 */
#ifndef NEKOMATA_CPU_COMMON_H
#define NEKOMATA_CPU_COMMON_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NK_EXPORT __attribute__((visibility("default")))
#define NK_INTERNAL __attribute__((visibility("hidden")))

/* ---------------------------------------------------------------------------------------------------- */
/* The contract with Python. Each value here is mirrored in kernels/cpu/abi.py (tests/test_cpu_gemv.py  */
/* parses this header and checks that the two agree): change both, and bump NK_ABI_VERSION.             */

/* Bumped whenever an exported signature, struct layout or semantic changes: the Python loader refuses a
 * library whose version differs from the one it was written for (a stale build from an old cache).
 * = abi.ABI_VERSION */
#define NK_ABI_VERSION 7

/* Dtype codes of activations, biases, scales and outputs (x, bias, scales and y may each be any of
 * these). = abi.DTYPE_CODES */
enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

/* Weight kinds of a GEMV: bf16 bits, int8 with one scale per output row, fp32 (the fused step's fp32
 * models), or int4 (KIND_INT4: two 4-bit codes per byte, a scale and a min per group of NK_INT4_GROUP
 * inputs, stored as 8-bit codes of units shared by a tile of NK_INT4_TILE rows; see
 * nekomata_core/quantize.py for the format). = abi.WEIGHT_KINDS */
enum { KIND_BF16 = 0, KIND_INT8 = 1, KIND_F32 = 2, KIND_INT4 = 3 };

/* The inputs per int4 group: weight w[n, g*G + j] = code * scale[n, g] + min[n, g], and byte j of the
 * group's G/2 bytes holds code j in its low nibble and code j + G/2 in its high one. = abi.INT4_GROUP_SIZE
 * The rows per int4 tile: scale[n, g] = scales[n, g] (uint8) * scale_units[n / T, g] (bf16) and
 * min[n, g] = mins[n, g] (int8) * min_units[n / T, g] (bf16), T = NK_INT4_TILE: products exact in fp32.
 * = abi.INT4_TILE_ROWS */
#define NK_INT4_GROUP 32
#define NK_INT4_TILE 8

/* The widest attention head the fused step supports (per-head vectors live on the stack).
 * = abi.MAX_HEAD_DIM */
#define NK_MAX_HEAD_DIM 512

/* The dtype codes and the thread count of a GEMV travel packed in one int, `flags`: every argument costs
 * time in ctypes (a few hundred ns each), and these calls are short. Bits 0-3: x dtype, 4-7: bias dtype,
 * 8-11: y dtype, 12-15: scales dtype (int8 only; int4 units are bf16), 16-31: number of threads. Packed by kernels/cpu/gemv.py. */
#define FLAG_X(f) ((f) & 15)
#define FLAG_BIAS(f) (((f) >> 4) & 15)
#define FLAG_Y(f) (((f) >> 8) & 15)
#define FLAG_SCALES(f) (((f) >> 12) & 15)
#define FLAG_THREADS(f) ((f) >> 16)

/* ---------------------------------------------------------------------------------------------------- */
/* Scalar conversions (tails, bias, scales, outputs, the step's elementwise work).                     */

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

/* 8 consecutive elements of p (dtype DT_*) from index i, as fp32: load_scalar eight at a time. */
static inline __m256 load8_f32(const void* p, int dtype, int64_t i) {
    switch (dtype) {
        case DT_BF16:
            return _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((const uint16_t*)p + i))), 16));
        case DT_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)p + i)));
        default: return _mm256_loadu_ps((const float*)p + i);
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* Eight-lane elementwise helpers (rows.c and step.c): the scalar conversions above, 8 lanes at a time.  */

/* The bf16 bits of 8 fp32 values, in the low halves of their lanes: f32_to_bf16 eight at a time (nearest-
 * even, NaN kept quiet). */
static inline __m256i bf16_bits8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    return _mm256_blendv_epi8(rounded, quiet, nan);
}

/* 8 fp32 values stored as act (DT_BF16, DT_F16 or DT_F32) at p + i: store_scalar eight at a time. */
static inline void store8_act(void* p, int act, int64_t i, __m256 v) {
    switch (act) {
        case DT_BF16: {
            const __m256i bits = bf16_bits8(v);
            const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
            _mm_storeu_si128((__m128i*)((uint16_t*)p + i), packed);
            break;
        }
        case DT_F16: _mm_storeu_si128((__m128i*)((uint16_t*)p + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT)); break;
        default: _mm256_storeu_ps((float*)p + i, v); break;
    }
}

/* v rounded to act and back: round_act of 8 lanes. */
static inline __m256 round8_act(__m256 v, int act) {
    switch (act) {
        case DT_BF16: return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(v), 16));
        case DT_F16: return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
        default: return v;
    }
}

/* v rounded to act and back (what an act-dtype tensor holds). */
static inline float round_act(float v, int act) {
    switch (act) {
        case DT_BF16: return bf16_to_f32(f32_to_bf16(v));
        case DT_F16: return f16_to_f32(f32_to_f16(v));
        default: return v;
    }
}

/* exp of 8 lanes: e^x = 2^n * e^r, n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts, so r is exact
 * to a few ulp), e^r by its degree-7 Taylor polynomial on |r| <= ln 2 / 2 (truncation 5e-9). Above
 * 88.72 it is +inf, below -87.33 zero (expf's range of normal results), NaN stays NaN. */
static inline __m256 exp8(__m256 x) {
    const __m256 hi = _mm256_set1_ps(88.72283935546875f), lo = _mm256_set1_ps(-87.33654022216797f);
    const __m256 clamped = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(clamped, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), clamped);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    /* 2^n in two factors, so that n = 128 (x near 88.7) does not overflow the exponent field */
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i half_n = _mm256_srai_epi32(ni, 1);
    const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half_n, _mm256_set1_epi32(127)), 23));
    const __m256 s2 = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half_n), _mm256_set1_epi32(127)), 23));
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
    y = _mm256_blendv_ps(y, _mm256_set1_ps(__builtin_inff()), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
    y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)); /* NaN in, NaN out */
}

static inline float exp1(float x) {
    float lanes[8];
    _mm256_storeu_ps(lanes, exp8(_mm256_set1_ps(x)));
    return lanes[0];
}

/* RMSNorm with Qwen quirk 1 of one row of H: out = round(round(x * rsqrt(mean(x^2) + eps)) * w), rounded to
 * act at both points (x of x_dtype, w act, out of out_dtype: act, or fp32 holding act values). The mean of
 * squares is accumulated in double (at least as accurate as PyTorch's fp32 reduction, so r is within ~1.5
 * ulp of exact for any H), then the same fp32 operations as PyTorch's. */
static inline void rms_norm_span(const void* x, int x_dtype, const void* w, void* out, int out_dtype, int act,
                                 int64_t H, float eps) {
    const int64_t full = H - H % 8;
    __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
    for (int64_t i = 0; i < full; i += 8) {
        const __m256 v = load8_f32(x, x_dtype, i);
        const __m256d a = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), b = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        lo = _mm256_add_pd(lo, _mm256_mul_pd(a, a));
        hi = _mm256_add_pd(hi, _mm256_mul_pd(b, b));
    }
    double lanes[4];
    _mm256_storeu_pd(lanes, _mm256_add_pd(lo, hi));
    double ss = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    for (int64_t i = full; i < H; i++) {
        const double v = load_scalar(x, x_dtype, i);
        ss += v * v;
    }
    const float r = 1.0f / sqrtf((float)(ss / (double)H) + eps);
    const __m256 r8 = _mm256_set1_ps(r);
    for (int64_t i = 0; i < full; i += 8) {
        const __m256 normed = round8_act(_mm256_mul_ps(load8_f32(x, x_dtype, i), r8), act);
        store8_act(out, out_dtype, i, round8_act(_mm256_mul_ps(normed, load8_f32(w, act, i)), act));
    }
    for (int64_t i = full; i < H; i++)
        store_scalar(out, out_dtype, i, round_act(round_act(load_scalar(x, x_dtype, i) * r, act) * load_scalar(w, act, i), act));
}

/* SwiGLU of elements [begin, end) (h1, h2 and out act, Qwen quirk 2): out = round(h1 * round(silu(h2))),
 * silu(g) = g / (1 + exp(-g)) in fp32; 8 lanes at a time, the tail by the same exp one lane at a time. */
static inline void swiglu_span(const void* h1, const void* h2, void* out, int act, int64_t begin, int64_t end) {
    int64_t i = begin;
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (; i + 8 <= end; i += 8) {
        const __m256 gate = load8_f32(h2, act, i);
        const __m256 silu = round8_act(_mm256_div_ps(gate, _mm256_add_ps(one, exp8(_mm256_xor_ps(gate, sign)))), act);
        store8_act(out, act, i, _mm256_mul_ps(load8_f32(h1, act, i), silu));
    }
    for (; i < end; i++) {
        const float gate = load_scalar(h2, act, i);
        const float silu = round_act(gate / (1.0f + exp1(-gate)), act);
        store_scalar(out, act, i, load_scalar(h1, act, i) * silu);
    }
}

/* Horizontal sum in the order ((v0+v1)+(v2+v3)) + ((v4+v5)+(v6+v7)), the same as gemv.c's 4-row sum
 * (hsum8x4), so that a row gives bit-identical results whichever kernel (4 rows or 1) handles it, hence
 * whatever the thread count. */
static inline float hsum8(__m256 v) {
    __m256 t = _mm256_hadd_ps(v, v);
    t = _mm256_hadd_ps(t, t);
    return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
}

/* ---------------------------------------------------------------------------------------------------- */
/* GEMV rows, defined in gemv.c and used by step.c.                                                     */

/* One GEMV y = W x (+ bias, * scales for int8), x already prepared by nk_load_x. */
typedef struct {
    int kind; /* KIND_* */
    const void* W;
    const float* xp;
    const void* scales; /* int8: [N] of scales_dtype; int4: uint8 codes [N, K / NK_INT4_GROUP] */
    const void* mins;   /* int4 only: int8 codes [N, K / NK_INT4_GROUP] */
    int scales_dtype;
    const void* bias;
    int bias_dtype;
    void* y;
    int y_dtype;
    int64_t N, K;
    const uint16_t* scale_units; /* int4 only: bf16 [ceil(N / NK_INT4_TILE), K / NK_INT4_GROUP] */
    const uint16_t* min_units;   /* int4 only: the same shape */
} gemv_args;

/* The layouts of a prepared x (nk_load_x): natural order (fp32 weights), split (bf16 weights: every
 * block of 16 stores its 8 even-indexed elements, then its 8 odd-indexed ones), or (bf16 weights, in a
 * build with AVX512-BF16) natural order followed by x as bf16 bits, two to a dword as vdpbf16ps takes
 * them, and a flag saying whether every element of x is a bf16 value (see nk_load_x). int8 and int4
 * weights take x quantized to int8 (X_Q8_INT8, X_Q8_INT4: see q8.c), in every build. */
enum { X_NATURAL = 0, X_SPLIT = 1, X_BF16_PAIRS = 3, X_Q8_INT8 = 5, X_Q8_INT4 = 6 };

static inline int nk_x_layout(int kind) {
    if (kind == KIND_INT8) return X_Q8_INT8;
    if (kind == KIND_INT4) return X_Q8_INT4;
#ifdef __AVX512BF16__
    if (kind == KIND_BF16) return X_BF16_PAIRS;
#endif
    return kind == KIND_BF16 ? X_SPLIT : X_NATURAL;
}

/* X_BF16_PAIRS: where (in floats from the start) the bf16 copy of x and the flag are. */
static inline int64_t nk_x_bf16_at(int64_t K) { return (K + 15) & ~(int64_t)15; }
static inline int64_t nk_x_flag_at(int64_t K) { return nk_x_bf16_at(K) + (((K + 1) / 2 + 15) & ~(int64_t)15); }

/* X_Q8_INT8: the bytes of qx (K rounded up to whole 64-byte loads). X_Q8_INT4: the groups of x rounded
 * up to whole 64-byte loads of int4 weights (4 groups). */
static inline int64_t nk_q8_int8_padded(int64_t K) { return (K + 63) & ~(int64_t)63; }
static inline int64_t nk_q8_int4_groups(int64_t K) { return ((K / NK_INT4_GROUP) + 3) & ~(int64_t)3; }

/* The floats a prepared x of K elements takes in `layout`. */
static inline int64_t nk_x_floats(int64_t K, int layout) {
    switch (layout) {
        case X_BF16_PAIRS: return nk_x_flag_at(K) + 16;
        case X_Q8_INT8: return nk_q8_int8_padded(K) / 2;                   /* qx, then dx per 4 lanes */
        case X_Q8_INT4: return nk_q8_int4_groups(K) * (NK_INT4_GROUP / 4 + 2); /* qx, dx, group sums */
        default: return K;
    }
}

/* x (K elements of x_dtype) converted to fp32 into dst in `layout` (X_*); dst holds nk_x_floats(K,
 * layout) floats, 64-byte aligned (the AVX-512 kernels load it in aligned 64-byte vectors). */
NK_INTERNAL void nk_load_x(float* dst, const void* x, int x_dtype, int64_t K, int layout);

/* The floats from one prepared x to the next when several are laid out one after another (the batched
 * rows below): nk_x_floats rounded up to 16, so that every one starts 64-byte aligned. */
static inline int64_t nk_x_stride(int64_t K, int layout) { return (nk_x_floats(K, layout) + 15) & ~(int64_t)15; }

/* `rows` rows of x ([rows, K] of x_dtype, row-major) prepared one after another into dst, nk_x_stride
 * apart (the input of nk_gemv_rows_batch). */
NK_INTERNAL void nk_load_rows(float* dst, const void* x, int x_dtype, int64_t K, int layout, int64_t rows);

/* The largest nk_x_stride of any layout (a buffer that holds a prepared x whatever the weight kind). */
static inline int64_t nk_x_stride_max(int64_t K) {
    const int layouts[] = {X_NATURAL, X_BF16_PAIRS, X_Q8_INT8, X_Q8_INT4};
    int64_t most = 0;
    for (int i = 0; i < 4; i++) most = nk_x_stride(K, layouts[i]) > most ? nk_x_stride(K, layouts[i]) : most;
    return most;
}

/* The calling thread's activation buffer of at least K floats (64-byte aligned, grown as needed and
 * kept), or NULL when it cannot be allocated. */
NK_INTERNAL float* nk_xbuf_get(int64_t K);

/* Rows [begin, end) of the GEMV `a`, each row finished (scale, bias, one rounding to y_dtype). A row's
 * value does not depend on which range it falls in, so neither does it on the thread count or schedule. */
NK_INTERNAL void nk_gemv_rows(const gemv_args* a, int64_t begin, int64_t end);

/* Output rows a batch-1 GEMV handles together (each x load serves them all; see gemv.c). */
#define NK_ROWS 4

/* The cache level the weight streams' software prefetches fill (every GEMV and the stream read of the
 * roofline): the second level. On a 2-core Zen 4 (AMD EPYC family 25 model 17), alternated in one process,
 * the 620M model's decode matrices streamed bf16 23.5 -> 28.5 GB/s and int8 24.4 -> 27.7 GB/s with T1
 * instead of T0 (int4 unchanged: its instructions bound it then, before int4_chunk16 in q8.c), and the
 * whole bf16 decode step ran 1.23x faster; presumably the prefetches of 4 rows x 2 threads into L1
 * competed with the demand loads for its miss buffers. (The Intel CPUs measured before, Ice Lake, had been measured with T0 only.) */
#define NK_PREFETCH_HINT _MM_HINT_T1

/* How far ahead a register tile of R adjacent rows (R x row bytes = tile_bytes, read in lockstep) prefetches
 * each of its rows: to the same place in the next tile at least, and never under 4 KB. A distance shorter than
 * the tile lands in a row of the same tile that is being read anyway: with 1 KB (int8, 4 rows of K = 1024) and
 * 2 KB (bf16, 2 rows) every prefetch of the 620M model's batched decode was wasted but the last row's. On 2
 * Zen 4 cores (the avx512bf16 build, the 620M model, batch 8, prompt 64, 32 new tokens) the step went int8
 * 51 -> 35 ms, bf16 (with gemv.c's 2-row tiles) 62 -> 41 ms, int4 (2 rows of 512 bytes) 38.8 -> 36 ms. */
static inline int64_t nk_tile_prefetch_distance(int64_t tile_bytes) { return tile_bytes > 4096 ? tile_bytes : 4096; }

/* q8.c: x quantized to int8 into dst in layout X_Q8_INT8 or X_Q8_INT4 (nk_load_x calls it); the dot
 * products of rows n[0 .. nrows) (nrows = NK_ROWS, 2 or 1) of an int8 or int4 GEMV with a->xp; and of
 * row n with nb (1..NK_BATCH_TILE) vectors at xp, xs floats apart (the first pass over a row prefetches).
 * Without the int8 row scale (finish_row applies it) and without the bias. */
NK_INTERNAL void nk_q8_load_x(float* dst, const void* x, int x_dtype, int64_t K, int layout);
NK_INTERNAL void nk_q8_rows(const gemv_args* a, const int64_t n[NK_ROWS], float* acc, int nrows);
NK_INTERNAL void nk_q8_row_batch(const gemv_args* a, int64_t n, const float* xp, int64_t xs, float* out, int nb,
                                 int prefetch);

/* q8.c's register tiles for batches (AVX512-VNNI builds): nk_q8_tile_shape returns how many consecutive
 * weight rows one tile of GEMV `a` takes and sets *vectors to how many vectors at most (0 rows: no tile
 * kernel for it in this build, or K does not fit one); nk_q8_tile computes rows n0 .. n0 + rows of `a`
 * times nb (1..vectors) vectors at xp, xs floats apart, into out[r * vectors + v] (before the row scale
 * and bias, like nk_q8_row_batch, and bit-identical to it). */
#define NK_Q8_TILE_MAX 32 /* the most values one tile writes (rows x vectors) */
NK_INTERNAL int nk_q8_tile_shape(const gemv_args* a, int* vectors);
NK_INTERNAL void nk_q8_tile(const gemv_args* a, int64_t n0, const float* xp, int64_t xs, int nb, float* out,
                            int prefetch, const float* prepared);

/* What int4 tiles read in place of the rows' scale and min codes, prepared once for a block of rows that
 * many tiles of vectors then sweep: nk_q8_tile_prepare writes, for `rows` rows from n_begin, each row's
 * group scales as fp32 (each repeated in the 4 lanes of its group, as the tiles multiply it) and then
 * its group mins as fp32, nk_q8_tile_prepared_floats(a, 1) floats per row (a multiple of 16), into
 * `prepared` (64-byte aligned); nk_q8_tile takes the entry of row n0, or NULL (the tiles then convert the
 * codes themselves: cheaper for a single sweep). int8 tiles need nothing (0 floats, `prepared` unused). */
NK_INTERNAL int64_t nk_q8_tile_prepared_floats(const gemv_args* a, int64_t rows);
NK_INTERNAL void nk_q8_tile_prepare(const gemv_args* a, int64_t n_begin, int64_t rows, float* prepared);

/* The vectors a batched weight row is multiplied into per pass (gemv.c's nk_gemv_rows_batch dispatches
 * on 1..4; its accumulators, two per vector, and the converted weights fill the 16 AVX2 registers). */
#define NK_BATCH_TILE 4

/* Rows [begin, end) of the GEMVs of `batch` vectors at once, each weight row read once for all of them:
 * vector b is prepared at a->xp + b * nk_x_stride(K, layout), and its output row is y + b * N elements of
 * y_dtype; a batch of 1 goes to nk_gemv_rows. Each value does not depend on the batch size, the thread
 * count or the schedule; in the avx2 build (and for int8/int4 weights in every build) it is bit-identical
 * to nk_gemv_rows on that vector alone (the same operations in the same order; the AVX-512 builds' other
 * batch-1 kernels sum in another order). */
NK_INTERNAL void nk_gemv_rows_batch(const gemv_args* a, int64_t batch, int64_t begin, int64_t end);

#endif /* NEKOMATA_CPU_COMMON_H */
