// Paged attention on the CPU: each query row reads its sequence's keys and values in place in the
// block pool, once, instead of gathering them into a padded copy first. Two kernels: decode (one
// new token per sequence, below) and prefill (any number, further down; it also serves mixed steps).
//
// Cache layout (see attention.py): keys k[kv_head][block][head_dim][slot] (each block transposed,
// so the scores of a block's slots are plain vector FMAs with no horizontal sums), values
// v[kv_head][block][slot][head_dim], in float32 (exact mode) or float16 (half the bytes to stream
// per step; values are converted to float32 as they are read, and all arithmetic is float32).
// Decode work is split over (sequence, kv head) pairs; each pair serves its `group` query heads
// together, so a key row is loaded once for every query head sharing it.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fast_exp.h"

#define MAX_GROUP 16

static inline void axpy(float *y, float a, const float *x, int d) {
#pragma omp simd
    for (int i = 0; i < d; i++) y[i] += a * x[i];
}

#if defined(__AVX512F__)
#include <immintrin.h>
static inline __m512 ld16_float(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 ld16__Float16(const _Float16 *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }

/* A 16-slot block's scores for G query heads at once: one key row load feeds G independent FMA
 * chains. G is a constant in each instance. */
#define SCORES16(T, G)                                                                                  \
    static inline void scores16_##T##_##G(const float *q, const T *kblock, float *s, int D, float scale) { \
        __m512 acc[G];                                                                                  \
        for (int g = 0; g < G; g++) acc[g] = _mm512_setzero_ps();                                       \
        for (int d = 0; d < D; d++) {                                                                   \
            __m512 kd = ld16_##T(kblock + (int64_t)d * 16);                                             \
            for (int g = 0; g < G; g++) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(q[g * D + d]), kd, acc[g]); \
        }                                                                                               \
        for (int g = 0; g < G; g++) _mm512_storeu_ps(s + g * 64, _mm512_mul_ps(acc[g], _mm512_set1_ps(scale))); \
    }
#define SCORES16_ALL(T) SCORES16(T, 1) SCORES16(T, 2) SCORES16(T, 3) SCORES16(T, 4) \
    SCORES16(T, 5) SCORES16(T, 6) SCORES16(T, 7) SCORES16(T, 8)
SCORES16_ALL(float)
SCORES16_ALL(_Float16)

