/*
 * One whole step of a Qwen v1 model for B rows in one call (one token per row in, its logits out): every
 * block, the final norm and lm_head.
 *
 * Built with gemv.c into one library (kernels/cpu/build.py); it reuses gemv.c's GEMV rows and activation
 * layout (nk_gemv_rows, nk_load_x, declared in common.h) and the header's conversions.
 *
 * Why a whole step in C: at batch 1 a step reads every weight once, and the GEMVs alone run close to
 * DRAM bandwidth; what kept PyTorch's step far from the roofline was the ~60 small operations per block
 * around them (norms, rotary, attention, casts, residuals), each paying dispatch and allocation, and the
 * OpenMP team waking up for every GEMV. Here one parallel region covers the step, and the threads meet
 * at a barrier only where a result of the whole team is needed (5 per block).

Batches (B > 1): each linear multiplies every weight row into all B rows' activations at once
(nk_gemv_rows_batch), so a step still reads the weights from memory once, whatever B. Rows are
left-padded sequences sharing one position: each attends over its own cached keys under its own key
mask row, with its own rotary tables (its own NTK alpha, or row 0's when all rows share one); logn
depends on the position only. A row's result is bit-identical to a batch-1 step of that row alone (the
batched GEMV rows sum in the batch-1 order, and everything else is the same code per row).
 *
 * Work is handed out in chunks (NK_CHUNKS_PER_THREAD per thread and matrix, first come first served)
 * rather than one fixed slab per thread: on a shared VM one core is often a little slower than the
 * other, and with fixed slabs the faster one then idles at every barrier (a few percent of a step;
 * chunks cut that to a third). Which thread computes a row does not change its value
 * (see nk_gemv_rows), so results do not depend on the thread count or the schedule.
 *
 * Numerics: the computation is that of nekomata_core.model in the model dtype ("act" below: fp32, bf16
 * or fp16), with the same rounding points. Every value that PyTorch would hold in an act-dtype tensor is
 * rounded to act here too (round_act), and every operation PyTorch does in fp32 is done in fp32, as
 * separate IEEE operations (this file is built with -ffp-contract=off, so `a * b + c` is not fused).
 * What differs is only the summation order of dot products and reductions (GEMVs, attention, RMSNorm),
 * so fp32 models agree with PyTorch to a few ulps and half-precision ones up to an occasional
 * last-bit rounding flip of an activation.
 *
 * Threads keep private copies of the residual stream x (and of its normalised form): they all compute
 * them identically from the shared GEMV outputs, which is cheaper than one more barrier per update.
 */
#include <omp.h>

#include "common.h"

typedef struct {
    int kind;           /* KIND_F32 (weights in fp32), KIND_BF16, KIND_INT8 or KIND_INT4 */
    const void* W;      /* [N, K] row-major (int4: uint8 [N, K/2], two codes a byte) */
    const void* scales; /* int8: [N] act dtype; int4: uint8 codes [N, K / NK_INT4_GROUP] */
    const void* mins;   /* int4 only: int8 codes [N, K / NK_INT4_GROUP] */
    const uint16_t* scale_units; /* int4 only: bf16 [ceil(N / NK_INT4_TILE), K / NK_INT4_GROUP] */
    const uint16_t* min_units;   /* int4 only: the same shape */
    const void* bias;   /* [N] act dtype, or NULL */
    int64_t N, K;
} nk_linear;

typedef struct {
    const void* ln_1; /* [H] act dtype */
    nk_linear c_attn;   /* [3H, H], with bias: the q, k and v rows; or only the q and k rows [2H, H]
                         * when c_attn_v is given */
    nk_linear c_attn_v; /* the v rows [H, H] (an int4 model's c_attn: q and k int4, v int8), or W = NULL */
    nk_linear attn_proj;
    const void* ln_2;
    nk_linear w1, w2; /* [F, H] each: w1(x) * silu(w2(x)) */
    nk_linear mlp_proj;
} nk_layer;

typedef struct {
    int64_t n_layers, hidden, n_heads, head_dim, rotary_dim, mlp_width, vocab;
    float eps;
    int act; /* DT_F32 / DT_BF16 / DT_F16 */
    const nk_layer* layers;
    const void* ln_f;
    nk_linear lm_head;
} nk_model;

