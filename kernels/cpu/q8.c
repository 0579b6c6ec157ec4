/*
 * Dot products of quantized weights (int8 rows, int4 groups) with an activation vector quantized to int8
 * (the "q8" path): the integer work is exact, so the 8-bit multiply-accumulate instructions do it, 64
 * products per instruction (AVX512-VNNI vpdpbusd) or 32 (AVX2 vpmaddubsw + vpmaddwd).
 *
 * Why quantize the activations: a decode step reads every weight once, so it is as fast as DRAM delivers
 * the bytes, provided the arithmetic keeps up. Widening 4- or 8-bit weights to fp32 (or bf16) and
 * multiplying in floating point costs several instructions per 16 or 32 weights, which on two cores
 * runs below the memory's speed; multiplying bytes by bytes costs one per 64. llama.cpp does the same
 * (its Q8_0 / Q8_K activation blocks). The error it adds is small next to the weights': x is rounded to
 * 255 levels per block of 32 (relative error ~2e-3 per element), a 4-bit weight to 16.
 *
 * Activation quantization (nk_q8_load_x), per block of NK_Q8_BLOCK = 32 consecutive elements of x:
 *     amax = max |x_i|            (a NaN anywhere makes amax NaN: compared as integer bit patterns)
 *     dx   = amax / 127           (fp32)
 *     inv  = amax > 0 ? 127 / amax : 0
 *     qx_i = round_half_even(x_i * inv), saturated to int8
 * so x_i ≈ dx * qx_i. The last block of an int8 GEMV may be partial (K any); int4 has whole groups.
 *
 * Results, every one an ordinary sequence of IEEE fp32 operations after the exact integer sums:
 *     int8:  y[n] = scale[n] * sum_lanes acc,  acc_lane += float(I_lane) * dx_block(lane)
 *     int4:  y[n] = sum_lanes acc + sum_lanes macc,
 *            acc_lane += float(I_lane) * (scale[n, g(lane)] * dx_g(lane)),
 *            macc_l += min[n, g] * xsum_g over the groups g = l mod 4 (4 lanes, summed (0+2)+(1+3))
 * where I_lane is the exact integer sum of a lane's products (4 consecutive weights for int8; 4 low and
 * 4 high nibbles for int4), xsum_g the fp32 sum of group g of the unquantized x (the mins' term takes
 * x as it is), and acc has 16 lanes summed as (lanes 0-7 + lanes 8-15) then hsum8. The AVX2 kernels keep
 * the 16 lanes as two 8-lane halves and do the very same operations lane by lane, so every build gives
 * bit-identical results; and a (weight row, vector) pair goes through the same operations whether its
 * GEMV is batch 1 (4 rows at a time, or 1) or batched (1 row, up to 4 vectors): results depend neither
 * on the ISA, the batch, the thread count nor the schedule.
 *
 * The prepared layouts (floats from dst, 64-byte aligned; sizes in common.h's nk_x_floats):
 *   X_Q8_INT8: qx in natural order, K rounded up to 64 bytes (zero padding), then per 4 elements of
 *              that the float dx of their block (one lane of the accumulator).
 *   X_Q8_INT4: per 4 groups (128 elements, one 64-byte load of int4 weights: byte j of group g holds
 *              codes j and j + 16), 64 bytes of low halves (qx of elements 0-15 of each group) then 64 of
 *              high halves (16-31); then dx per group and the fp32 group sums, both padded to 4 groups.
 */
#include "common.h"

#define NK_Q8_BLOCK 32 /* activations per quantization block = NK_INT4_GROUP */
_Static_assert(NK_Q8_BLOCK == NK_INT4_GROUP, "an int4 group and an activation block coincide");

/* Software prefetch distance in bytes per weight stream (gemv.c's PF): int8 rows. (The register tiles go
 * by the tile's size instead: nk_tile_prefetch_distance in common.h.) */
#ifndef PF_Q8
#define PF_Q8 1024
#endif

/* The same for int4 rows (batch 1 and the batched rows outside the tiles), 3 KB ahead. A thread walks 2 int4
 * streams (gemv.c's INT4_STREAMS), not 4 as int8 does, and each 64-byte block of codes costs fewer
 * instructions than int8's, so each stream advances several times as fast and 1 KB ahead is too near to
 * hide DRAM's latency. Alternated in one process on 2 Zen 4 cores (AMD EPYC family 25 model 17, the
 * avx512bf16 build; prompt 8, 32 or 64 greedy tokens, paired medians of 12-16 runs, an identical build as
 * control at 1.00 and 1.03): the nekomata-7b int4 decode step 1.17x at 3 or 4 KB, the 620M one 1.19x at 3 KB
 * (1.10x at 2 KB, 1.12x at 4 KB); the forced-avx2 build 1.01x (neutral). int8 rows got slower with a longer
 * distance (nekomata-7b int8: 0.92x at 2 and 3 KB), so they keep PF_Q8. */
#ifndef PF_INT4
#define PF_INT4 3072
#endif

/* ---------------------------------------------------------------------------------------------------- */
/* Activation quantization.                                                                             */

/* One block of n <= 32 elements of x from index i, as fp32 into f[32] (zeros after n). Vectorised for
 * whole blocks: it runs on every call, serially. */
static void block_to_f32(const void* x, int x_dtype, int64_t i, int n, float f[NK_Q8_BLOCK]) {
    if (n < NK_Q8_BLOCK) {
        for (int j = 0; j < NK_Q8_BLOCK; j++) f[j] = j < n ? load_scalar(x, x_dtype, i + j) : 0.0f;
        return;
    }
    for (int j = 0; j < NK_Q8_BLOCK; j += 8) _mm256_storeu_ps(f + j, load8_f32(x, x_dtype, i + j));
}