/* 1 if handled: a 16-slot block and at most 8 query heads per kv head (every common model) */
#define SCORES16_DISPATCH(T, G, q, kb, s, D, scale)                                                     \
    ((G) == 1 ? (scores16_##T##_1(q, kb, s, D, scale), 1) : (G) == 2 ? (scores16_##T##_2(q, kb, s, D, scale), 1) \
     : (G) == 3 ? (scores16_##T##_3(q, kb, s, D, scale), 1) : (G) == 4 ? (scores16_##T##_4(q, kb, s, D, scale), 1) \
     : (G) == 5 ? (scores16_##T##_5(q, kb, s, D, scale), 1) : (G) == 6 ? (scores16_##T##_6(q, kb, s, D, scale), 1) \
     : (G) == 7 ? (scores16_##T##_7(q, kb, s, D, scale), 1) : (G) == 8 ? (scores16_##T##_8(q, kb, s, D, scale), 1) : 0)

/* out[g][:] = sum_j s[g][j] * v[j][:] over a sequence's blocks, D a multiple of 64: four
 * accumulators stay in registers across all the slots (re-reading the values, from L1, per head) */
#define PV64(T)                                                                                         \
    static inline void pv64_##T(const float *scores, int64_t len, const T *vbase, const int64_t *table,  \
                                int BS, int D, int G, float *oh) {                                      \
        for (int g = 0; g < G; g++) {                                                                   \
            const float *sg = scores + g * len;                                                         \
            for (int c = 0; c < D; c += 64) {                                                           \
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                             \
                for (int64_t p0 = 0; p0 < len; p0 += BS) {                                              \
                    const T *vb = vbase + table[p0 / BS] * BS * D + c;                                  \
                    const int64_t n = len - p0 < BS ? len - p0 : BS;                                    \
                    for (int64_t j = 0; j < n; j++) {                                                   \
                        const __m512 w = _mm512_set1_ps(sg[p0 + j]);                                    \
                        const T *r = vb + j * D;                                                        \
                        a0 = _mm512_fmadd_ps(w, ld16_##T(r), a0);                                       \
                        a1 = _mm512_fmadd_ps(w, ld16_##T(r + 16), a1);                                  \
                        a2 = _mm512_fmadd_ps(w, ld16_##T(r + 32), a2);                                  \
                        a3 = _mm512_fmadd_ps(w, ld16_##T(r + 48), a3);                                  \
                    }                                                                                   \
                }                                                                                       \
                float *o = oh + g * D + c;                                                              \
                _mm512_storeu_ps(o, a0); _mm512_storeu_ps(o + 16, a1);                                  \
                _mm512_storeu_ps(o + 32, a2); _mm512_storeu_ps(o + 48, a3);                             \
            }                                                                                           \
        }                                                                                               \
    }
PV64(float)
PV64(_Float16)
#define PV_DISPATCH(T, scores, len, vbase, table, BS, D, G, oh) \
    ((D) % 64 == 0 ? (pv64_##T(scores, len, vbase, table, BS, D, G, oh), 1) : 0)

/* one value row to float32 */
#define TO_FLOAT(T, dst, src, D)                                                                        \
    do {                                                                                                \
        int d_ = 0;                                                                                     \
        for (; d_ + 16 <= (D); d_ += 16) _mm512_storeu_ps((dst) + d_, ld16_##T((src) + d_));              \
        for (; d_ < (D); d_++) (dst)[d_] = (float)(src)[d_];                                              \
    } while (0)
#else
#define SCORES16_DISPATCH(T, G, q, kb, s, D, scale) 0
#define PV_DISPATCH(T, scores, len, vbase, table, BS, D, G, oh) 0
#define TO_FLOAT(T, dst, src, D)                                                                        \
    do {                                                                                                \
        for (int d_ = 0; d_ < (D); d_++) (dst)[d_] = (float)(src)[d_];                                    \
    } while (0)
#endif

// One token's key and value for one kv head, into its slot (keys transposed within the block).
#define DEFINE_SLOT_WRITE(T)                                                                                \
    static inline void write_slot_##T(const float *kn, const float *vn, T *k_cache, T *v_cache, int64_t kh,     \
                                      int64_t slot_id, int D, int64_t NB, int BS) {                          \
        const int64_t blk = slot_id / BS, slot = slot_id % BS;                                             \
        T *kb = k_cache + (kh * NB + blk) * BS * D, *vb = v_cache + (kh * NB + blk) * BS * D;               \
        for (int d = 0; d < D; d++) kb[(int64_t)d * BS + slot] = (T)kn[d];                                  \
        for (int d = 0; d < D; d++) vb[slot * D + d] = (T)vn[d];                                            \
    }
DEFINE_SLOT_WRITE(float)
DEFINE_SLOT_WRITE(_Float16)

// One decode unit: `group` query heads (qh, G rows of D) of one sequence against its `len` cached
// positions of one kv head, into oh. Two passes: every score, then one softmax, then the values.
// scores: group * len floats of scratch; vrow: D floats. Shared by the decode and prefill kernels, so
// a decode row gets the same bits whichever of them serves its step.
#define DEFINE_DECODE_UNIT(T)                                                                               \
    /* s[g][j] = scale * sum_d q[g][d] * kblock[d][j], for the block's bs slots and each query head g */  \
    static inline void scores_##T(const float *q, const T *kblock, float *s, int64_t s_stride, int G, int D,   \
                                  int bs, float scale) {                                                    \
        float acc[MAX_GROUP][64];                                                                           \
        for (int g = 0; g < G; g++)                                                                         \
            for (int j = 0; j < bs; j++) acc[g][j] = 0.f;                                                   \
        for (int d = 0; d < D; d++) {                                                                       \
            float kd[64];                                                                                   \
            const T *kr = kblock + (int64_t)d * bs;                                                         \
            _Pragma("omp simd") for (int j = 0; j < bs; j++) kd[j] = (float)kr[j];                          \
            for (int g = 0; g < G; g++) {                                                                   \
                const float qd = q[g * D + d];                                                              \
                _Pragma("omp simd") for (int j = 0; j < bs; j++) acc[g][j] += qd * kd[j];                   \
            }                                                                                               \
        }                                                                                                   \
        for (int g = 0; g < G; g++)                                                                         \
            for (int j = 0; j < bs; j++) s[g * s_stride + j] = acc[g][j] * scale;                          \
    }                                                                                                       \
                                                                                                            \
    static void decode_unit_##T(const float *qh, float *oh, int group, const T *kbase, const T *vbase,      \
                                const int64_t *table, int64_t len, int D, int BS, float scale, float *scores, \
                                float *vrow) {                                                              \
        /* scores for every cached position, block by block; a partial last block is computed */           \
        /* whole into a scratch row and cut to length */                                                    \
        float row[MAX_GROUP * 64];                                                                          \
        for (int64_t p0 = 0; p0 < len; p0 += BS) {                                                          \
            const T *kblock = kbase + table[p0 / BS] * BS * D;                                              \
            const int64_t n = len - p0 < BS ? len - p0 : BS;                                                \
            if (!(BS == 16 && SCORES16_DISPATCH(T, group, qh, kblock, row, D, scale)))                      \
                scores_##T(qh, kblock, row, 64, group, D, BS, scale);                                       \
            for (int g = 0; g < group; g++) memcpy(scores + g * len + p0, row + g * 64, sizeof(float) * n); \
        }                                                                                                   \
        for (int g = 0; g < group; g++) {                                                                   \
            float *s = scores + g * len;                                                                    \
            float m = -INFINITY;                                                                            \
            for (int64_t p = 0; p < len; p++) m = s[p] > m ? s[p] : m;                                      \
            float sum = 0.0f;                                                                               \
            _Pragma("omp simd reduction(+ : sum)") for (int64_t p = 0; p < len; p++) {                      \
                s[p] = exp_nonpos(s[p] - m);                                                                \
                sum += s[p];                                                                                \
            }                                                                                               \
            const float inv = 1.0f / sum;                                                                   \
            _Pragma("omp simd") for (int64_t p = 0; p < len; p++) s[p] *= inv;                              \
            memset(oh + g * D, 0, sizeof(float) * D);                                                       \
        }                                                                                                   \
        if (!PV_DISPATCH(T, scores, len, vbase, table, BS, D, group, oh)) {                                 \
            for (int64_t p0 = 0; p0 < len; p0 += BS) {                                                      \
                const T *vblock = vbase + table[p0 / BS] * BS * D;                                          \
                const int64_t n = len - p0 < BS ? len - p0 : BS;                                            \
                for (int64_t j = 0; j < n; j++) {                                                           \
                    TO_FLOAT(T, vrow, vblock + j * D, D);                                                   \
                    for (int g = 0; g < group; g++) axpy(oh + g * D, scores[g * len + p0 + j], vrow, D);     \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
    }
DEFINE_DECODE_UNIT(float)
DEFINE_DECODE_UNIT(_Float16)

// The decode kernel: one body, two cache element types.
#define DEFINE_DECODE(NAME, T)                                                                              \
    int NAME(const float *q, int64_t ldq, T *k_cache, T *v_cache, const int64_t *block_tables,              \
             int64_t bt_stride, const int64_t *seq_lens, float *out, int B, int H, int KVH, int D, int64_t NB, \
             int BS, float scale, int nthreads, const float *k_new, const float *v_new, int64_t ldkv,         \
             const int64_t *slots) {                                                                        \
        const int group = H / KVH;                                                                          \
        if (BS > 64) return -2;                                                                             \
        if (group > MAX_GROUP || D > 1024) return -3;                                                       \
        int64_t max_len = 0;                                                                                \
        for (int b = 0; b < B; b++) max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;                \
        int failed = 0;                                                                                     \
        /* few (sequence, kv head) pairs for the threads (one stream: 3 pairs on 2 threads): split each */ \
        /* pair's query heads into `split` units; they share the pair's keys and values through cache */ \
        int split = 1;                                                                                      \
        while ((int64_t)B * KVH * split < 2 * nthreads && split < group) {                                  \
            int next = split + 1;                                                                           \
            while (group % next) next++;                                                                    \
            split = next;                                                                                   \
        }                                                                                                   \
        const int per = group / split;                                                                      \
        _Pragma("omp parallel num_threads(nthreads)") {                                                     \
            /* new keys and values first, so every unit of a pair sees them */                              \
            if (k_new) {                                                                                    \
                _Pragma("omp for schedule(static)") for (int64_t pair = 0; pair < (int64_t)B * KVH; pair++) { \
                    const int b = (int)(pair / KVH), kh = (int)(pair % KVH);                                \
                    write_slot_##T(k_new + (int64_t)b * ldkv + (int64_t)kh * D, v_new + (int64_t)b * ldkv + (int64_t)kh * D, \
                                   k_cache, v_cache, kh, slots[b], D, NB, BS);                             \
                }                                                                                           \
            }                                                                                               \
            float *scores = malloc(sizeof(float) * (size_t)per * (size_t)(max_len > 0 ? max_len : 1));      \
            float vrow[1024];                                                                               \
            if (!scores) {                                                                                  \
                _Pragma("omp atomic write") failed = 1;                                                     \
            }                                                                                               \
            _Pragma("omp for schedule(dynamic, 1)") for (int64_t unit = 0; unit < (int64_t)B * KVH * split; unit++) { \
                if (!scores) continue;                                                                      \
                const int64_t pair = unit / split;                                                          \
                const int b = (int)(pair / KVH), kh = (int)(pair % KVH), sub = (int)(unit % split);          \
                decode_unit_##T(q + (int64_t)b * ldq + ((int64_t)kh * split + sub) * per * D,               \
                                out + ((int64_t)b * H + ((int64_t)kh * split + sub) * per) * D, per,         \
                                k_cache + (int64_t)kh * NB * BS * D, v_cache + (int64_t)kh * NB * BS * D,     \
                                block_tables + (int64_t)b * bt_stride, seq_lens[b], D, BS, scale, scores, vrow); \
            }                                                                                               \
            free(scores);                                                                                   \
        }                                                                                                   \
        return failed ? -1 : 0;                                                                             \
    }

// Write T new keys and values (k_new, v_new: [T, KVH, D], row stride ldkv) at their cache slots.
#define DEFINE_WRITE(NAME, T)                                                                               \
    void NAME(int64_t ntok, const float *k_new, const float *v_new, int64_t ldkv, const int64_t *slots,       \
              T *k_cache, T *v_cache, int KVH, int D, int64_t NB, int BS, int nthreads) {                     \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static) if (ntok * KVH >= 64)")             \
        for (int64_t i = 0; i < ntok * KVH; i++) {                                                          \
            const int64_t t = i / KVH, kh = i % KVH;                                                        \
            write_slot_##T(k_new + t * ldkv + kh * D, v_new + t * ldkv + kh * D, k_cache, v_cache, kh, slots[t], D, NB, BS); \
        }                                                                                                   \
    }
DEFINE_WRITE(ember_write_kv, float)
DEFINE_WRITE(ember_write_kv_f16, _Float16)

// q: [B, H, D] with row stride ldq; out: [B, H, D]; block_tables: [B, bt_stride]; seq_lens: [B].
// When k_new is not NULL, each row's new key and value (k_new, v_new: [B, KVH, D], row stride ldkv)
// are first written at slots[b]. Returns 0; -1 out of memory; -2 block size > 64; -3 more than 16
// query heads per kv head, or head_dim > 1024.
DEFINE_DECODE(ember_paged_decode, float)
DEFINE_DECODE(ember_paged_decode_f16, _Float16)

// ---------------------------------------------------------------------------------------------------
// Prefill (and mixed) paged attention: any number of new tokens per sequence, causal over what the
// sequence has cached (its new keys and values included: ember_write_kv runs first).
//
// Work items are (sequence, kv head, tile of query tokens), handed out dynamically, largest first.
// An item serves all `group` query heads of its kv head for its tokens at once: its R = tokens *
// group rows (row r = token * group + head) make one small matrix, so every key and value it reads
// is used R times. Keys and values are taken about 64 positions (whole blocks) at a time and turned
// into float32 scratch (keys [D][KC], as in the cache, values [KC][D]). Scores are computed
// transposed, St[key][row] = K Q^T, so the online (flash-style) softmax runs down the columns with
// 16 rows to a vector: a running max and sum per row with no horizontal reductions, each row's
// output rescaled when its max grows. The output then takes O += P V. Both products are float32
// register-tiled matrix multiplies (6 x 64 accumulators with AVX-512). A chunk of keys past the
// tile's last position is never read; on the chunk that straddles the diagonal only the keys and
// rows that see something are computed.
//
// Every row's arithmetic depends only on its own sequence and position, never on which tile, call or
// thread computes it (a masked key adds an exact 0). A sequence with one new token (a decode row in
// a mixed step) goes through the decode kernel's own unit instead (decode_unit_*), so it gets the
// same bits it would in a decode-only step.

#define TILE_ROWS 96 /* rows (tokens * group) per work item */
#define KC_KEYS 64   /* keys per chunk, rounded down to whole blocks (at least one) */

static inline int64_t round16(int64_t x) { return (x + 15) & ~(int64_t)15; }

#if defined(__AVX512F__)
/* C[MR][16 * NV] (+)= A[MR][K] B[K][16 * NV] with A stored k-major (A[k * lda + m]): MR * NV
 * accumulators in registers; each k loads NV vectors of B and MR consecutive floats of A. MR, NV
 * are constants in every instance (see GEMM_CASE). */
static inline __attribute__((always_inline)) void ukernel(const int MR, const int NV, int64_t K, const float *A,
                                                          int64_t lda, const float *B, int64_t ldb, float *C,
                                                          int64_t ldc, int accumulate) {
    __m512 c[6][4];
#pragma GCC unroll 6
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) c[r][v] = accumulate ? _mm512_loadu_ps(C + r * ldc + 16 * v) : _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m512 b[4];
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) b[v] = _mm512_loadu_ps(B + k * ldb + 16 * v);
        const float *a = A + k * lda;
#pragma GCC unroll 6
        for (int r = 0; r < MR; r++) {
            const __m512 ar = _mm512_set1_ps(a[r]);
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) c[r][v] = _mm512_fmadd_ps(ar, b[v], c[r][v]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) _mm512_storeu_ps(C + r * ldc + 16 * v, c[r][v]);
}

#define GEMM_CASE(MR, NV) \
    case (MR) * 8 + (NV): ukernel(MR, NV, K, a, lda, b, ldb, c, ldc, accumulate); break;
#define GEMM_CASES(MR) GEMM_CASE(MR, 1) GEMM_CASE(MR, 2) GEMM_CASE(MR, 3) GEMM_CASE(MR, 4)

/* C[M][N] (+)= A[M][K] B[K][N], A stored k-major (A[k * lda + m]), N a multiple of 16 */
static void gemm(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B, int64_t ldb, float *C,
                 int64_t ldc, int accumulate) {
    const int64_t nvec = N / 16, panels = (nvec + 3) / 4;
    for (int64_t pi = 0, n0 = 0; pi < panels; pi++) {
        /* panels of equal width as far as they go: 96 columns are 48 + 48, not 64 + 32 */
        const int nv = (int)(nvec / panels + (pi < nvec % panels));
        for (int64_t m0 = 0; m0 < M; m0 += 6) {
            const int mr = (int)(M - m0 < 6 ? M - m0 : 6);
            const float *a = A + m0, *b = B + n0;
            float *c = C + m0 * ldc + n0;
            switch (mr * 8 + nv) {
                GEMM_CASES(1) GEMM_CASES(2) GEMM_CASES(3) GEMM_CASES(4) GEMM_CASES(5) GEMM_CASES(6)
            }
        }
        n0 += 16 * nv;
    }
}

#else
/* C[M][N] (+)= A[M][K] B[K][N], A stored k-major (A[k * lda + m]), N a multiple of 16 */
static void gemm(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B, int64_t ldb, float *C,
                 int64_t ldc, int accumulate) {
    for (int64_t m = 0; m < M; m++) {
        float *c = C + m * ldc;
        if (!accumulate) memset(c, 0, sizeof(float) * (size_t)N);
        for (int64_t k = 0; k < K; k++) {
            const float a = A[k * lda + m];
            const float *b = B + k * ldb;
#pragma omp simd
            for (int64_t n = 0; n < N; n++) c[n] += a * b[n];
        }
    }
}
#endif

/* dst[0..n) = src[0..n) as float32 */
static inline void cvt_float(float *dst, const float *src, int64_t n) { memcpy(dst, src, sizeof(float) * (size_t)n); }
static inline void cvt__Float16(float *dst, const _Float16 *src, int64_t n) {
    int64_t j = 0;
#if defined(__AVX512F__)
    for (; j + 16 <= n; j += 16) _mm512_storeu_ps(dst + j, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + j))));
#if defined(__F16C__)
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + j))));
#endif
#endif
    for (; j < n; j++) dst[j] = (float)src[j];
}