typedef struct {
    int64_t batch;            /* B: rows, one token each */
    const void* embedding;    /* [V, H] act dtype: the embedding table */
    const int64_t* tokens;    /* [B] the input tokens (0 <= token < V, checked by the caller) */
    const float* cos;         /* [Bα, R] fp32, each row laid out as cat(freqs, freqs) */
    const float* sin;         /* [Bα, R] */
    int64_t rotary_rows;      /* Bα: B (a table per row, Qwen quirk 3 per row) or 1 (shared) */
    float logn;               /* the logn factor rounded to act, or 0 for none (Qwen quirk 4) */
    int64_t position;         /* where the new keys/values go; keys 0..position are attended to */
    int64_t max_length;       /* T_max of the cache */
    const uint8_t* key_mask;  /* [B, T_max] bool: 1 = a real token (0 = left padding) */
    void* keys;               /* [L, B, N, T_max, D] act dtype */
    void* values;
    void* logits; /* [B, V] act dtype, output */
    void* scratch; /* nekomata_step_scratch_bytes(model, B) bytes, shared by the team */
    int nthreads;
} nk_step;

static inline size_t act_size(int act) { return act == DT_F32 ? 4 : 2; }

/* Shared buffers, all in the act dtype (what PyTorch would hold in tensors), one row per batch row:
 * qkv [B, 3H] (or [B, 2H] of q and k, and v [B, H], when c_attn is split), attn, o and m [B, H], h1,
 * h2 and g [B, F]. */
typedef struct {
    void *qkv, *v, *attn, *o, *h1, *h2, *g, *m;
} nk_buffers;

/* Lays the buffers out in `scratch` (each on a 64-byte boundary) and returns the bytes they take; the
 * one place that knows the layout, so that nekomata_step_scratch_bytes cannot disagree with it. */
static size_t carve(const nk_model* m, int64_t batch, char* scratch, nk_buffers* b) {
    const size_t e = act_size(m->act) * (size_t)batch;
    const int64_t sizes[8] = {3 * m->hidden, m->hidden, m->hidden, m->hidden, m->mlp_width,
                              m->mlp_width, m->mlp_width, m->hidden};
    void** slots[8] = {&b->qkv, &b->v, &b->attn, &b->o, &b->h1, &b->h2, &b->g, &b->m};
    size_t offset = 0;
    for (int i = 0; i < 8; i++) {
        *slots[i] = scratch ? scratch + offset : NULL;
        offset += ((size_t)sizes[i] * e + 63) & ~(size_t)63;
    }
    return offset;
}

NK_EXPORT int64_t nekomata_step_scratch_bytes(const nk_model* m, int64_t batch) {
    nk_buffers unused;
    return (int64_t)carve(m, batch, NULL, &unused);
}

/* Thread-private work vectors (fp32), grown as needed and kept: steady-state steps allocate nothing. */
static __thread float* tl_vec[3] = {NULL, NULL, NULL};
static __thread int64_t tl_len[3] = {0, 0, 0};

static float* tl_get(int slot, int64_t n) {
    if (n > tl_len[slot]) {
        free(tl_vec[slot]);
        int64_t len = (n + 63) & ~(int64_t)63;
        tl_vec[slot] = (float*)aligned_alloc(64, (size_t)len * sizeof(float));
        tl_len[slot] = tl_vec[slot] ? len : 0;
    }
    return tl_vec[slot];
}

/* ---------------------------------------------------------------------------------------------------- */
/* The pieces of a block, in the order they run.                                                        */

/* Rows [begin, end) of y = lin(x) for `batch` rows: x given as the prepared vectors xp (see nk_load_x,
 * one per batch row, nk_x_stride apart), y [batch, N]. One row goes to the batch-1 kernels. */
static void linear_rows(const nk_linear* l, const float* xp, void* y, int act, int64_t batch, int64_t begin,
                        int64_t end) {
    gemv_args a = {l->kind, l->W, xp, l->scales, l->mins, act, l->bias, act, y, act, l->N, l->K,
                   l->scale_units, l->min_units};
    if (end > begin) nk_gemv_rows_batch(&a, batch, begin, end);
}

/* The `batch` rows of src ([batch, K] of src_dtype) prepared for lin into xp, nk_x_stride apart. */
static void load_rows(float* xp, const void* src, int src_dtype, const nk_linear* l, int64_t batch) {
    nk_load_rows(xp, src, src_dtype, l->K, nk_x_layout(l->kind), batch); /* batch 1 and batched alike */
}

/* Chunks per thread and matrix: enough that the last chunk to finish is a small part of the matrix,
 * few enough that each chunk is long (>= 16 rows) for the prefetchers (32 per thread measured slower). */
#define NK_CHUNKS_PER_THREAD 8

