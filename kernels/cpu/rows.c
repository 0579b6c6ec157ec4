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

/* ---------------------------------------------------------------------------------------------------- */
/* RMSNorm with Qwen quirk 1: out = round(round(x * rsqrt(mean(x^2) + eps)) * w), x and w in act.        */

/* rows x [rows, H] (contiguous, act) normalised into out [rows, H]; w [H] act. */
NK_EXPORT void nekomata_rms_norm_rows(const void* x, const void* w, void* out, int64_t rows, int64_t H, float eps,
                                      int act, int nthreads) {
    const size_t row_bytes = (size_t)H * (act == DT_F32 ? 4 : 2);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && rows > 1)
    for (int64_t r = 0; r < rows; r++)
        rms_norm_span((const char*)x + r * row_bytes, act, w, (char*)out + r * row_bytes, act, act, H, eps);
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

/* out [n] = swiglu of h1 and h2 [n] (all act, contiguous). */
NK_EXPORT void nekomata_swiglu_rows(const void* h1, const void* h2, void* out, int64_t n, int act, int nthreads) {
    const int64_t chunk = 4096, chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && chunks > 1)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t begin = c * chunk, end = begin + chunk < n ? begin + chunk : n;
        swiglu_span(h1, h2, out, act, begin, end);
    }
}