/* qx[32] and dx of one block f[32] (see the header comment). */
static float quantize_block(const float f[NK_Q8_BLOCK], int8_t qx[NK_Q8_BLOCK]) {
    const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
    __m256i m = _mm256_setzero_si256();
    for (int j = 0; j < NK_Q8_BLOCK; j += 8) /* |x| as bit patterns: NaN > inf > every finite value */
        m = _mm256_max_epu32(m, _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(f + j)), magnitude));
    uint32_t lanes[8], top = 0;
    _mm256_storeu_si256((__m256i*)lanes, m);
    for (int j = 0; j < 8; j++) top = lanes[j] > top ? lanes[j] : top;
    float amax;
    memcpy(&amax, &top, sizeof amax);
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int j = 0; j < NK_Q8_BLOCK; j += 16) {
        __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(f + j), _mm256_set1_ps(inv)));
        __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(f + j + 8), _mm256_set1_ps(inv)));
        __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8); /* 16 int16 in order */
        __m128i q = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
        _mm_storeu_si128((__m128i*)(qx + j), q);
    }
    return amax / 127.0f;
}

/* The fp32 sum of one block: ((f0..7 + f8..15) + (f16..23 + f24..31)), then hsum8. */
static float block_sum(const float f[NK_Q8_BLOCK]) {
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(f), _mm256_loadu_ps(f + 8)),
                             _mm256_add_ps(_mm256_loadu_ps(f + 16), _mm256_loadu_ps(f + 24)));
    return hsum8(s);
}

void nk_q8_load_x(float* dst, const void* x, int x_dtype, int64_t K, int layout) {
    float f[NK_Q8_BLOCK];
    int8_t q[NK_Q8_BLOCK];
    if (layout == X_Q8_INT8) {
        const int64_t padded = nk_q8_int8_padded(K), blocks = padded / NK_Q8_BLOCK;
        int8_t* qx = (int8_t*)dst;
        float* dxl = dst + padded / 4;
        for (int64_t b = 0; b < blocks; b++) { /* padding blocks are zeros: qx 0, dx 0 */
            const int64_t at = b * NK_Q8_BLOCK;
            const int n = at >= K ? 0 : (K - at < NK_Q8_BLOCK ? (int)(K - at) : NK_Q8_BLOCK);
            block_to_f32(x, x_dtype, at, n, f);
            const float dx = quantize_block(f, q);
            memcpy(qx + at, q, NK_Q8_BLOCK);
            for (int j = 0; j < NK_Q8_BLOCK / 4; j++) dxl[at / 4 + j] = dx;
        }
        return;
    }
    /* X_Q8_INT4: K is a multiple of NK_INT4_GROUP (checked by the callers) */
    const int64_t groups = K / NK_INT4_GROUP, padded = nk_q8_int4_groups(K);
    int8_t* qx = (int8_t*)dst;
    float* dx = dst + padded * (NK_INT4_GROUP / 4);
    float* xsum = dx + padded;
    for (int64_t g = 0; g < padded; g++) { /* padding groups are zeros: qx 0, dx 0, sum 0 */
        int8_t* lo = qx + (g / 4) * 128 + (g % 4) * 16;
        block_to_f32(x, x_dtype, g * NK_INT4_GROUP, g < groups ? NK_INT4_GROUP : 0, f);
        dx[g] = quantize_block(f, q);
        xsum[g] = block_sum(f);
        memcpy(lo, q, 16);
        memcpy(lo + 64, q + 16, 16);
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* int4 scales and mins                                                                                 */

/* Where a row's int4 scale and min codes and its tile's units are. */
typedef struct {
    const uint8_t* sc;  /* the row's scale codes */
    const int8_t* mn;   /* the row's min codes */
    const uint16_t* su; /* its tile's scale units (bf16) */
    const uint16_t* mu; /* its tile's min units (bf16) */
} int4_row_scales;

/* 4 consecutive bf16 values as fp32. */
static inline __m128 bf16x4_to_f32(const uint16_t* p) {
    return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i*)p)), 16));
}

#if defined(__AVX512F__)
/* 16 consecutive bf16 values as fp32. */
static inline __m512 bf16x16_to_f32(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
#endif

/* The scales and mins of groups g .. g+3 of a row as fp32: code times its tile's unit, an exact product (an
 * 8-bit integer times a bf16). Read where they are used, four at a time, so that their loads overlap the
 * code bytes' work like any other: converting a block of them into a stack buffer at the start of every row
 * made each row's first blocks wait on that pass, and the streamed GEMV ran 1.6x slower. */
static inline void scales4(const int4_row_scales* r, int64_t g, __m128* s, __m128* m) {
    int32_t sc, mn;
    memcpy(&sc, r->sc + g, 4);
    memcpy(&mn, r->mn + g, 4);
    const __m128 scf = _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(sc)));
    const __m128 mnf = _mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(mn)));
    *s = _mm_mul_ps(scf, bf16x4_to_f32(r->su + g));
    *m = _mm_mul_ps(mnf, bf16x4_to_f32(r->mu + g));
}

/* The same for a row's last groups g .. groups - 1 (fewer than 4), zeros after them. */
static inline void scales_tail(const int4_row_scales* r, int64_t g, int64_t groups, __m128* s, __m128* m) {
    float sf[4] = {0.0f, 0.0f, 0.0f, 0.0f}, mf[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t i = 0; g + i < groups; i++) {
        sf[i] = (float)r->sc[g + i] * bf16_to_f32(r->su[g + i]);
        mf[i] = (float)r->mn[g + i] * bf16_to_f32(r->mu[g + i]);
    }
    *s = _mm_loadu_ps(sf);
    *m = _mm_loadu_ps(mf);
}

/* ---------------------------------------------------------------------------------------------------- */
/* Kernels: R weight rows (w[r]) times V prepared vectors (xp[v]), R * V <= 4 accumulators, both counts   */
/* constants after inlining (R = NK_ROWS or 1 with V = 1: batch 1; R = 1, V = 1..4: batched).           */

#define Q8_KERNEL static inline __attribute__((always_inline))
#define MAX_ACC 4