static inline int64_t chunk_rows(int64_t N, int team) {
    int64_t per = (int64_t)team * NK_CHUNKS_PER_THREAD;
    int64_t c = (N + per - 1) / per;
    return c < 16 ? 16 : c;
}

/* y = lin(x) for `batch` rows by the whole team, in chunks of weight rows taken first come first served.
 * No barrier at the end: the caller places one where the result is needed. */
static void linear_team(const nk_linear* l, const float* xp, void* y, int act, int64_t batch, int team) {
    int64_t c = chunk_rows(l->N, team), n = (l->N + c - 1) / c;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t i = 0; i < n; i++)
        linear_rows(l, xp, y, act, batch, i * c, (i + 1) * c < l->N ? (i + 1) * c : l->N);
}

/* The attention of one (row, head) over its cached keys and values ([T, D] each, act dtype). At a few hundred
 * positions this is a tenth of a small model's decode step (perf: the 620M int4 model, 1 to 512 positions),
 * so its two loops are written for the CPU's
 * pipelines, without changing a single operation: every score is the same chain of fused multiply-adds
 * over k's 8-lane chunks in order, then hsum8, then the scalar tail, and every output element the same
 * fused multiply-add per position in position order. What changes is only which independent chains run
 * side by side: the scores of 4 keys at once (one chain per key is bound by the multiply-add's latency),
 * and the weighted sum of the values with 64 output elements held in registers across all positions
 * instead of loaded and stored once per position. With the vector exp, RMSNorm and residual add, the part
 * of the 620M int4 decode step outside the GEMVs went from 2.95 to 2.26 ms (positions 128-192, 2 Zen 4 cores,
 * alternated in one process); the loads of the cache now bound these loops (a software prefetch 1-4 KB
 * ahead measured slower or level). */

/* scores[j] = dot(q, k_j) * scale for the positions j = 0..n-1 whose key mask is set; best = their largest
 * score (-inf if none). */
static float attention_scores(const float* q, const char* keys, int act, int64_t D, const uint8_t* key_mask,
                              int64_t n, float scale, float* scores) {
    const size_t row = (size_t)D * act_size(act);
    const int64_t whole = D - D % 8;
    float best = -INFINITY;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t i = 0; i < whole; i += 8) {
            const __m256 qv = _mm256_loadu_ps(q + i);
            for (int t = 0; t < 4; t++) acc[t] = _mm256_fmadd_ps(qv, load8_f32(keys + (j + t) * row, act, i), acc[t]);
        }
        for (int t = 0; t < 4; t++) {
            if (!key_mask[j + t]) continue; /* (a masked key's dot product is computed and dropped) */
            float s = hsum8(acc[t]);
            for (int64_t i = whole; i < D; i++) s = fmaf(q[i], load_scalar(keys + (j + t) * row, act, i), s);
            scores[j + t] = s * scale;
            if (scores[j + t] > best) best = scores[j + t];
        }
    }
    for (; j < n; j++) {
        if (!key_mask[j]) continue;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < whole; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8_f32(keys + j * row, act, i), acc);
        float s = hsum8(acc);
        for (int64_t i = whole; i < D; i++) s = fmaf(q[i], load_scalar(keys + j * row, act, i), s);
        scores[j] = s * scale;
        if (scores[j] > best) best = scores[j];
    }
    return best;
}

/* out[i] = sum over the unmasked positions j, in order, of p[j] * v_j[i] (fused multiply-adds from 0), for
 * the D elements: 64 at a time in 8 registers, then 8 at a time, then one at a time. */
static void attention_values(const float* p, const char* values, int act, int64_t D, const uint8_t* key_mask,
                             int64_t n, float* out) {
    const size_t row = (size_t)D * act_size(act);
    int64_t i = 0;
    for (; i + 64 <= D; i += 64) {
        __m256 acc[8];
        for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; j++) {
            if (!key_mask[j]) continue;
            const __m256 pv = _mm256_set1_ps(p[j]);
            for (int c = 0; c < 8; c++) acc[c] = _mm256_fmadd_ps(pv, load8_f32(values + j * row, act, i + 8 * c), acc[c]);
        }
        for (int c = 0; c < 8; c++) _mm256_storeu_ps(out + i + 8 * c, acc[c]);
    }
    for (; i + 8 <= D; i += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; j++)
            if (key_mask[j]) acc = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), load8_f32(values + j * row, act, i), acc);
        _mm256_storeu_ps(out + i, acc);
    }
    for (; i < D; i++) {
        float acc = 0.0f;
        for (int64_t j = 0; j < n; j++)
            if (key_mask[j]) acc = fmaf(p[j], load_scalar(values + j * row, act, i), acc);
        out[i] = acc;
    }
}

