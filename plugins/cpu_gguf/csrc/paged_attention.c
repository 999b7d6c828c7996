// Paged decode attention on the CPU: each query row reads its sequence's keys and values in place
// in the block pool, once, instead of gathering them into a padded copy first.
//
// Cache layout (see attention.py): keys k[kv_head][block][head_dim][slot] (each block transposed,
// so the scores of a block's slots are plain vector FMAs with no horizontal sums), values
// v[kv_head][block][slot][head_dim], in float32 (exact mode) or float16 (half the bytes to stream
// per step; values are converted to float32 as they are read, and all arithmetic is float32).
// Work is split over (sequence, kv head) pairs; each pair serves its `group` query heads together,
// so a key row is loaded once for every query head sharing it.
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

// One body, two cache element types.
#define DEFINE_DECODE(NAME, T)                                                                              \
    /* s[g][j] = scale * sum_d q[g][d] * kblock[d][j], for the block's bs slots and each query head g */  \
    static inline void NAME##_scores(const float *q, const T *kblock, float *s, int64_t s_stride, int G,    \
                                     int D, int bs, float scale) {                                          \
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
                const int64_t len = seq_lens[b];                                                            \
                const int64_t *table = block_tables + (int64_t)b * bt_stride;                               \
                const T *kbase = k_cache + (int64_t)kh * NB * BS * D;                                       \
                const T *vbase = v_cache + (int64_t)kh * NB * BS * D;                                       \
                const int group = per; /* the query heads this unit serves */                               \
                const float *qh = q + (int64_t)b * ldq + ((int64_t)kh * split + sub) * per * D;             \
                float *oh = out + ((int64_t)b * H + ((int64_t)kh * split + sub) * per) * D;                 \
                /* scores for every cached position, block by block; a partial last block is computed */   \
                /* whole into a scratch row and cut to length */                                            \
                float row[MAX_GROUP * 64];                                                                  \
                for (int64_t p0 = 0; p0 < len; p0 += BS) {                                                  \
                    const T *kblock = kbase + table[p0 / BS] * BS * D;                                      \
                    const int64_t n = len - p0 < BS ? len - p0 : BS;                                        \
                    if (!(BS == 16 && SCORES16_DISPATCH(T, group, qh, kblock, row, D, scale)))           \
                        NAME##_scores(qh, kblock, row, 64, group, D, BS, scale);                            \
                    for (int g = 0; g < group; g++) memcpy(scores + g * len + p0, row + g * 64, sizeof(float) * n); \
                }                                                                                           \
                for (int g = 0; g < group; g++) {                                                           \
                    float *s = scores + g * len;                                                            \
                    float m = -INFINITY;                                                                    \
                    for (int64_t p = 0; p < len; p++) m = s[p] > m ? s[p] : m;                              \
                    float sum = 0.0f;                                                                       \
                    _Pragma("omp simd reduction(+ : sum)") for (int64_t p = 0; p < len; p++) {              \
                        s[p] = exp_nonpos(s[p] - m);                                                        \
                        sum += s[p];                                                                        \
                    }                                                                                       \
                    const float inv = 1.0f / sum;                                                           \
                    _Pragma("omp simd") for (int64_t p = 0; p < len; p++) s[p] *= inv;                      \
                    memset(oh + g * D, 0, sizeof(float) * D);                                               \
                }                                                                                           \
                if (!PV_DISPATCH(T, scores, len, vbase, table, BS, D, group, oh)) {                         \
                    for (int64_t p0 = 0; p0 < len; p0 += BS) {                                              \
                        const T *vblock = vbase + table[p0 / BS] * BS * D;                                  \
                        const int64_t n = len - p0 < BS ? len - p0 : BS;                                    \
                        for (int64_t j = 0; j < n; j++) {                                                   \
                            TO_FLOAT(T, vrow, vblock + j * D, D);                                           \
                            for (int g = 0; g < group; g++) axpy(oh + g * D, scores[g * len + p0 + j], vrow, D); \
                        }                                                                                   \
                    }                                                                                       \
                }                                                                                           \
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