/* Each kernel below is a loop over 64-byte blocks of the weight rows. The loop body (a *_block function)
 * is written once and used twice: for the whole blocks, read in place, and for a row's last partial block,
 * copied into a zeroed buffer first (zeros add nothing). The copy is kept out of the main loop: a call to
 * memcpy there would make the compiler keep the accumulators in memory across it (every vector register
 * is caller-saved). */

#if defined(__AVX512VNNI__)
/* 512-bit lanes, vpdpbusd: unsigned bytes times signed bytes, four products per lane into int32. */

typedef __m512 acc_t;
static inline acc_t acc_zero(void) { return _mm512_setzero_ps(); }
static inline float reduce16(acc_t acc) {
    return hsum8(_mm256_add_ps(_mm512_castps512_ps256(acc), _mm512_extractf32x8_ps(acc, 1)));
}

/* Block k of int8 rows (the sign trick: |qx| is unsigned and the weight takes qx's sign, so vpdpbusd sums
 * w * qx exactly). wb[r]: the block's 64 weight bytes of row r. */
Q8_KERNEL void int8_block(const uint8_t* const wb[], int64_t k, int64_t padded, const float* const xp[],
                          acc_t* acc, const int R, const int V) {
    __m512i ax[MAX_ACC];
    __mmask64 neg[MAX_ACC];
    __m512 dx[MAX_ACC];
    for (int v = 0; v < V; v++) {
        __m512i q = _mm512_load_si512((const int8_t*)xp[v] + k);
        ax[v] = _mm512_abs_epi8(q);
        neg[v] = _mm512_movepi8_mask(q);
        dx[v] = _mm512_load_ps(xp[v] + padded / 4 + k / 4);
    }
    for (int r = 0; r < R; r++) {
        __m512i wv = _mm512_loadu_si512(wb[r]);
        for (int v = 0; v < V; v++) {
            __m512i ws = _mm512_mask_sub_epi8(wv, neg[v], _mm512_setzero_si512(), wv);
            __m512i i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ax[v], ws);
            acc[r * V + v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), dx[v], acc[r * V + v]);
        }
    }
}

/* Groups g .. g+3 of int4 rows: wb[r] their 64 code bytes, s4[r] and m4[r] their scales and mins as fp32;
 * macc[r * V + b] gathers the mins' term min_g * xsum_g, four groups to a vector. */
Q8_KERNEL void int4_block(const uint8_t* const wb[], const __m128 s4[], const __m128 m4[], int64_t g,
                          int64_t padded, const float* const xp[], acc_t* acc, __m128* macc, const int R, const int V) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    for (int r = 0; r < R; r++) {
        __m512i v = _mm512_loadu_si512(wb[r]);
        __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        __m128 sr = s4[r], mr = m4[r];
        for (int b = 0; b < V; b++) {
            const float* xsum = xp[b] + padded * (NK_INT4_GROUP / 4) + padded;
            macc[r * V + b] = _mm_fmadd_ps(mr, _mm_load_ps(xsum + g), macc[r * V + b]);
            const int8_t* q = (const int8_t*)xp[b] + g * NK_INT4_GROUP; /* 128 bytes per 4 groups */
            __m512i i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_load_si512(q));
            i = _mm512_dpbusd_epi32(i, hi, _mm512_load_si512(q + 64));
            __m128 s = _mm_mul_ps(sr, _mm_load_ps(xp[b] + padded * (NK_INT4_GROUP / 4) + g));
            __m512 scale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(s));
            acc[r * V + b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), scale, acc[r * V + b]);
        }
    }
}

/* 16 groups g .. g+15 of int4 rows (4 blocks of 64 code bytes each): the batch-1 and batched kernels'
 * main loop in the AVX-512 builds. The rows' scales and mins are converted 16 groups at a time instead of 4
 * (one 512-bit conversion where int4_block's callers do four 128-bit ones), and each block takes its 4
 * groups' scales from them with one permute: 14 instructions per row and block instead of 26. On CPUs that
 * split 512-bit operations in two that arithmetic bounds int4 (Zen 4, one core, a [8192, 1024] weight in
 * cache: 16 -> 26 GB/s of int4 weights, back to back); streamed from DRAM by the 620M model's decode step the
 * gain is smaller (+4%, alternated in one process), memory being nearer. The same fp32 values in the same
 * order as int4_block: code times unit (exact), times dx rounded once; each accumulator lane gets its blocks
 * in order, each mins lane its groups in order. So the results are bit-identical to the 4-group loop's,
 * hence to the tiles' and the AVX2 build's. */
Q8_KERNEL void int4_chunk16(const uint8_t* const w[], const int4_row_scales rs[], int64_t g, int64_t padded,
                            const float* const xp[], acc_t* acc, __m128* macc, const int R, const int V,
                            const int prefetch) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512 sdx[MAX_ACC]; /* R * V <= MAX_ACC */
    for (int r = 0; r < R; r++) {
        const __m512 s16 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(rs[r].sc + g)))),
                                         bf16x16_to_f32(rs[r].su + g));
        const __m512 m16 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(rs[r].mn + g)))),
                                         bf16x16_to_f32(rs[r].mu + g));
        const __m128 m4[4] = {_mm512_castps512_ps128(m16), _mm512_extractf32x4_ps(m16, 1), _mm512_extractf32x4_ps(m16, 2),
                              _mm512_extractf32x4_ps(m16, 3)};
        for (int v = 0; v < V; v++) {
            const float* xsum = xp[v] + padded * (NK_INT4_GROUP / 4) + padded;
            for (int j = 0; j < 4; j++) macc[r * V + v] = _mm_fmadd_ps(m4[j], _mm_load_ps(xsum + g + 4 * j), macc[r * V + v]);
            sdx[r * V + v] = _mm512_mul_ps(s16, _mm512_load_ps(xp[v] + padded * (NK_INT4_GROUP / 4) + g));
        }
    }
    for (int j = 0; j < 4; j++) {
        const __m512i spread = _mm512_setr_epi32(4 * j, 4 * j, 4 * j, 4 * j, 4 * j + 1, 4 * j + 1, 4 * j + 1, 4 * j + 1,
                                                 4 * j + 2, 4 * j + 2, 4 * j + 2, 4 * j + 2, 4 * j + 3, 4 * j + 3, 4 * j + 3, 4 * j + 3);
        for (int r = 0; r < R; r++) {
            const uint8_t* block = w[r] + (g + 4 * j) * (NK_INT4_GROUP / 2);
            if (PF_INT4 && prefetch) _mm_prefetch((const char*)block + PF_INT4, NK_PREFETCH_HINT);
            const __m512i bytes = _mm512_loadu_si512(block);
            const __m512i lo = _mm512_and_si512(bytes, low), hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low);
            for (int v = 0; v < V; v++) {
                const int8_t* q = (const int8_t*)xp[v] + (g + 4 * j) * NK_INT4_GROUP;
                __m512i i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_load_si512(q));
                i = _mm512_dpbusd_epi32(i, hi, _mm512_load_si512(q + 64));
                acc[r * V + v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_permutexvar_ps(spread, sdx[r * V + v]),
                                                 acc[r * V + v]);
            }
        }
    }
}