/* Rotary embedding of one head, rotate-half form, in fp32 from the act-dtype input, then rounded:
 * out = x * cos + rotate_half(x) * sin on the first R dims (two products and a sum, unfused, as
 * PyTorch's elementwise ops do); dims R..D-1 pass through. */
static void rope_head(const void* src, int act, int64_t D, int64_t R, const float* cos, const float* sin,
                      float* out) {
    float x[NK_MAX_HEAD_DIM];
    for (int64_t i = 0; i < D; i++) x[i] = load_scalar(src, act, i);
    int64_t half = R / 2;
    for (int64_t i = 0; i < R; i++) {
        float rotated = i < half ? -x[i + half] : x[i - half];
        float a = x[i] * cos[i];
        float b = rotated * sin[i];
        out[i] = round_act(a + b, act);
    }
    for (int64_t i = R; i < D; i++) out[i] = x[i];
}

/* scores[j] = exp(scores[j] - best) for the n positions whose key mask is set (the others are left as
 * they are, never read), by common.h's 8-lane exp (within 2 ulp of expf) instead of one expf call per
 * (head, position). */
static void softmax_numerators(float* scores, const uint8_t* key_mask, int64_t n, float best) {
    const __m256 shift = _mm256_set1_ps(best);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) { /* masked lanes hold whatever they held: their results are not used */
        const __m256 lanes = _mm256_loadu_ps(scores + j);
        const __m256 p = exp8(_mm256_sub_ps(lanes, shift));
        uint64_t mask8;
        memcpy(&mask8, key_mask + j, sizeof mask8);
        if (mask8 == 0x0101010101010101ull)
            _mm256_storeu_ps(scores + j, p);
        else {
            float out[8];
            _mm256_storeu_ps(out, p);
            for (int i = 0; i < 8; i++)
                if (key_mask[j + i]) scores[j + i] = out[i];
        }
    }
    for (; j < n; j++)
        if (key_mask[j]) scores[j] = exp1(scores[j] - best);
}

/* Attention of the new tokens, (row, head) pairs shared out among the team: rotary on q and k (with the
 * row's tables), logn on q, the new key/value written to the row's cache, then softmax(q k^T / sqrt(D)) v
 * over the cached positions 0..position that the row's key mask allows (left padding is masked out; the
 * new token itself is always real). Scores and probabilities stay fp32; the output is rounded once to act. */
static void attention_heads(const nk_model* m, const nk_step* s, const nk_buffers* b, int64_t layer,
                            float* scores) {
    const int act = m->act;
    const size_t e = act_size(act);
    const int64_t H = m->hidden, D = m->head_dim, T = s->max_length, pos = s->position, R = m->rotary_dim;
    const int64_t N = m->n_heads, B = s->batch;
    const float scale = 1.0f / sqrtf((float)D);
    const int split = m->layers[layer].c_attn_v.W != NULL; /* q and k in qkv [B, 2H], v in b->v [B, H] */
    const int64_t qk_row = split ? 2 * H : 3 * H;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t item = 0; item < B * N; item++) {
        const int64_t row = item / N, h = item % N;
        float q[NK_MAX_HEAD_DIM], k[NK_MAX_HEAD_DIM], acc[NK_MAX_HEAD_DIM];
        const char* qkv = (const char*)b->qkv + (size_t)(row * qk_row) * e; /* q, k (and v unless split) */
        const char* v_row = split ? (const char*)b->v + (size_t)(row * H) * e : qkv + (size_t)(2 * H) * e;
        const int64_t table = s->rotary_rows == 1 ? 0 : row;               /* Qwen quirk 3, per row */
        const float* cos = s->cos + table * R;
        const float* sin = s->sin + table * R;
        const uint8_t* key_mask = s->key_mask + row * T;
        rope_head(qkv + (size_t)(h * D) * e, act, D, R, cos, sin, q);
        rope_head(qkv + (size_t)(H + h * D) * e, act, D, R, cos, sin, k);
        if (s->logn != 0.0f)
            for (int64_t i = 0; i < D; i++) q[i] = round_act(q[i] * s->logn, act);
        /* The cache keeps keys after rotary (never logn) and values as projected. */
        size_t head_off = (size_t)((((layer * B) + row) * N + h) * T) * (size_t)D; /* [L, B, N, T, D] */
        char* kc = (char*)s->keys + head_off * e;
        char* vc = (char*)s->values + head_off * e;
        const char* vsrc = v_row + (size_t)(h * D) * e;
        for (int64_t i = 0; i < D; i++) store_scalar(kc + (size_t)(pos * D) * e, act, i, k[i]);
        memcpy(vc + (size_t)(pos * D) * e, vsrc, (size_t)D * e);

        const float best = attention_scores(q, kc, act, D, key_mask, pos + 1, scale, scores);
        softmax_numerators(scores, key_mask, pos + 1, best);
        float total = 0.0f;
        for (int64_t j = 0; j <= pos; j++)
            if (key_mask[j]) total += scores[j];
        attention_values(scores, vc, act, D, key_mask, pos + 1, acc);
        void* out = (char*)b->attn + (size_t)(row * H + h * D) * e;
        for (int64_t i = 0; i < D; i++) store_scalar(out, act, i, acc[i] / total);
    }
}