/* The online softmax's step over one chunk of nc keys (the first at position c0), for rows r0 ..
 * r1 - 1 (r0 a multiple of 16): St[j * ld + r] is key j's score for row r, and row r sees key j
 * iff c0 + j <= pos[r]. Scores become probabilities exp(s - max), 0 where unseen; m, l are each
 * row's running max and sum, and alpha gets the factor its output so far must be scaled by. */
static void softmax_step(float *St, int64_t ld, int64_t nc, int64_t c0, const int32_t *pos, int64_t r0, int64_t r1,
                         float *m, float *l, float *alpha) {
#if defined(__AVX512F__)
    for (int64_t r = r0; r < r1; r += 16) {
        const __m512i lim = _mm512_sub_epi32(_mm512_loadu_si512(pos + r), _mm512_set1_epi32((int32_t)c0));
        const __m512 m_old = _mm512_loadu_ps(m + r);
        __m512 mx = m_old;
        /* rows go by position, so lane 0 sees the fewest keys: if it sees them all, no masks */
        const int all = pos[r] - c0 >= nc - 1;
        if (all) {
            for (int64_t j = 0; j < nc; j++) mx = _mm512_max_ps(mx, _mm512_loadu_ps(St + j * ld + r));
        } else {
            for (int64_t j = 0; j < nc; j++) {
                const __mmask16 k = _mm512_cmpge_epi32_mask(lim, _mm512_set1_epi32((int32_t)j));
                mx = _mm512_mask_max_ps(mx, k, mx, _mm512_loadu_ps(St + j * ld + r));
            }
        }
        /* a row's first chunk: nothing to rescale (and exp(-inf) is not computed exactly) */
        const __mmask16 seen = _mm512_cmp_ps_mask(m_old, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        const __m512 a = _mm512_maskz_mov_ps(seen, exp16(_mm512_sub_ps(m_old, mx)));
        __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(l + r), a);
        for (int64_t j = 0; j < nc; j++) {
            float *s = St + j * ld + r;
            __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(s), mx));
            if (!all) p = _mm512_maskz_mov_ps(_mm512_cmpge_epi32_mask(lim, _mm512_set1_epi32((int32_t)j)), p);
            _mm512_storeu_ps(s, p);
            sum = _mm512_add_ps(sum, p);
        }
        _mm512_storeu_ps(m + r, mx);
        _mm512_storeu_ps(l + r, sum);
        _mm512_storeu_ps(alpha + r, a);
    }