#else
/* AVX2: each 512-bit lane set as two 256-bit halves (h = 0: lanes 0-7, h = 1: lanes 8-15); vpmaddubsw
 * multiplies unsigned by signed bytes into int16 pairs (no saturation here: |pair| <= 2 * 128 * 127 for
 * int8, 2 * 15 * 127 twice for int4) and vpmaddwd by ones sums the pairs into the same int32 lanes as
 * vpdpbusd, then the same fp32 operations lane by lane. */

typedef struct {
    __m256 h[2];
} acc_t;
static inline acc_t acc_zero(void) { return (acc_t){{_mm256_setzero_ps(), _mm256_setzero_ps()}}; }
static inline float reduce16(acc_t acc) { return hsum8(_mm256_add_ps(acc.h[0], acc.h[1])); }

Q8_KERNEL void int8_block(const uint8_t* const wb[], int64_t k, int64_t padded, const float* const xp[],
                          acc_t* acc, const int R, const int V) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int h = 0; h < 2; h++) {
        __m256i qx[MAX_ACC], ax[MAX_ACC];
        __m256 dx[MAX_ACC];
        for (int v = 0; v < V; v++) {
            qx[v] = _mm256_load_si256((const __m256i*)((const int8_t*)xp[v] + k + 32 * h));
            ax[v] = _mm256_abs_epi8(qx[v]);
            dx[v] = _mm256_load_ps(xp[v] + padded / 4 + k / 4 + 8 * h);
        }
        for (int r = 0; r < R; r++) {
            __m256i wv = _mm256_loadu_si256((const __m256i*)(wb[r] + 32 * h));
            for (int v = 0; v < V; v++) {
                __m256i i = _mm256_madd_epi16(_mm256_maddubs_epi16(ax[v], _mm256_sign_epi8(wv, qx[v])), ones);
                acc[r * V + v].h[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), dx[v], acc[r * V + v].h[h]);
            }
        }
    }
}

Q8_KERNEL void int4_block(const uint8_t* const wb[], const __m128 s4[], const __m128 m4[], int64_t g,
                          int64_t padded, const float* const xp[], acc_t* acc, __m128* macc, const int R, const int V) {
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    for (int r = 0; r < R; r++) {
        __m128 sr = s4[r], mr = m4[r];
        for (int b = 0; b < V; b++) {
            const float* xsum = xp[b] + padded * (NK_INT4_GROUP / 4) + padded;
            macc[r * V + b] = _mm_fmadd_ps(mr, _mm_load_ps(xsum + g), macc[r * V + b]);
        }
        for (int h = 0; h < 2; h++) {
            const __m256i spread = h ? _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3) : _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
            __m256i v = _mm256_loadu_si256((const __m256i*)(wb[r] + 32 * h));
            __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            for (int b = 0; b < V; b++) {
                const int8_t* q = (const int8_t*)xp[b] + g * NK_INT4_GROUP + 32 * h;
                __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i*)q)),
                                                 _mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i*)(q + 64))));
                __m256i i = _mm256_madd_epi16(pairs, ones);
                __m128 s = _mm_mul_ps(sr, _mm_load_ps(xp[b] + padded * (NK_INT4_GROUP / 4) + g));
                __m256 scale = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s), spread);
                acc[r * V + b].h[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), scale, acc[r * V + b].h[h]);
            }
        }
    }
}
#endif

/* int8 rows w[0..R) times vectors xp[0..V): out[r * V + v], before the row scale. */
Q8_KERNEL void int8_kernel(const int8_t* const w[], int64_t K, const float* const xp[], float* out, const int R,
                           const int V, const int prefetch) {
    const int64_t padded = nk_q8_int8_padded(K), whole = K - K % 64;
    acc_t acc[MAX_ACC];
    const uint8_t* wb[NK_ROWS];
    for (int i = 0; i < R * V; i++) acc[i] = acc_zero();
    for (int64_t k = 0; k < whole; k += 64) {
        for (int r = 0; r < R; r++) {
            wb[r] = (const uint8_t*)w[r] + k;
            if (PF_Q8 && prefetch) _mm_prefetch((const char*)wb[r] + PF_Q8, NK_PREFETCH_HINT);
        }
        int8_block(wb, k, padded, xp, acc, R, V);
    }
    if (whole < K) {
        uint8_t tail[NK_ROWS][64] __attribute__((aligned(64)));
        for (int r = 0; r < R; r++) {
            memset(tail[r], 0, 64);
            memcpy(tail[r], (const uint8_t*)w[r] + whole, (size_t)(K - whole));
            wb[r] = tail[r];
        }
        int8_block(wb, whole, padded, xp, acc, R, V);
    }
    for (int i = 0; i < R * V; i++) out[i] = reduce16(acc[i]);
}