/* g = round(w1(x) * round(silu(w2(x)))) for columns [begin, end) of every batch row ([B, F] each),
 * Qwen quirk 2: silu on the w2 branch. h1 and h2 already hold the act-rounded projections. 8 lanes at a
 * time, exp by common.h's polynomial (within 2 ulp of expf) instead of glibc's expf one value at a time. */
static void swiglu_rows(const nk_buffers* b, int act, int64_t F, int64_t batch, int64_t begin, int64_t end) {
    for (int64_t r = 0; r < batch; r++) swiglu_span(b->h1, b->h2, b->g, act, r * F + begin, r * F + end);
}

/* x = round(x + delta), delta in the act dtype (the residual connection); n = B * H elements. */
static void add_residual(float* x, const void* delta, int act, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(x + i, round8_act(_mm256_add_ps(_mm256_loadu_ps(x + i), load8_f32(delta, act, i)), act));
    for (; i < n; i++) x[i] = round_act(x[i] + load_scalar(delta, act, i), act);
}

/* ln(x) of every batch row (x and out [B, H] fp32). */
static void rms_norm_rows(const float* x, const void* w, const nk_model* m, int64_t batch, float* out) {
    for (int64_t r = 0; r < batch; r++) rms_norm_span(x + r * m->hidden, DT_F32, w, out + r * m->hidden, DT_F32, m->act, m->hidden, m->eps);
}

/* ---------------------------------------------------------------------------------------------------- */
/* The step.                                                                                            */

/* x and a: the thread's [B, H] residual stream and its normalised form; xp: the prepared vectors. */
static void step_thread(const nk_model* m, const nk_step* s, const nk_buffers* b, int team, float* x,
                        float* a, float* xp, float* scores) {
    const int act = m->act;
    const int64_t H = m->hidden, F = m->mlp_width, B = s->batch;
    const size_t row = (size_t)H * act_size(act);
    for (int64_t r = 0; r < B; r++)
        for (int64_t i = 0; i < H; i++)
            x[r * H + i] = load_scalar((const char*)s->embedding + (size_t)s->tokens[r] * row, act, i);
    for (int64_t l = 0; l < m->n_layers; l++) {
        const nk_layer* L = &m->layers[l];
        /* x + attn(ln_1(x)) */
        rms_norm_rows(x, L->ln_1, m, B, a);
        load_rows(xp, a, DT_F32, &L->c_attn, B);
        linear_team(&L->c_attn, xp, b->qkv, act, B, team);
        if (L->c_attn_v.W) { /* the v rows: another weight kind, so x prepared again (xp is the thread's) */
            load_rows(xp, a, DT_F32, &L->c_attn_v, B);
            linear_team(&L->c_attn_v, xp, b->v, act, B, team);
        }
#pragma omp barrier
        attention_heads(m, s, b, l, scores);
#pragma omp barrier
        load_rows(xp, b->attn, act, &L->attn_proj, B);
        linear_team(&L->attn_proj, xp, b->o, act, B, team);
#pragma omp barrier
        add_residual(x, b->o, act, B * H);
        /* x + mlp(ln_2(x)): w1 and w2 of the same rows in one chunk, so SwiGLU follows at once */
        rms_norm_rows(x, L->ln_2, m, B, a);
        load_rows(xp, a, DT_F32, &L->w1, B);
        {
            /* (w1 and w2 have the same weight kind, so the same prepared x: checked by the caller) */
            int64_t c = chunk_rows(F, team), n = (F + c - 1) / c;
#pragma omp for schedule(dynamic, 1) nowait
            for (int64_t i = 0; i < n; i++) {
                int64_t lo = i * c, hi = (i + 1) * c < F ? (i + 1) * c : F;
                linear_rows(&L->w1, xp, b->h1, act, B, lo, hi);
                linear_rows(&L->w2, xp, b->h2, act, B, lo, hi);
                swiglu_rows(b, act, F, B, lo, hi);
            }
        }
#pragma omp barrier
        load_rows(xp, b->g, act, &L->mlp_proj, B);
        linear_team(&L->mlp_proj, xp, b->m, act, B, team);
#pragma omp barrier
        add_residual(x, b->m, act, B * H);
    }
    rms_norm_rows(x, m->ln_f, m, B, a);
    load_rows(xp, a, DT_F32, &m->lm_head, B);
    linear_team(&m->lm_head, xp, s->logits, act, B, team);
}