#else
    float *mx = alpha; /* the new max first, then the factor */
    for (int64_t r = r0; r < r1; r++) mx[r] = m[r];
    for (int64_t j = 0; j < nc; j++) {
        const float *s = St + j * ld;
#pragma omp simd
        for (int64_t r = r0; r < r1; r++)
            if (c0 + j <= pos[r] && s[r] > mx[r]) mx[r] = s[r];
    }
    for (int64_t r = r0; r < r1; r++) {
        const float a = m[r] == -INFINITY ? 0.0f : exp_nonpos(m[r] - mx[r]);
        m[r] = mx[r];
        l[r] *= a;
        alpha[r] = a;
    }
    for (int64_t j = 0; j < nc; j++) {
        float *s = St + j * ld;
#pragma omp simd
        for (int64_t r = r0; r < r1; r++) {
            s[r] = c0 + j <= pos[r] ? exp_nonpos(s[r] - m[r]) : 0.0f;
            l[r] += s[r];
        }
    }
#endif
}

typedef struct {
    int64_t cost;     /* about the multiply-adds it does: rows * keys it reads */
    int32_t seq, kh;  /* sequence, kv head */
    int64_t t0;       /* first token of the tile, within the sequence's chunk */
    int32_t nt;       /* tokens in the tile (0: a decode row, served by decode_unit) */
} work_item;