/* int4 rows (codes w, scales and mins rs) times vectors xp[0..V): out[r * V + v], the mins' term included. */
Q8_KERNEL void int4_kernel(const uint8_t* const w[], const int4_row_scales rs[], int64_t K, const float* const xp[],
                           float* out, const int R, const int V, const int prefetch) {
    const int64_t groups = K / NK_INT4_GROUP, padded = nk_q8_int4_groups(K), whole = groups - groups % 4;
    acc_t acc[MAX_ACC];
    __m128 macc[MAX_ACC];
    const uint8_t* wb[NK_ROWS];
    __m128 s4[NK_ROWS], m4[NK_ROWS];
    for (int i = 0; i < R * V; i++) {
        acc[i] = acc_zero();
        macc[i] = _mm_setzero_ps();
    }
    int64_t g = 0;
#if defined(__AVX512VNNI__)
    for (; g + 16 <= whole; g += 16) int4_chunk16(w, rs, g, padded, xp, acc, macc, R, V, prefetch);
#endif
    for (; g < whole; g += 4) { /* 4 groups = 64 bytes of each row */
        for (int r = 0; r < R; r++) {
            wb[r] = w[r] + g * (NK_INT4_GROUP / 2);
            scales4(&rs[r], g, &s4[r], &m4[r]);
            if (PF_INT4 && prefetch) _mm_prefetch((const char*)wb[r] + PF_INT4, NK_PREFETCH_HINT);
        }
        int4_block(wb, s4, m4, g, padded, xp, acc, macc, R, V);
    }
    if (whole < groups) {
        uint8_t tail[NK_ROWS][64] __attribute__((aligned(64)));
        for (int r = 0; r < R; r++) {
            memset(tail[r], 0, 64);
            memcpy(tail[r], w[r] + whole * (NK_INT4_GROUP / 2), (size_t)((groups - whole) * (NK_INT4_GROUP / 2)));
            wb[r] = tail[r];
            scales_tail(&rs[r], whole, groups, &s4[r], &m4[r]);
        }
        int4_block(wb, s4, m4, whole, padded, xp, acc, macc, R, V);
    }
    for (int i = 0; i < R * V; i++) {
        __m128 m = _mm_add_ps(macc[i], _mm_movehl_ps(macc[i], macc[i])); /* (m0 + m2) + (m1 + m3) */
        out[i] = reduce16(acc[i]) + _mm_cvtss_f32(_mm_add_ss(m, _mm_shuffle_ps(m, m, 1)));
    }
}

#if defined(__AVX512VNNI__)
/* ---------------------------------------------------------------------------------------------------- */
/* Register tiles for many vectors at once (a prefill's rows, a batched step): the AVX512-VNNI builds.   */
/*
 * The kernels above take one weight row at a time when they serve several vectors, so every 64 products
 * cost a few extra instructions (the sign trick, the activation's absolute value) besides the vpdpbusd
 * itself; with 128 vectors (a prefill) that arithmetic, not memory, bounds them, at about half the speed
 * of PyTorch's fp32 matmul (75 against 155 GOP/s, [2816, 1024] x 128 rows, 2 cores of an Ice Lake Xeon). A
 * tile of several weight rows times several vectors keeps its accumulators in registers and shares every
 * load: each weight block is read once for all the vectors, each activation block once for all the rows
 * (and gemv.c sweeps a block of weight rows that stays in L2 once per tile of vectors, whose activations
 * stay in L1): int8 and int4 210-290 GOP/s there, as the machine's speed drifts, against PyTorch's fp32
 * matmul 155-170. What bounds them now is the format: every 64 products need their own conversion to fp32
 * and multiply-add by dx.
 *
 * int8 weights take the activations as unsigned bytes instead of the sign trick: qx + 128 (an xor of the
 * sign bit) is unsigned, and sum_j (qx_j + 128) w_j - 128 sum_j w_j = sum_j qx_j w_j exactly, the
 * correction -128 sum_j w_j computed once per weight block (by vpdpbusd with 128s) and used as the
 * accumulator's starting value (vpdpbusd does not saturate: |sum| <= 4 * 255 * 127). Every lane then gets
 * the same exact integer as in the kernels above, and the fp32 operations that follow are the same ones
 * in the same order (int4: the group scale times dx rounded once, the products of the mins summed per
 * lane group in the same sequence), so a tile's results are bit-identical to theirs: to the batch-1
 * GEMV of each vector alone, in every build. (One difference in what is accepted: an int8 weight of
 * -128, which our int8 format never holds, is multiplied correctly here and not by the sign trick.)
 */

/* reduce16 of four accumulators at once, each lane summed in exactly reduce16's order: hsum8's two hadds
 * of one vector pair the same elements as the hadds of four (see gemv.c's hsum8x4), in a third of the
 * instructions. The tiles' epilogue runs once per vector and row, after as few as 16 blocks of work. */
static inline void reduce16x4(const __m512 acc[4], float out[4]) {
    __m256 h[4];
    for (int i = 0; i < 4; i++) h[i] = _mm256_add_ps(_mm512_castps512_ps256(acc[i]), _mm512_extractf32x8_ps(acc[i], 1));
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
}

/* Weight rows x vectors per tile: int8 4 x 4 (16 accumulators + 4 weight blocks and their corrections: 28 of
 * the 32 vector registers); int4 2 x 8 (its low and high nibbles and scales take more registers per row,
 * shared by more vectors). Measured on an Ice Lake Xeon: 2 x 8, 4 x 4 and 3 x 4 int4 tiles ran within
 * noise of each other. int4 tiles of a prefill read their rows' scales and mins as fp32, spread to their
 * lanes, from a buffer that nk_q8_tile_prepare fills once per block of rows (see there). */
#define TILE_ROWS_INT8 4
#define TILE_VECTORS_INT8 4
#define TILE_ROWS_INT4 2
#define TILE_VECTORS_INT4 8
_Static_assert(TILE_ROWS_INT8 * TILE_VECTORS_INT8 <= NK_Q8_TILE_MAX && TILE_ROWS_INT8 <= NK_ROWS, "tile fits gemv.c's buffer");
_Static_assert(TILE_ROWS_INT4 * TILE_VECTORS_INT4 <= NK_Q8_TILE_MAX, "tile fits gemv.c's buffer");