/* Runs one step of s->batch rows; returns 0, -1 when a work buffer cannot be allocated, -2 for a head_dim
 * above NK_MAX_HEAD_DIM, -3 for a batch below 1 or rotary tables for neither 1 nor every row (the
 * caller checks all of these before calling). */
NK_EXPORT int nekomata_step(const nk_model* m, const nk_step* s) {
    if (m->head_dim > NK_MAX_HEAD_DIM) return -2;
    if (s->batch < 1 || (s->rotary_rows != 1 && s->rotary_rows != s->batch)) return -3;
    nk_buffers b;
    carve(m, s->batch, (char*)s->scratch, &b);
    int64_t widest = m->hidden > m->mlp_width ? m->hidden : m->mlp_width;
    int team = s->nthreads < 1 ? 1 : s->nthreads;
    int failed = 0;
#pragma omp parallel num_threads(team)
    {
        int n = omp_get_num_threads();
        float* x = tl_get(0, s->batch * m->hidden);
        float* a = tl_get(1, s->batch * m->hidden);
        float* scores = tl_get(2, s->max_length);
        float* xp = nk_xbuf_get(s->batch * nk_x_stride_max(widest));
        if (!x || !a || !scores || !xp) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        int broken;
#pragma omp atomic read
        broken = failed;
        if (!broken) step_thread(m, s, &b, n, x, a, xp, scores);
    }
    return failed ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------------- */
/* A streaming read of the whole 64-byte lines of `nbytes` bytes (a trailing partial line is skipped),
 * for the benchmark's roofline: the fastest way we know to read memory on these machines, i.e. the
 * GEMVs' access pattern without their arithmetic. Each thread takes one contiguous slab and walks
 * STREAM_WAYS parts of it in lockstep with a software prefetch ahead of each (one stream per thread
 * reads slower: more streams keep more misses in flight). Returns the sum of the 32-bit
 * words (each of the 8 lanes wrapping at 32 bits) so that the loads cannot be optimised away. */
#define STREAM_WAYS 4
#define STREAM_PF 512

NK_EXPORT int64_t nekomata_stream_read(const void* data, int64_t nbytes, int nthreads) {
    int64_t lines = nbytes / 64, total = 0;
    int team = nthreads < 1 ? 1 : nthreads;
#pragma omp parallel num_threads(team) reduction(+ : total)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        const char* p = (const char*)data;
        int64_t begin = lines * t / n, end = lines * (t + 1) / n, q = (end - begin) / STREAM_WAYS;
        __m256i acc = _mm256_setzero_si256();
        for (int64_t i = 0; i < q; i++) {
            for (int w = 0; w < STREAM_WAYS; w++) {
                const char* line = p + (begin + w * q + i) * 64;
                _mm_prefetch(line + STREAM_PF, NK_PREFETCH_HINT);
                acc = _mm256_add_epi32(acc, _mm256_loadu_si256((const __m256i*)line));
                acc = _mm256_add_epi32(acc, _mm256_loadu_si256((const __m256i*)(line + 32)));
            }
        }
        for (int64_t i = begin + STREAM_WAYS * q; i < end; i++) {
            acc = _mm256_add_epi32(acc, _mm256_loadu_si256((const __m256i*)(p + i * 64)));
            acc = _mm256_add_epi32(acc, _mm256_loadu_si256((const __m256i*)(p + i * 64 + 32)));
        }
        int32_t lanes[8];
        _mm256_storeu_si256((__m256i*)lanes, acc);
        for (int j = 0; j < 8; j++) total += lanes[j];
    }
    return total;
}