static int by_cost_desc(const void *x, const void *y) {
    const work_item *a = x, *b = y;
    if (a->cost != b->cost) return a->cost < b->cost ? 1 : -1;
    if (a->seq != b->seq) return a->seq < b->seq ? -1 : 1;
    if (a->t0 != b->t0) return a->t0 < b->t0 ? -1 : 1;
    return a->kh < b->kh ? -1 : a->kh > b->kh;
}

/* One tile: rows r = t * G + g for the nt tokens whose q rows start at q (row stride ldq) and whose
 * token t sits at position pos0 + t; out likewise (row stride H * D). Scratch, per thread: Qt [D][Rp],
 * O [Rp][Dp], St [ldk][Rp], Ks [D][ldk], Vs [ldk][Dp], m, l, alpha [Rp], pos [Rp] (Rp = round16(R)). */
#define DEFINE_TILE(T)                                                                                      \
    static void prefill_tile_##T(const float *q, int64_t ldq, float *out, int H, int G, int kh, int D, int BS, \
                                 float scale, const T *kbase, const T *vbase, const int64_t *table, int64_t pos0, \
                                 int nt, float *Qt, float *O, float *St, float *Ks, float *Vs, float *m, float *l,  \
                                 float *alpha, int32_t *pos) {                                              \
        const int64_t R = (int64_t)nt * G, Rp = round16(R), Dp = round16(D);                                 \
        const int64_t kc = KC_KEYS < BS ? BS : KC_KEYS / BS * BS, ldk = round16(kc);                         \
        const int64_t last = pos0 + nt - 1; /* the tile's last position: no key past it is read */         \
        for (int t = 0; t < nt; t++)                                                                        \
            for (int g = 0; g < G; g++) {                                                                   \
                const int64_t r = (int64_t)t * G + g;                                                       \
                const float *src = q + t * ldq + ((int64_t)kh * G + g) * D;                                  \
                for (int d = 0; d < D; d++) Qt[d * Rp + r] = src[d] * scale;                                \
                pos[r] = (int32_t)(pos0 + t);                                                               \
            }                                                                                               \
        for (int64_t r = R; r < Rp; r++) { /* padding rows: zero queries, seeing what the last row sees */  \
            for (int d = 0; d < D; d++) Qt[d * Rp + r] = 0.0f;                                              \
            pos[r] = (int32_t)last;                                                                         \
        }                                                                                                   \
        for (int64_t r = 0; r < Rp; r++) {                                                                  \
            m[r] = -INFINITY;                                                                               \
            l[r] = 0.0f;                                                                                    \
        }                                                                                                   \
        memset(O, 0, sizeof(float) * (size_t)(R * Dp));                                                    \
        for (int64_t c0 = 0; c0 <= last; c0 += kc) {                                                        \
            /* keys c0 .. c0 + nc - 1 are seen by some row; rows before r0 see none of them */              \
            const int64_t nc = last - c0 + 1 < kc ? last - c0 + 1 : kc;                                     \
            const int64_t r0 = (c0 > pos0 ? c0 - pos0 : 0) * G, r0a = r0 & ~(int64_t)15;                     \
            for (int64_t j0 = 0; j0 < nc; j0 += BS) {                                                       \
                const int64_t blk = table[(c0 + j0) / BS], ns = nc - j0 < BS ? nc - j0 : BS;                 \
                const T *kb = kbase + blk * BS * D, *vb = vbase + blk * BS * D;                             \
                for (int d = 0; d < D; d++) cvt_##T(Ks + d * ldk + j0, kb + (int64_t)d * BS, ns);           \
                for (int64_t j = 0; j < ns; j++) cvt_##T(Vs + (j0 + j) * Dp, vb + j * D, D);                \
            }                                                                                               \
            gemm(nc, Rp - r0a, D, Ks, ldk, Qt + r0a, Rp, St + r0a, Rp, 0);                                  \
            softmax_step(St, Rp, nc, c0, pos, r0a, Rp, m, l, alpha);                                        \
            for (int64_t r = r0; r < R; r++) {                                                              \
                const float a = alpha[r];                                                                   \
                if (a != 1.0f) {                                                                            \
                    float *o = O + r * Dp;                                                                  \
                    _Pragma("omp simd") for (int64_t d = 0; d < Dp; d++) o[d] *= a;                         \
                }                                                                                           \
            }                                                                                               \
            gemm(R - r0, Dp, nc, St + r0, Rp, Vs, Dp, O + r0 * Dp, Dp, 1);                                  \
        }                                                                                                   \
        for (int t = 0; t < nt; t++)                                                                        \
            for (int g = 0; g < G; g++) {                                                                   \
                const int64_t r = (int64_t)t * G + g;                                                       \
                const float inv = 1.0f / l[r], *src = O + r * Dp;                                           \
                float *dst = out + (int64_t)t * H * D + ((int64_t)kh * G + g) * D;                          \
                _Pragma("omp simd") for (int d = 0; d < D; d++) dst[d] = src[d] * inv;                      \
            }                                                                                               \
    }
