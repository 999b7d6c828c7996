// Paged decode attention on the CPU: each query row reads its sequence's keys and values in place
// in the block pool, once, instead of gathering them into a padded copy first.
//
// Cache layout (see attention.py), float32: keys k[kv_head][block][head_dim][slot] (each block
// transposed, so the scores of a block's slots are plain vector FMAs with no horizontal sums),
// values v[kv_head][block][slot][head_dim]. Work is split over (sequence, kv head) pairs; each pair
// serves its `group` query heads, so a key block is loaded once for every query head sharing it.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

// s[j] = scale * sum_d q[d] * kblock[d][j] for the block's `bs` slots
static inline void block_scores(const float *q, const float *kblock, float *s, int D, int bs, float scale) {
    float acc[64] = {0};  // bs <= 64, checked by the caller
    for (int d = 0; d < D; d++) {
        const float qd = q[d];
        const float *kd = kblock + (int64_t)d * bs;
#pragma omp simd
        for (int j = 0; j < bs; j++) acc[j] += qd * kd[j];
    }
    for (int j = 0; j < bs; j++) s[j] = acc[j] * scale;
}

#include "fast_exp.h"

static inline void axpy(float *y, float a, const float *x, int d) {
#pragma omp simd
    for (int i = 0; i < d; i++) y[i] += a * x[i];
}

// q: [B, H, D] with row stride ldq; out: [B, H, D]; block_tables: [B, bt_stride]; seq_lens: [B].
// When k_new is not NULL, each row's new key and value (k_new, v_new: [B, KVH, D], row stride ldkv)
// are first written at slots[b], the pair's own head: no other pair reads that slot this step.
int ember_paged_decode(const float *q, int64_t ldq, float *k_cache, float *v_cache,
                       const int64_t *block_tables, int64_t bt_stride, const int64_t *seq_lens,
                       float *out, int B, int H, int KVH, int D, int64_t NB, int BS, float scale,
                       int nthreads, const float *k_new, const float *v_new, int64_t ldkv, const int64_t *slots) {
    const int group = H / KVH;
    if (BS > 64) return -2;
    int64_t max_len = 0;
    for (int b = 0; b < B; b++) max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *scores = malloc(sizeof(float) * (size_t)group * (size_t)(max_len > 0 ? max_len : 1));
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t pair = 0; pair < (int64_t)B * KVH; pair++) {
            if (!scores) continue;
            const int b = (int)(pair / KVH), kh = (int)(pair % KVH);
            const int64_t len = seq_lens[b];
            const int64_t *table = block_tables + (int64_t)b * bt_stride;
            const float *kbase = (const float *)k_cache + (int64_t)kh * NB * BS * D;
            const float *vbase = (const float *)v_cache + (int64_t)kh * NB * BS * D;
            if (k_new) {
                const int64_t blk = slots[b] / BS, slot = slots[b] % BS;
                const float *kn = k_new + (int64_t)b * ldkv + (int64_t)kh * D, *vn = v_new + (int64_t)b * ldkv + (int64_t)kh * D;
                float *kb = k_cache + ((int64_t)kh * NB + blk) * BS * D, *vb = v_cache + ((int64_t)kh * NB + blk) * BS * D;
                for (int d = 0; d < D; d++) kb[(int64_t)d * BS + slot] = kn[d];
                memcpy(vb + slot * D, vn, sizeof(float) * D);
            }
            const float *qh = q + (int64_t)b * ldq + (int64_t)kh * group * D;
            float *oh = out + ((int64_t)b * H + (int64_t)kh * group) * D;
            // scores = q . k for every cached position, block by block; a partial last block
            // is computed whole into a scratch row and cut to length
            for (int64_t p0 = 0; p0 < len; p0 += BS) {
                const float *kblock = kbase + table[p0 / BS] * BS * D;
                const int64_t n = len - p0 < BS ? len - p0 : BS;
                for (int g = 0; g < group; g++) {
                    float row[64];
                    if (BS == 16)  // the default: let the compiler see a constant
                        block_scores(qh + g * D, kblock, row, D, 16, scale);
                    else
                        block_scores(qh + g * D, kblock, row, D, BS, scale);
                    memcpy(scores + g * len + p0, row, sizeof(float) * n);
                }
            }
            for (int g = 0; g < group; g++) {
                float *s = scores + g * len;
                float m = -INFINITY;
                for (int64_t p = 0; p < len; p++) m = s[p] > m ? s[p] : m;
                float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                for (int64_t p = 0; p < len; p++) {
                    s[p] = exp_nonpos(s[p] - m);
                    sum += s[p];
                }
                const float inv = 1.0f / sum;
#pragma omp simd
                for (int64_t p = 0; p < len; p++) s[p] *= inv;
                memset(oh + g * D, 0, sizeof(float) * D);
            }
            for (int64_t p0 = 0; p0 < len; p0 += BS) {
                const float *vblock = vbase + table[p0 / BS] * BS * D;
                const int64_t n = len - p0 < BS ? len - p0 : BS;
                for (int64_t j = 0; j < n; j++)
                    for (int g = 0; g < group; g++) axpy(oh + g * D, scores[g * len + p0 + j], vblock + j * D, D);
            }
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