/* The tiles' loops over rows and vectors are unrolled completely (their counts are constants after
 * inlining), so that every accumulator is a register of its own: left to its own size limits, GCC keeps
 * the 4 x 4 of int8_tile in memory, a store and a load per multiply-add. */
#define TILE_UNROLL _Pragma("GCC unroll 16")

/* 4 int8 rows from w0 (K apart, K a multiple of 64) times V vectors xp + v * xs. */
Q8_KERNEL void int8_tile(const int8_t* w0, int64_t K, const float* xp, int64_t xs, float* out, const int V,
                         const int prefetch) {
    const int64_t padded = nk_q8_int8_padded(K), pf = nk_tile_prefetch_distance(TILE_ROWS_INT8 * K);
    const __m512i flip = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
    __m512 acc[TILE_ROWS_INT8][TILE_VECTORS_INT8];
    TILE_UNROLL
    for (int r = 0; r < TILE_ROWS_INT8; r++)
        TILE_UNROLL
        for (int v = 0; v < V; v++) acc[r][v] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 64) {
        __m512i w[TILE_ROWS_INT8], corr[TILE_ROWS_INT8];
        TILE_UNROLL
        for (int r = 0; r < TILE_ROWS_INT8; r++) {
            const int8_t* row = w0 + r * K + k;
            if (prefetch) _mm_prefetch((const char*)row + pf, NK_PREFETCH_HINT);
            w[r] = _mm512_loadu_si512(row);
            corr[r] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, flip, w[r])); /* -128 * sum of 4 */
        }
        TILE_UNROLL
        for (int v = 0; v < V; v++) {
            const float* x = xp + v * xs;
            const __m512i xu = _mm512_xor_si512(_mm512_load_si512((const int8_t*)x + k), flip);
            const __m512 dx = _mm512_load_ps(x + padded / 4 + k / 4);
            TILE_UNROLL
            for (int r = 0; r < TILE_ROWS_INT8; r++)
                acc[r][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(corr[r], xu, w[r])), dx, acc[r][v]);
        }
    }
    TILE_UNROLL
    for (int r = 0; r < TILE_ROWS_INT8; r++) {
        if (V == 4)
            reduce16x4(acc[r], out + r * TILE_VECTORS_INT8);
        else
            TILE_UNROLL
            for (int v = 0; v < V; v++) out[r * TILE_VECTORS_INT8 + v] = reduce16(acc[r][v]);
    }
}

/* 2 int4 rows from row n0 (K / NK_INT4_GROUP a multiple of 4) times V vectors xp + v * xs. The mins'
 * term of one row for all V vectors shares one register: 4 lanes per vector. */
Q8_KERNEL void int4_tile(const gemv_args* a, int64_t n0, const float* xp, int64_t xs, float* out, const int V,
                         const int prefetch, const float* prepared, const int use_prepared) {
    const int64_t groups = a->K / NK_INT4_GROUP, padded = nk_q8_int4_groups(a->K);
    const int64_t row_floats = nk_q8_tile_prepared_floats(a, 1);
    const int64_t pf = nk_tile_prefetch_distance(TILE_ROWS_INT4 * a->K / 2);
    const __m512i low = _mm512_set1_epi8(0x0f);
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const uint8_t* w[TILE_ROWS_INT4];
    const float *s16p[TILE_ROWS_INT4], *m4p[TILE_ROWS_INT4]; /* the rows' prepared scales and mins, */
    int4_row_scales rs[TILE_ROWS_INT4];                      /* or where their codes are */
    __m512 acc[TILE_ROWS_INT4][TILE_VECTORS_INT4], macc[TILE_ROWS_INT4][TILE_VECTORS_INT4 / 4];
    TILE_UNROLL
    for (int r = 0; r < TILE_ROWS_INT4; r++) {
        w[r] = (const uint8_t*)a->W + (n0 + r) * (a->K / 2);
        const int64_t tile = ((n0 + r) / NK_INT4_TILE) * groups;
        rs[r] = (int4_row_scales){(const uint8_t*)a->scales + (n0 + r) * groups,
                                  (const int8_t*)a->mins + (n0 + r) * groups, a->scale_units + tile, a->min_units + tile};
        s16p[r] = use_prepared ? prepared + r * row_floats : NULL;
        m4p[r] = use_prepared ? s16p[r] + groups * 4 : NULL;
        TILE_UNROLL
        for (int h = 0; h < (V + 3) / 4; h++) macc[r][h] = _mm512_setzero_ps();
        TILE_UNROLL
        for (int v = 0; v < V; v++) acc[r][v] = _mm512_setzero_ps();
    }
    for (int64_t g = 0; g < groups; g += 4) { /* 4 groups = 64 bytes of each row */
        __m512i lo[TILE_ROWS_INT4], hi[TILE_ROWS_INT4];
        __m512 s16[TILE_ROWS_INT4];
        __m512 xsums[TILE_VECTORS_INT4 / 4]; /* vector v's 4 group sums in lanes 4 (v % 4) .. of xsums[v / 4] */
        TILE_UNROLL
        for (int h = 0; h < (V + 3) / 4; h++) xsums[h] = _mm512_setzero_ps();
        TILE_UNROLL
        for (int v = 0; v < V; v++)
            xsums[v / 4] = _mm512_mask_broadcast_f32x4(xsums[v / 4], (__mmask16)(0xf << (4 * (v % 4))),
                                                       _mm_load_ps(xp + v * xs + padded * (NK_INT4_GROUP / 4) + padded + g));
        TILE_UNROLL
        for (int r = 0; r < TILE_ROWS_INT4; r++) {
            const uint8_t* block = w[r] + g * (NK_INT4_GROUP / 2);
            if (prefetch) _mm_prefetch((const char*)block + pf, NK_PREFETCH_HINT);
            const __m512i bytes = _mm512_loadu_si512(block);
            lo[r] = _mm512_and_si512(bytes, low);
            hi[r] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low);
            __m512 m16;
            if (use_prepared) {
                s16[r] = _mm512_load_ps(s16p[r] + g * 4);
                m16 = _mm512_broadcast_f32x4(_mm_load_ps(m4p[r] + g));
            } else {
                __m128 s4, m4;
                scales4(&rs[r], g, &s4, &m4);
                s16[r] = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(s4));
                m16 = _mm512_broadcast_f32x4(m4);
            }
            TILE_UNROLL
            for (int h = 0; h < (V + 3) / 4; h++) macc[r][h] = _mm512_fmadd_ps(m16, xsums[h], macc[r][h]);
        }
        TILE_UNROLL
        for (int v = 0; v < V; v++) {
            const float* x = xp + v * xs;
            const int8_t* q = (const int8_t*)x + g * NK_INT4_GROUP; /* 128 bytes per 4 groups */
            const __m512i qlo = _mm512_load_si512(q), qhi = _mm512_load_si512(q + 64);
            const __m512 dx = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_load_ps(x + padded * (NK_INT4_GROUP / 4) + g)));
            TILE_UNROLL
            for (int r = 0; r < TILE_ROWS_INT4; r++) {
                __m512i i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[r], qlo);
                i = _mm512_dpbusd_epi32(i, hi[r], qhi);
                acc[r][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(s16[r], dx), acc[r][v]);
            }
        }
    }
    TILE_UNROLL
    for (int r = 0; r < TILE_ROWS_INT4; r++) {
        float mins[TILE_VECTORS_INT4 * 4] __attribute__((aligned(64)));
        TILE_UNROLL
        for (int h = 0; h < (V + 3) / 4; h++) _mm512_store_ps(mins + 16 * h, macc[r][h]);
        float sums[TILE_VECTORS_INT4];
        int v = 0;
        for (; v + 4 <= V; v += 4) reduce16x4(&acc[r][v], sums + v);
        for (; v < V; v++) sums[v] = reduce16(acc[r][v]);
        for (v = 0; v < V; v++) {
            const __m128 m4 = _mm_load_ps(mins + 4 * v);
            const __m128 m = _mm_add_ps(m4, _mm_movehl_ps(m4, m4)); /* (m0 + m2) + (m1 + m3), as int4_kernel */
            out[r * TILE_VECTORS_INT4 + v] = sums[v] + _mm_cvtss_f32(_mm_add_ss(m, _mm_shuffle_ps(m, m, 1)));
        }
    }
}