DEFINE_TILE(float)
DEFINE_TILE(_Float16)

#define DEFINE_PREFILL(NAME, T)                                                                             \
    int NAME(const float *q, int64_t ldq, const T *k_cache, const T *v_cache, const int64_t *block_tables,  \
             int64_t bt_stride, const int64_t *query_start_loc, const int64_t *seq_lens, int num_seqs,       \
             float *out, int H, int KVH, int D, int64_t NB, int BS, float scale, int nthreads) {             \
        if (BS < 1 || BS > 64) return -2;                                                                   \
        if (KVH < 1 || H % KVH || H / KVH > MAX_GROUP || D < 1 || D > 1024) return -3;                      \
        const int G = H / KVH;                                                                              \
        const int tile = TILE_ROWS / G > 0 ? TILE_ROWS / G : 1; /* tokens per work item */                  \
        int64_t nitems = 0, max_dec = 0;                                                                    \
        for (int i = 0; i < num_seqs; i++) {                                                                \
            const int64_t n = query_start_loc[i + 1] - query_start_loc[i];                                  \
            if (n < 0 || n > seq_lens[i] || seq_lens[i] > INT32_MAX) return -4;                             \
            if (n == 1 && seq_lens[i] > max_dec) max_dec = seq_lens[i];                                     \
            nitems += (n == 1 ? 1 : (n + tile - 1) / tile) * KVH;                                           \
        }                                                                                                   \
        if (nitems == 0) return 0;                                                                          \
        work_item *items = malloc(sizeof(work_item) * (size_t)nitems);                                     \
        if (!items) return -1;                                                                              \
        int64_t w = 0;                                                                                      \
        for (int i = 0; i < num_seqs; i++) {                                                                \
            const int64_t n = query_start_loc[i + 1] - query_start_loc[i], ctx = seq_lens[i];               \
            if (n == 1) {                                                                                   \
                for (int kh = 0; kh < KVH; kh++) items[w++] = (work_item){(int64_t)G * ctx, i, kh, 0, 0};   \
                continue;                                                                                   \
            }                                                                                               \
            for (int64_t t0 = 0; t0 < n; t0 += tile) {                                                      \
                const int nt = (int)(n - t0 < tile ? n - t0 : tile);                                        \
                const int64_t cost = (int64_t)nt * G * (ctx - n + t0 + nt);                                 \
                for (int kh = 0; kh < KVH; kh++) items[w++] = (work_item){cost, i, kh, t0, nt};             \
            }                                                                                               \
        }                                                                                                   \
        qsort(items, (size_t)nitems, sizeof(work_item), by_cost_desc);                                     \
        const int64_t Dp = round16(D), kc = KC_KEYS < BS ? BS : KC_KEYS / BS * BS, ldk = round16(kc);       \
        const int64_t Rp = round16((int64_t)tile * G);                                                      \
        /* per thread: the tile's scratch (see prefill_tile), then a value row and the decode scores */    \
        const size_t scratch = (size_t)(D * Rp + Rp * Dp + ldk * Rp + D * ldk + ldk * Dp + 4 * Rp + Dp + G * max_dec); \
        int failed = 0;                                                                                     \
        const int threads = nthreads < 1 ? 1 : (int64_t)nthreads > nitems ? (int)nitems : nthreads;       \
        _Pragma("omp parallel num_threads(threads)") {                                                      \
            float *buf = calloc(scratch, sizeof(float));                                                    \
            if (!buf) {                                                                                     \
                _Pragma("omp atomic write") failed = 1;                                                     \
            }                                                                                               \
            float *Qt = buf, *O = Qt + D * Rp, *St = O + Rp * Dp, *Ks = St + ldk * Rp, *Vs = Ks + D * ldk;    \
            float *m = Vs + ldk * Dp, *l = m + Rp, *alpha = l + Rp, *vrow = alpha + Rp + Rp, *dec = vrow + Dp; \
            int32_t *pos = (int32_t *)(alpha + Rp);                                                         \
            _Pragma("omp for schedule(dynamic, 1)") for (int64_t it = 0; it < nitems; it++) {               \
                if (!buf) continue;                                                                         \
                const work_item wi = items[it];                                                             \
                const int64_t n = query_start_loc[wi.seq + 1] - query_start_loc[wi.seq];                    \
                const int64_t ctx = seq_lens[wi.seq], row = query_start_loc[wi.seq] + wi.t0;                \
                const int64_t *table = block_tables + (int64_t)wi.seq * bt_stride;                          \
                const T *kbase = k_cache + (int64_t)wi.kh * NB * BS * D;                                    \
                const T *vbase = v_cache + (int64_t)wi.kh * NB * BS * D;                                    \
                if (wi.nt == 0)                                                                             \
                    decode_unit_##T(q + row * ldq + (int64_t)wi.kh * G * D, out + (row * H + (int64_t)wi.kh * G) * D, \
                                    G, kbase, vbase, table, ctx, D, BS, scale, dec, vrow);                  \
                else                                                                                        \
                    prefill_tile_##T(q + row * ldq, ldq, out + row * H * D, H, G, wi.kh, D, BS, scale, kbase,   \
                                     vbase, table, ctx - n + wi.t0, wi.nt, Qt, O, St, Ks, Vs, m, l, alpha, pos); \
            }                                                                                               \
            free(buf);                                                                                      \
        }                                                                                                   \
        free(items);                                                                                        \
        return failed ? -1 : 0;                                                                             \
    }

// q: [T, H, D] with row stride ldq (a token's heads back to back), T = query_start_loc[num_seqs];
// out: [T, H, D] contiguous. Sequence i's new tokens are q rows query_start_loc[i] .. [i + 1] - 1;
// seq_lens[i] counts its positions after this step, the new ones last, all already in the cache
// (ember_write_kv), and its block table is block_tables[i * bt_stride ...]. Token j of a chunk of
// n sits at position seq_lens[i] - n + j and sees positions 0 .. seq_lens[i] - n + j.
// Returns 0; -1 out of memory; -2 block size not in 1..64; -3 heads not a multiple of kv heads,
// more than 16 query heads per kv head, or head_dim not in 1..1024; -4 a query length below 0 or
// above its sequence's length, or a sequence of 2^31 positions or more. -2 to -4 are found before
// anything is written to out.
DEFINE_PREFILL(ember_paged_prefill, float)
DEFINE_PREFILL(ember_paged_prefill_f16, _Float16)
