/*
 * The elementwise pieces of a block for many rows at once (a prefill of a half-precision model): RMSNorm,
 * rotary embedding and SwiGLU, each in one pass over its tensors, rows shared out among threads.
 *
 * Why: in a bf16 prefill PyTorch runs each of these as several elementwise kernels (upcast, multiply,
 * cast back, concatenate, ...), every one a pass over memory with its own conversion to and from bf16;
 * on two cores of an Ice Lake Xeon they took ~45 ms of a 460 ms int4 prefill of 128 tokens (bench-620m).
 *
 * Numerics: those of nekomata_core.model in the act dtype, with its rounding points (as step.c): every
 * value PyTorch holds in an act-dtype tensor is rounded to act here too, and what PyTorch computes in
 * fp32 is computed in fp32 as separate IEEE operations (-ffp-contract=off). What may differ is RMSNorm's
 * mean of squares (summed in double, as step.c does) and exp (a polynomial, within 2 ulp of expf): an
 * occasional last-bit flip of a half-precision result. Each row's result depends neither on the thread count nor
 * on the schedule.
 */
#include <omp.h>

#include "common.h"

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

static inline float round1_act(float v, int act) {
    switch (act) {
        case DT_BF16: return bf16_to_f32(f32_to_bf16(v));
        case DT_F16: return f16_to_f32(f32_to_f16(v));
        default: return v;
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* RMSNorm with Qwen quirk 1: out = round(round(x * rsqrt(mean(x^2) + eps)) * w), x and w in act.        */

static void rms_norm_row(const void* x, const void* w, void* out, int act, int64_t H, float eps) {
    /* The mean of squares accumulated in double, as step.c's rms_norm (at least as accurate as PyTorch's
     * fp32 reduction, so r is within ~1.5 ulp of exact for any H), then the same fp32 operations. */
    const int64_t full = H - H % 8;
    __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
    for (int64_t i = 0; i < full; i += 8) {
        const __m256 v = load8_f32(x, act, i);
        const __m256d a = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), b = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        lo = _mm256_add_pd(lo, _mm256_mul_pd(a, a));
        hi = _mm256_add_pd(hi, _mm256_mul_pd(b, b));
    }
    double lanes[4];
    _mm256_storeu_pd(lanes, _mm256_add_pd(lo, hi));
    double ss = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    for (int64_t i = full; i < H; i++) {
        const double v = load_scalar(x, act, i);
        ss += v * v;
    }
    const float r = 1.0f / sqrtf((float)(ss / (double)H) + eps);
    const __m256 r8 = _mm256_set1_ps(r);
    for (int64_t i = 0; i < full; i += 8) {
        const __m256 normed = round8_act(_mm256_mul_ps(load8_f32(x, act, i), r8), act);
        store8_act(out, act, i, _mm256_mul_ps(normed, load8_f32(w, act, i)));
    }
    for (int64_t i = full; i < H; i++)
        store_scalar(out, act, i, round1_act(load_scalar(x, act, i) * r, act) * load_scalar(w, act, i));
}

/* rows x [rows, H] (contiguous, act) normalised into out [rows, H]; w [H] act. */
NK_EXPORT void nekomata_rms_norm_rows(const void* x, const void* w, void* out, int64_t rows, int64_t H, float eps,
                                      int act, int nthreads) {
    const size_t row_bytes = (size_t)H * (act == DT_F32 ? 4 : 2);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && rows > 1)
    for (int64_t r = 0; r < rows; r++)
        rms_norm_row((const char*)x + r * row_bytes, w, (char*)out + r * row_bytes, act, H, eps);
}

/* ---------------------------------------------------------------------------------------------------- */
/* Rotary embedding, rotate-half form: out = round(x * cos + rotate_half(x) * sin) on the first R dims of  */
/* every head (two products and a sum, in fp32 from the act input), dims R..D-1 passed through.          */

static void rope_head(const void* x, void* out, int act, int64_t D, int64_t R, const float* cos, const float* sin) {
    const int64_t half = R / 2;
    if (half % 8 == 0) {
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (int64_t i = 0; i < half; i += 8) {
            const __m256 x1 = load8_f32(x, act, i), x2 = load8_f32(x, act, i + half);
            /* i < half: x1 * cos + (-x2) * sin;  i >= half: x2 * cos + x1 * sin */
            const __m256 lo = _mm256_add_ps(_mm256_mul_ps(x1, _mm256_loadu_ps(cos + i)),
                                            _mm256_mul_ps(_mm256_xor_ps(x2, sign), _mm256_loadu_ps(sin + i)));
            const __m256 hi = _mm256_add_ps(_mm256_mul_ps(x2, _mm256_loadu_ps(cos + i + half)),
                                            _mm256_mul_ps(x1, _mm256_loadu_ps(sin + i + half)));
            store8_act(out, act, i, lo);
            store8_act(out, act, i + half, hi);
        }
    } else {
        for (int64_t i = 0; i < R; i++) {
            const float rotated = i < half ? -load_scalar(x, act, i + half) : load_scalar(x, act, i - half);
            const float a = load_scalar(x, act, i) * cos[i];
            const float b = rotated * sin[i];
            store_scalar(out, act, i, a + b);
        }
    }
    for (int64_t i = R; i < D; i++) store_scalar(out, act, i, load_scalar(x, act, i));
}

/* x [B, T, N, D] of act with element strides (sb, st, sn, 1) rotated into out [B, T, N, D] (contiguous) by
 * the tables cos and sin [Bc, T, R] fp32 (contiguous; Bc = 1: shared by the rows, Bc = B: one per row). */
NK_EXPORT void nekomata_rotary_rows(const void* x, int64_t sb, int64_t st, int64_t sn, void* out, const float* cos,
                                    const float* sin, int64_t B, int64_t T, int64_t N, int64_t D, int64_t R,
                                    int per_row_tables, int act, int nthreads) {
    const size_t e = act == DT_F32 ? 4 : 2;
    const int64_t pairs = B * T;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && pairs > 1)
    for (int64_t bt = 0; bt < pairs; bt++) {
        const int64_t b = bt / T, t = bt % T;
        const int64_t table = ((per_row_tables ? b : 0) * T + t) * R;
        for (int64_t n = 0; n < N; n++)
            rope_head((const char*)x + (size_t)(b * sb + t * st + n * sn) * e,
                      (char*)out + (size_t)((bt * N + n) * D) * e, act, D, R, cos + table, sin + table);
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* SwiGLU, Qwen quirk 2: out = round(h1 * round(silu(h2))), silu(g) = g / (1 + exp(-g)) in fp32.         */

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

/* out [n] = swiglu of h1 and h2 [n] (all act, contiguous). */
NK_EXPORT void nekomata_swiglu_rows(const void* h1, const void* h2, void* out, int64_t n, int act, int nthreads) {
    const int64_t chunk = 4096, chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && chunks > 1)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t begin = c * chunk, end = begin + chunk < n ? begin + chunk : n;
        int64_t i = begin;
        const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
        for (; i + 8 <= end; i += 8) {
            const __m256 gate = load8_f32(h2, act, i);
            const __m256 silu = round8_act(_mm256_div_ps(gate, _mm256_add_ps(one, exp8(_mm256_xor_ps(gate, sign)))), act);
            store8_act(out, act, i, _mm256_mul_ps(load8_f32(h1, act, i), silu));
        }
        for (; i < end; i++) {
            const float gate = load_scalar(h2, act, i);
            const float silu = round1_act(gate / (1.0f + exp1(-gate)), act);
            store_scalar(out, act, i, load_scalar(h1, act, i) * silu);
        }
    }
}