int64_t nk_q8_tile_prepared_floats(const gemv_args* a, int64_t rows) {
    if (a->kind != KIND_INT4) return 0;
    const int64_t groups = a->K / NK_INT4_GROUP;
    return rows * ((groups * 5 + 15) / 16 * 16); /* 4 lanes of scale and 1 min per group, 64-byte rows */
}

/* The scales4 of every 4 groups of every row, spread to their lanes: computed here once per block of rows
 * instead of once per row in every tile of vectors that sweeps it (16 times for a 128-token prefill),
 * which took a fifth of the tiles' instructions (the V = 8 loop: 180 instructions, 24 of them stack
 * spills, now 132 and 6). The same fp32 values, so the tiles' results do not change. Measured on 2 cores
 * of an Ice Lake Xeon, 128 vectors, best of 12 alternated calls, GOP/s: [2816, 1024] 276 -> 305,
 * [1024, 2816] 326 -> 371, [11008, 4096] 359 -> 390, [4096, 11008] 365 -> 391. With one sweep (8 vectors
 * or fewer, a batched step) the extra pass over the scales costs more than it saves (-5..-14%): those
 * tiles convert the codes' scales themselves, as before. */
void nk_q8_tile_prepare(const gemv_args* a, int64_t n_begin, int64_t rows, float* prepared) {
    if (a->kind != KIND_INT4) return;
    const int64_t groups = a->K / NK_INT4_GROUP, row_floats = nk_q8_tile_prepared_floats(a, 1);
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    for (int64_t i = 0; i < rows; i++) {
        const int64_t n = n_begin + i, tile = (n / NK_INT4_TILE) * groups;
        const int4_row_scales rs = {(const uint8_t*)a->scales + n * groups, (const int8_t*)a->mins + n * groups,
                                    a->scale_units + tile, a->min_units + tile};
        float* s16 = prepared + i * row_floats;
        float* m = s16 + groups * 4;
        for (int64_t g = 0; g < groups; g += 4) {
            __m128 s4, m4;
            scales4(&rs, g, &s4, &m4);
            _mm512_store_ps(s16 + g * 4, _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(s4)));
            _mm_store_ps(m + g, m4);
        }
    }
}

int nk_q8_tile_shape(const gemv_args* a, int* vectors) {
    if (a->kind == KIND_INT8 && a->K > 0 && a->K % 64 == 0) {
        *vectors = TILE_VECTORS_INT8;
        return TILE_ROWS_INT8;
    }
    if (a->kind == KIND_INT4 && a->K > 0 && (a->K / NK_INT4_GROUP) % 4 == 0) {
        *vectors = TILE_VECTORS_INT4;
        return TILE_ROWS_INT4;
    }
    return 0;
}

/* Each kind of tile is dispatched from a function of its own, so that no function holds more than 8
 * instances of the unrolled tile loops. */
static __attribute__((noinline)) void int8_tiles(const gemv_args* a, int64_t n0, const float* xp, int64_t xs, int nb,
                                                 float* out, int prefetch) {
    const int8_t* w0 = (const int8_t*)a->W + n0 * a->K;
    switch (nb) { /* a constant count per call, so that the loops over vectors unroll */
        case 1: int8_tile(w0, a->K, xp, xs, out, 1, prefetch); break;
        case 2: int8_tile(w0, a->K, xp, xs, out, 2, prefetch); break;
        case 3: int8_tile(w0, a->K, xp, xs, out, 3, prefetch); break;
        default: int8_tile(w0, a->K, xp, xs, out, 4, prefetch); break;
    }
}

_Static_assert(TILE_VECTORS_INT4 == 8, "int4 tiles are dispatched for 1..8 vectors");

/* int4_tile with a constant count of vectors (1..8, nb), so that its loops over vectors unroll; the other
 * arguments are the calling dispatcher's own (a, n0, xp, xs, out, prefetch). */
#define INT4_TILE_FOR(nb, PREPARED, USE) \
    switch (nb) { \
        case 1: int4_tile(a, n0, xp, xs, out, 1, prefetch, PREPARED, USE); break; \
        case 2: int4_tile(a, n0, xp, xs, out, 2, prefetch, PREPARED, USE); break; \
        case 3: int4_tile(a, n0, xp, xs, out, 3, prefetch, PREPARED, USE); break; \
        case 4: int4_tile(a, n0, xp, xs, out, 4, prefetch, PREPARED, USE); break; \
        case 5: int4_tile(a, n0, xp, xs, out, 5, prefetch, PREPARED, USE); break; \
        case 6: int4_tile(a, n0, xp, xs, out, 6, prefetch, PREPARED, USE); break; \
        case 7: int4_tile(a, n0, xp, xs, out, 7, prefetch, PREPARED, USE); break; \
        default: int4_tile(a, n0, xp, xs, out, 8, prefetch, PREPARED, USE); break; \
    }

static __attribute__((noinline)) void int4_tiles_prepared(const gemv_args* a, int64_t n0, const float* xp,
                                                          int64_t xs, int nb, float* out, int prefetch,
                                                          const float* prepared) {
    INT4_TILE_FOR(nb, prepared, 1)
}

/* One sweep over the rows (a batched step): the scales computed from their codes in the tile. */
static __attribute__((noinline)) void int4_tiles(const gemv_args* a, int64_t n0, const float* xp, int64_t xs,
                                                 int nb, float* out, int prefetch) {
    INT4_TILE_FOR(nb, NULL, 0)
}

void nk_q8_tile(const gemv_args* a, int64_t n0, const float* xp, int64_t xs, int nb, float* out, int prefetch,
                const float* prepared) {
    if (a->kind == KIND_INT8)
        int8_tiles(a, n0, xp, xs, nb, out, prefetch);
    else if (prepared)
        int4_tiles_prepared(a, n0, xp, xs, nb, out, prefetch, prepared);
    else
        int4_tiles(a, n0, xp, xs, nb, out, prefetch);
}
#else
int nk_q8_tile_shape(const gemv_args* a, int* vectors) {
    (void)a;
    *vectors = 0;
    return 0; /* the AVX2 and plain AVX-512 builds have no tile kernels: nk_q8_row_batch serves batches */
}

void nk_q8_tile(const gemv_args* a, int64_t n0, const float* xp, int64_t xs, int nb, float* out, int prefetch,
                const float* prepared) {
    (void)a, (void)n0, (void)xp, (void)xs, (void)nb, (void)out, (void)prefetch, (void)prepared; /* never called */
}

int64_t nk_q8_tile_prepared_floats(const gemv_args* a, int64_t rows) {
    (void)a, (void)rows;
    return 0;
}

void nk_q8_tile_prepare(const gemv_args* a, int64_t n_begin, int64_t rows, float* prepared) {
    (void)a, (void)n_begin, (void)rows, (void)prepared; /* never called */
}
#endif

/* ---------------------------------------------------------------------------------------------------- */
/* Entry points for gemv.c's drivers.                                                                   */

/* Row n's weights, and for int4 its scale and min codes and its tile's units. */
static inline const void* row_pointers(const gemv_args* a, int64_t n, int4_row_scales* rs) {
    if (a->kind != KIND_INT4) return (const int8_t*)a->W + n * a->K;
    const int64_t groups = a->K / NK_INT4_GROUP, tile = (n / NK_INT4_TILE) * groups;
    *rs = (int4_row_scales){(const uint8_t*)a->scales + n * groups, (const int8_t*)a->mins + n * groups,
                            a->scale_units + tile, a->min_units + tile};
    return (const uint8_t*)a->W + n * (a->K / 2);
}

Q8_KERNEL void tile(const gemv_args* a, const int64_t* n, const float* const xp[], float* out, const int R,
                    const int V, const int prefetch) {
    const void* w[NK_ROWS];
    int4_row_scales rs[NK_ROWS];
    for (int r = 0; r < R; r++) w[r] = row_pointers(a, n[r], &rs[r]);
    if (a->kind == KIND_INT4)
        int4_kernel((const uint8_t* const*)w, rs, a->K, xp, out, R, V, prefetch);
    else
        int8_kernel((const int8_t* const*)w, a->K, xp, out, R, V, prefetch);
}

void nk_q8_rows(const gemv_args* a, const int64_t n[NK_ROWS], float* acc, int nrows) {
    const float* xp[1] = {a->xp};
    if (nrows == NK_ROWS)
        tile(a, n, xp, acc, NK_ROWS, 1, 1);
    else if (nrows == 2) /* int4's batch-1 rows (gemv.c's INT4_STREAMS) */
        tile(a, n, xp, acc, 2, 1, 1);
    else
        tile(a, n, xp, acc, 1, 1, 1);
}

void nk_q8_row_batch(const gemv_args* a, int64_t n, const float* xp0, int64_t xs, float* out, int nb, int prefetch) {
    const float* xp[MAX_ACC];
    for (int b = 0; b < nb; b++) xp[b] = xp0 + b * xs;
    switch (nb) { /* a constant count per call, so that the loops over vectors unroll */
        case 1: tile(a, &n, xp, out, 1, 1, prefetch); break;
        case 2: tile(a, &n, xp, out, 1, 2, prefetch); break;
        case 3: tile(a, &n, xp, out, 1, 3, prefetch); break;
        default: tile(a, &n, xp, out, 1, 4, prefetch); break;
    }
}
