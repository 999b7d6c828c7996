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
//
// One source for every instruction set: the kernels are written over fast_exp.h's 16-lane v16
// operations (AVX-512, AVX2 as two 256-bit halves, or portable C), so each output element is the
// same chain of float operations on every path and the results are bitwise the same. The orders
// that make that so are stated where they are chosen:
//   - a dot product or a weighted sum is one FMA chain per output element, over its terms in order
//     (d for a score, the key position for an output), starting from 0 (or from the output so far);
//     register tiling only decides which independent chains run side by side, so the tile shapes
//     below may differ per path;
//   - a sum across positions (the decode softmax's denominator) goes into lane p % 16, in order of
//     p, then through v16_hsum's fixed tree;
//   - maxima are exact in any order; exp is exp16.
// Every row's arithmetic thus depends only on its own sequence and position, not on the batch, the
// threads or the path.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fast_exp.h"

#define MAX_GROUP 16

/* Register tiling per path (what runs side by side; never the order within a chain):
 * HEADS_PER_PASS query heads share one load of a key row in the decode scores, and the prefill's
 * matrix products keep GEMM_MR rows x GEMM_NV vectors of accumulators. AVX-512 has 32 registers of
 * 16 lanes; AVX2 has 16 of 8 lanes, so a v16 takes two and the tiles are smaller. */
#if defined(V16_AVX512)
#define HEADS_PER_PASS 8
#define GEMM_MR 6
#define GEMM_NV 4
#elif defined(V16_AVX2)
#define HEADS_PER_PASS 6 /* 12 registers of accumulators, two for the key row, one for q */
#define GEMM_MR 6        /* 6 x 16 columns: 12 accumulators, two for B, one for A */
#define GEMM_NV 1
#else
#define HEADS_PER_PASS 4
#define GEMM_MR 4
#define GEMM_NV 1
#endif

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// A cache holds float32 (half = 0) or float16 (half = 1) elements. `half` is a constant in every
// instance of the hot kernels below (decode_unit, prefill_tile): each is always inlined into a
// float32 and a float16 copy.
V16_INLINE const void *kv_at(const void *base, int64_t i, const int half) {
    return (const char *)base + i * (half ? 2 : 4);
}
/* n (1..16) elements at p, as float32 (a conversion from float16 is exact) */
V16_INLINE v16 kv_load(const void *p, int n, const int half) {
    return half ? v16_load_h_upto((const _Float16 *)p, n) : v16_load_upto((const float *)p, n);
}
/* dst[0..n) = src[0..n) as float32 */
V16_INLINE void kv_to_float(float *dst, const void *src, int64_t n, const int half) {
    if (!half) {
        memcpy(dst, src, sizeof(float) * (size_t)n);
        return;
    }
    const _Float16 *h = src;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) v16_store(dst + j, v16_load_h(h + j));
    for (; j < n; j++) dst[j] = (float)h[j];
}

// One token's key and value for one kv head, into its slot (keys transposed within the block). A
// float16 cache rounds each to nearest even: one correctly rounded IEEE conversion (F16C's, or the
// compiler's in portable C), the same bits on every path.
V16_INLINE void write_slot(const float *kn, const float *vn, void *k_cache, void *v_cache, int64_t kh,
                           int64_t slot_id, int D, int64_t NB, int BS, const int half) {
    const int64_t blk = slot_id / BS, slot = slot_id % BS, at = (kh * NB + blk) * BS * D;
    if (half) {
        _Float16 *kb = (_Float16 *)k_cache + at, *vb = (_Float16 *)v_cache + at;
        for (int d = 0; d < D; d++) kb[(int64_t)d * BS + slot] = (_Float16)kn[d];
        for (int d = 0; d < D; d++) vb[slot * D + d] = (_Float16)vn[d];
    } else {
        float *kb = (float *)k_cache + at, *vb = (float *)v_cache + at;
        for (int d = 0; d < D; d++) kb[(int64_t)d * BS + slot] = kn[d];
        memcpy(vb + slot * D, vn, sizeof(float) * (size_t)D);
    }
}

// ---------------------------------------------------------------------------------------------------
// Decode.

/* s[g * 64 + j] = scale * (sum over d in order of q[g][d] * k[d][j]) for n (1..16) consecutive slots
 * j of a key block (kr: its first slot's row-0 element; rows bs apart) and G query heads (a
 * constant, at most HEADS_PER_PASS): each key row load feeds G independent FMA chains. */
V16_INLINE void block_scores(const int G, const int n, const float *q, int D, const void *kr, int bs, float scale,
                             float *s, const int half) {
    v16 acc[8];
#pragma GCC unroll 8
    for (int g = 0; g < G; g++) acc[g] = v16_zero();
    for (int d = 0; d < D; d++) {
        const v16 kd = kv_load(kv_at(kr, (int64_t)d * bs, half), n, half);
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) acc[g] = v16_fma(v16_set1(q[g * D + d]), kd, acc[g]);
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; g++) v16_store(s + g * 64, v16_mul(acc[g], v16_set1(scale)));
}

#define BLOCK_SCORES_CASE(G_)                                                       \
    case G_:                                                                        \
        if (G_ <= HEADS_PER_PASS) block_scores(G_, n, q, D, kr, bs, scale, s, half); \
        break;
V16_INLINE void block_scores_any(int G, const int n, const float *q, int D, const void *kr, int bs, float scale,
                                 float *s, const int half) {
    switch (G) {
        BLOCK_SCORES_CASE(1) BLOCK_SCORES_CASE(2) BLOCK_SCORES_CASE(3) BLOCK_SCORES_CASE(4)
        BLOCK_SCORES_CASE(5) BLOCK_SCORES_CASE(6) BLOCK_SCORES_CASE(7) BLOCK_SCORES_CASE(8)
    }
}

/* s[0..len) = softmax(s): max, then exp16(s - max) with the sum in lane p % 16 (in order of p) and
 * v16_hsum's tree, then each times 1 / sum */
V16_INLINE void softmax_row(float *s, int64_t len) {
    const int64_t full = len & ~(int64_t)15;
    const int tail = (int)(len - full);
    v16 mx = v16_set1(-INFINITY);
    for (int64_t p = 0; p < full; p += 16) mx = v16_max(mx, v16_load(s + p));
    if (tail) mx = v16_max(mx, v16_select(m16_first(tail), v16_loadn(s + full, tail), v16_set1(-INFINITY)));
    const v16 m = v16_set1(v16_hmax(mx));
    v16 sum = v16_zero();
    for (int64_t p = 0; p < full; p += 16) {
        const v16 e = exp16(v16_sub(v16_load(s + p), m));
        v16_store(s + p, e);
        sum = v16_add(sum, e);
    }
    if (tail) {
        const v16 e = v16_keep(m16_first(tail), exp16(v16_sub(v16_loadn(s + full, tail), m)));
        v16_storen(s + full, e, tail);
        sum = v16_add(sum, e);
    }
    const v16 inv = v16_set1(1.0f / v16_hsum(sum));
    for (int64_t p = 0; p < full; p += 16) v16_store(s + p, v16_mul(v16_load(s + p), inv));
    if (tail) v16_storen(s + full, v16_mul(v16_loadn(s + full, tail), inv), tail);
}

/* o[c .. c + 16 (NV - 1) + nl) = sum over positions p in order of w[p] * v[p][same dims]: NV (a
 * constant, 1..4) vectors of accumulators, the last with nl lanes, kept in registers across all of
 * a sequence's blocks (the values re-read from cache per query head) */
V16_INLINE void pv_chunk(const int NV, const int nl, const float *w, int64_t len, const void *vbase,
                         const int64_t *table, int BS, int D, int c, float *o, const int half) {
    v16 a[4];
#pragma GCC unroll 4
    for (int v = 0; v < NV; v++) a[v] = v16_zero();
    for (int64_t p0 = 0; p0 < len; p0 += BS) {
        const void *vb = kv_at(vbase, table[p0 / BS] * BS * D + c, half);
        const int64_t n = min64(len - p0, BS);
        for (int64_t j = 0; j < n; j++) {
            const v16 wj = v16_set1(w[p0 + j]);
            const void *r = kv_at(vb, j * D, half);
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) a[v] = v16_fma(wj, kv_load(kv_at(r, 16 * v, half), v == NV - 1 ? nl : 16, half), a[v]);
        }
    }
#pragma GCC unroll 4
    for (int v = 0; v < NV; v++) v16_store_upto(o + c + 16 * v, a[v], v == NV - 1 ? nl : 16);
}

#define PV_CASES(NL)                                                                           \
    switch (nv) {                                                                              \
    case 1: pv_chunk(1, NL, w, len, vbase, table, BS, D, c, o, half); break;                   \
    case 2: pv_chunk(2, NL, w, len, vbase, table, BS, D, c, o, half); break;                   \
    case 3: pv_chunk(3, NL, w, len, vbase, table, BS, D, c, o, half); break;                   \
    case 4: pv_chunk(4, NL, w, len, vbase, table, BS, D, c, o, half); break;                   \
    }
/* o[0..D) = sum_p w[p] v[p][:], 64 dims at a time */
V16_INLINE void pv(const float *w, int64_t len, const void *vbase, const int64_t *table, int BS, int D, float *o,
                   const int half) {
    for (int c = 0; c < D; c += 64) {
        const int nd = D - c < 64 ? D - c : 64, nv = (nd + 15) / 16, nl = nd - 16 * (nv - 1);
        if (nl == 16) PV_CASES(16) else PV_CASES(nl)
    }
}

// One decode unit: G query heads (qh, G rows of D) of one sequence against its `len` cached
// positions of one kv head, into oh. Two passes: every score, then one softmax per head, then the
// values. scores: G * len floats of scratch. Shared by the decode and prefill kernels, so a decode
// row gets the same bits whichever of them serves its step.
V16_INLINE void decode_unit(const float *qh, float *oh, int G, const void *kbase, const void *vbase,
                            const int64_t *table, int64_t len, int D, int BS, float scale, float *scores,
                            const int half) {
    /* scores for every cached position, block by block; a partial last block is computed whole into
     * a scratch row (64 slots per head) and cut to length */
    float row[MAX_GROUP * 64];
    for (int64_t p0 = 0; p0 < len; p0 += BS) {
        const void *kblock = kv_at(kbase, table[p0 / BS] * BS * D, half);
        for (int g0 = 0; g0 < G; g0 += HEADS_PER_PASS) {
            const int gn = G - g0 < HEADS_PER_PASS ? G - g0 : HEADS_PER_PASS;
            for (int c = 0; c < BS; c += 16) {
                const void *kr = kv_at(kblock, c, half);
                float *s = row + g0 * 64 + c;
                if (BS - c >= 16) block_scores_any(gn, 16, qh + g0 * D, D, kr, BS, scale, s, half);
                else block_scores_any(gn, BS - c, qh + g0 * D, D, kr, BS, scale, s, half);
            }
        }
        const int64_t n = min64(len - p0, BS);
        for (int g = 0; g < G; g++) memcpy(scores + g * len + p0, row + g * 64, sizeof(float) * (size_t)n);
    }
    for (int g = 0; g < G; g++) {
        softmax_row(scores + g * len, len);
        pv(scores + g * len, len, vbase, table, BS, D, oh + g * D, half);
    }
}

static void decode_unit_f32(const float *qh, float *oh, int G, const void *kbase, const void *vbase,
                            const int64_t *table, int64_t len, int D, int BS, float scale, float *scores) {
    decode_unit(qh, oh, G, kbase, vbase, table, len, D, BS, scale, scores, 0);
}
static void decode_unit_f16(const float *qh, float *oh, int G, const void *kbase, const void *vbase,
                            const int64_t *table, int64_t len, int D, int BS, float scale, float *scores) {
    decode_unit(qh, oh, G, kbase, vbase, table, len, D, BS, scale, scores, 1);
}
#define DECODE_UNIT(half) ((half) ? decode_unit_f16 : decode_unit_f32)

static int paged_decode(const float *q, int64_t ldq, void *k_cache, void *v_cache, const int64_t *block_tables,
                        int64_t bt_stride, const int64_t *seq_lens, float *out, int B, int H, int KVH, int D,
                        int64_t NB, int BS, float scale, int nthreads, const float *k_new, const float *v_new,
                        int64_t ldkv, const int64_t *slots, const int half) {
    const int group = H / KVH;
    if (BS > 64) return -2;
    if (group > MAX_GROUP || D > 1024) return -3;
    int64_t max_len = 0;
    for (int b = 0; b < B; b++) max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
    int failed = 0;
    /* few (sequence, kv head) pairs for the threads (one stream: 3 pairs on 2 threads): split each
     * pair's query heads into `split` units; they share the pair's keys and values through cache */
    int split = 1;
    while ((int64_t)B * KVH * split < 2 * nthreads && split < group) {
        int next = split + 1;
        while (group % next) next++;
        split = next;
    }
    const int per = group / split;
    const int elem = half ? 2 : 4;
#pragma omp parallel num_threads(nthreads)
    {
        /* new keys and values first, so every unit of a pair sees them */
        if (k_new) {
#pragma omp for schedule(static)
            for (int64_t pair = 0; pair < (int64_t)B * KVH; pair++) {
                const int b = (int)(pair / KVH), kh = (int)(pair % KVH);
                write_slot(k_new + (int64_t)b * ldkv + (int64_t)kh * D, v_new + (int64_t)b * ldkv + (int64_t)kh * D,
                           k_cache, v_cache, kh, slots[b], D, NB, BS, half);
            }
        }
        float *scores = malloc(sizeof(float) * (size_t)per * (size_t)(max_len > 0 ? max_len : 1));
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t unit = 0; unit < (int64_t)B * KVH * split; unit++) {
            if (!scores) continue;
            const int64_t pair = unit / split;
            const int b = (int)(pair / KVH), kh = (int)(pair % KVH), sub = (int)(unit % split);
            DECODE_UNIT(half)(q + (int64_t)b * ldq + ((int64_t)kh * split + sub) * per * D,
                              out + ((int64_t)b * H + ((int64_t)kh * split + sub) * per) * D, per,
                              (const char *)k_cache + (int64_t)kh * NB * BS * D * elem,
                              (const char *)v_cache + (int64_t)kh * NB * BS * D * elem,
                              block_tables + (int64_t)b * bt_stride, seq_lens[b], D, BS, scale, scores);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

// q: [B, H, D] with row stride ldq; out: [B, H, D]; block_tables: [B, bt_stride]; seq_lens: [B].
// When k_new is not NULL, each row's new key and value (k_new, v_new: [B, KVH, D], row stride ldkv)
// are first written at slots[b]. Returns 0; -1 out of memory; -2 block size > 64; -3 more than 16
// query heads per kv head, or head_dim > 1024.
int ember_paged_decode(const float *q, int64_t ldq, float *k_cache, float *v_cache, const int64_t *block_tables,
                       int64_t bt_stride, const int64_t *seq_lens, float *out, int B, int H, int KVH, int D,
                       int64_t NB, int BS, float scale, int nthreads, const float *k_new, const float *v_new,
                       int64_t ldkv, const int64_t *slots) {
    return paged_decode(q, ldq, k_cache, v_cache, block_tables, bt_stride, seq_lens, out, B, H, KVH, D, NB, BS,
                        scale, nthreads, k_new, v_new, ldkv, slots, 0);
}
int ember_paged_decode_f16(const float *q, int64_t ldq, _Float16 *k_cache, _Float16 *v_cache,
                           const int64_t *block_tables, int64_t bt_stride, const int64_t *seq_lens, float *out, int B,
                           int H, int KVH, int D, int64_t NB, int BS, float scale, int nthreads, const float *k_new,
                           const float *v_new, int64_t ldkv, const int64_t *slots) {
    return paged_decode(q, ldq, k_cache, v_cache, block_tables, bt_stride, seq_lens, out, B, H, KVH, D, NB, BS,
                        scale, nthreads, k_new, v_new, ldkv, slots, 1);
}

// Write ntok new keys and values (k_new, v_new: [ntok, KVH, D], row stride ldkv) at their cache
// slots; a few (a decode step's) on the caller's thread, without entering an OpenMP region.
static void write_kv(int64_t ntok, const float *k_new, const float *v_new, int64_t ldkv, const int64_t *slots,
                     void *k_cache, void *v_cache, int KVH, int D, int64_t NB, int BS, int nthreads, int half) {
#define WRITE_ONE(i)                                                                                          \
    write_slot(k_new + (i) / KVH * ldkv + (i) % KVH * D, v_new + (i) / KVH * ldkv + (i) % KVH * D, k_cache, \
               v_cache, (i) % KVH, slots[(i) / KVH], D, NB, BS, half)
    if (ntok * KVH < 64 || nthreads <= 1) {
        for (int64_t i = 0; i < ntok * KVH; i++) WRITE_ONE(i);
        return;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < ntok * KVH; i++) WRITE_ONE(i);
#undef WRITE_ONE
}
void ember_write_kv(int64_t ntok, const float *k_new, const float *v_new, int64_t ldkv, const int64_t *slots,
                    float *k_cache, float *v_cache, int KVH, int D, int64_t NB, int BS, int nthreads) {
    write_kv(ntok, k_new, v_new, ldkv, slots, k_cache, v_cache, KVH, D, NB, BS, nthreads, 0);
}
void ember_write_kv_f16(int64_t ntok, const float *k_new, const float *v_new, int64_t ldkv, const int64_t *slots,
                        _Float16 *k_cache, _Float16 *v_cache, int KVH, int D, int64_t NB, int BS, int nthreads) {
    write_kv(ntok, k_new, v_new, ldkv, slots, k_cache, v_cache, KVH, D, NB, BS, nthreads, 1);
}

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
// register-tiled matrix multiplies (6 x 64 accumulators with AVX-512, 6 x 16 with AVX2). A chunk of
// keys past the tile's last position is never read; on the chunk that straddles the diagonal only
// the keys and rows that see something are computed.
//
// Every row's arithmetic depends only on its own sequence and position, never on which tile, call,
// thread or path computes it (a masked key adds an exact 0; a score is one FMA chain over d, an
// output element one over the keys in order, from its rescaled value so far; the running sum adds
// the chunk's keys in order). A sequence with one new token (a decode row in a mixed step) goes
// through the decode kernel's own unit instead (decode_unit), so it gets the same bits it would in
// a decode-only step.

#define TILE_ROWS 96 /* rows (tokens * group) per work item */
#define KC_KEYS 64   /* keys per chunk, rounded down to whole blocks (at least one) */

static inline int64_t round16(int64_t x) { return (x + 15) & ~(int64_t)15; }

/* C[MR][16 NV] (+)= A[MR][K] B[K][16 NV] with A stored k-major (A[k * lda + m]): MR * NV vectors of
 * accumulators in registers, each element's chain running over k in order, from 0 or from C; each
 * k loads NV vectors of B and MR consecutive floats of A. MR, NV are constants in every instance. */
V16_INLINE void ukernel(const int MR, const int NV, int64_t K, const float *A, int64_t lda, const float *B,
                        int64_t ldb, float *C, int64_t ldc, int accumulate) {
    v16 c[6][4];
#pragma GCC unroll 6
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) c[r][v] = accumulate ? v16_load(C + r * ldc + 16 * v) : v16_zero();
    for (int64_t k = 0; k < K; k++) {
        v16 b[4];
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) b[v] = v16_load(B + k * ldb + 16 * v);
        const float *a = A + k * lda;
#pragma GCC unroll 6
        for (int r = 0; r < MR; r++) {
            const v16 ar = v16_set1(a[r]);
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) c[r][v] = v16_fma(ar, b[v], c[r][v]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) v16_store(C + r * ldc + 16 * v, c[r][v]);
}

/* the tiles this path uses (MR <= GEMM_MR, NV <= GEMM_NV); the others are never reached */
#define GEMM_CASE(MR, NV)                                                                  \
    case (MR) * 8 + (NV):                                                                  \
        if ((MR) <= GEMM_MR && (NV) <= GEMM_NV) ukernel(MR, NV, K, a, lda, b, ldb, c, ldc, accumulate); \
        break;
#define GEMM_CASES(MR) GEMM_CASE(MR, 1) GEMM_CASE(MR, 2) GEMM_CASE(MR, 3) GEMM_CASE(MR, 4)

/* C[M][N] (+)= A[M][K] B[K][N], A stored k-major (A[k * lda + m]), N a multiple of 16 */
static void gemm(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B, int64_t ldb, float *C,
                 int64_t ldc, int accumulate) {
    const int64_t nvec = N / 16, panels = (nvec + GEMM_NV - 1) / GEMM_NV;
    for (int64_t pi = 0, n0 = 0; pi < panels; pi++) {
        /* panels of equal width as far as they go: 96 columns are 48 + 48, not 64 + 32 */
        const int nv = (int)(nvec / panels + (pi < nvec % panels));
        for (int64_t m0 = 0; m0 < M; m0 += GEMM_MR) {
            const int mr = (int)(M - m0 < GEMM_MR ? M - m0 : GEMM_MR);
            const float *a = A + m0, *b = B + n0;
            float *c = C + m0 * ldc + n0;
            switch (mr * 8 + nv) {
                GEMM_CASES(1) GEMM_CASES(2) GEMM_CASES(3) GEMM_CASES(4) GEMM_CASES(5) GEMM_CASES(6)
            }
        }
        n0 += 16 * nv;
    }
}

/* The online softmax's step over one chunk of nc keys (the first at position c0), for rows r0 ..
 * r1 - 1 (r0 and r1 multiples of 16): St[j * ld + r] is key j's score for row r, and row r sees key j
 * iff c0 + j <= pos[r]. Scores become probabilities exp(s - max), 0 where unseen; m, l are each
 * row's running max and sum (l times the rescale factor, then the chunk's keys added in order), and
 * alpha gets the factor its output so far must be scaled by. */
static void softmax_step(float *St, int64_t ld, int64_t nc, int64_t c0, const int32_t *pos, int64_t r0, int64_t r1,
                         float *m, float *l, float *alpha) {
    for (int64_t r = r0; r < r1; r += 16) {
        const i16 lim = i16_sub(i16_load(pos + r), (int32_t)c0); /* row sees key j iff j <= lim */
        const v16 m_old = v16_load(m + r);
        v16 mx = m_old;
        /* rows go by position, so lane 0 sees the fewest keys: if it sees them all, no masks */
        const int all = pos[r] - c0 >= nc - 1;
        if (all) {
            for (int64_t j = 0; j < nc; j++) mx = v16_max(mx, v16_load(St + j * ld + r));
        } else {
            for (int64_t j = 0; j < nc; j++)
                mx = v16_select(i16_ge(lim, (int32_t)j), v16_max(mx, v16_load(St + j * ld + r)), mx);
        }
        /* a row's first chunk: nothing to rescale (and exp(-inf) is not computed exactly) */
        const v16 a = v16_keep(v16_ne(m_old, v16_set1(-INFINITY)), exp16(v16_sub(m_old, mx)));
        v16 sum = v16_mul(v16_load(l + r), a);
        for (int64_t j = 0; j < nc; j++) {
            float *s = St + j * ld + r;
            v16 p = exp16(v16_sub(v16_load(s), mx));
            if (!all) p = v16_keep(i16_ge(lim, (int32_t)j), p);
            v16_store(s, p);
            sum = v16_add(sum, p);
        }
        v16_store(m + r, mx);
        v16_store(l + r, sum);
        v16_store(alpha + r, a);
    }
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

/* per-thread scratch of a prefill tile (see prefill_tile), carved from one buffer */
typedef struct {
    float *Qt, *O, *St, *Ks, *Vs, *m, *l, *alpha;
    int32_t *pos;
} tile_scratch;

/* One tile: rows r = t * G + g for the nt tokens whose q rows start at q (row stride ldq) and whose
 * token t sits at position pos0 + t; out likewise (row stride H * D). Scratch: Qt [D][Rp], O [Rp][Dp],
 * St [ldk][Rp], Ks [D][ldk], Vs [ldk][Dp], m, l, alpha, pos [Rp] (Rp = round16(R)). The elementwise
 * steps (q times scale, the rescale, the final 1 / l) are one IEEE operation per element, the
 * same bits however the compiler vectorises them. */
V16_INLINE void prefill_tile(const float *q, int64_t ldq, float *out, int H, int G, int kh, int D, int BS, float scale,
                             const void *kbase, const void *vbase, const int64_t *table, int64_t pos0, int nt,
                             tile_scratch w, const int half) {
    float *Qt = w.Qt, *O = w.O, *St = w.St, *Ks = w.Ks, *Vs = w.Vs, *m = w.m, *l = w.l, *alpha = w.alpha;
    int32_t *pos = w.pos;
    const int64_t R = (int64_t)nt * G, Rp = round16(R), Dp = round16(D);
    const int64_t kc = KC_KEYS < BS ? BS : KC_KEYS / BS * BS, ldk = round16(kc);
    const int64_t last = pos0 + nt - 1; /* the tile's last position: no key past it is read */
    for (int t = 0; t < nt; t++)
        for (int g = 0; g < G; g++) {
            const int64_t r = (int64_t)t * G + g;
            const float *src = q + t * ldq + ((int64_t)kh * G + g) * D;
            for (int d = 0; d < D; d++) Qt[d * Rp + r] = src[d] * scale;
            pos[r] = (int32_t)(pos0 + t);
        }
    for (int64_t r = R; r < Rp; r++) { /* padding rows: zero queries, seeing what the last row sees */
        for (int d = 0; d < D; d++) Qt[d * Rp + r] = 0.0f;
        pos[r] = (int32_t)last;
    }
    for (int64_t r = 0; r < Rp; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    memset(O, 0, sizeof(float) * (size_t)(R * Dp));
    for (int64_t c0 = 0; c0 <= last; c0 += kc) {
        /* keys c0 .. c0 + nc - 1 are seen by some row; rows before r0 see none of them */
        const int64_t nc = min64(last - c0 + 1, kc);
        const int64_t r0 = (c0 > pos0 ? c0 - pos0 : 0) * G, r0a = r0 & ~(int64_t)15;
        for (int64_t j0 = 0; j0 < nc; j0 += BS) {
            const int64_t blk = table[(c0 + j0) / BS], ns = min64(nc - j0, BS);
            const void *kb = kv_at(kbase, blk * BS * D, half), *vb = kv_at(vbase, blk * BS * D, half);
            for (int d = 0; d < D; d++) kv_to_float(Ks + d * ldk + j0, kv_at(kb, (int64_t)d * BS, half), ns, half);
            for (int64_t j = 0; j < ns; j++) kv_to_float(Vs + (j0 + j) * Dp, kv_at(vb, j * D, half), D, half);
        }
        gemm(nc, Rp - r0a, D, Ks, ldk, Qt + r0a, Rp, St + r0a, Rp, 0);
        softmax_step(St, Rp, nc, c0, pos, r0a, Rp, m, l, alpha);
        for (int64_t r = r0; r < R; r++) {
            const float a = alpha[r];
            if (a != 1.0f) {
                float *o = O + r * Dp;
#pragma omp simd
                for (int64_t d = 0; d < Dp; d++) o[d] *= a;
            }
        }
        gemm(R - r0, Dp, nc, St + r0, Rp, Vs, Dp, O + r0 * Dp, Dp, 1);
    }
    for (int t = 0; t < nt; t++)
        for (int g = 0; g < G; g++) {
            const int64_t r = (int64_t)t * G + g;
            const float inv = 1.0f / l[r], *src = O + r * Dp;
            float *dst = out + (int64_t)t * H * D + ((int64_t)kh * G + g) * D;
#pragma omp simd
            for (int d = 0; d < D; d++) dst[d] = src[d] * inv;
        }
}

static void prefill_tile_f32(const float *q, int64_t ldq, float *out, int H, int G, int kh, int D, int BS, float scale,
                             const void *kbase, const void *vbase, const int64_t *table, int64_t pos0, int nt,
                             tile_scratch w) {
    prefill_tile(q, ldq, out, H, G, kh, D, BS, scale, kbase, vbase, table, pos0, nt, w, 0);
}
static void prefill_tile_f16(const float *q, int64_t ldq, float *out, int H, int G, int kh, int D, int BS, float scale,
                             const void *kbase, const void *vbase, const int64_t *table, int64_t pos0, int nt,
                             tile_scratch w) {
    prefill_tile(q, ldq, out, H, G, kh, D, BS, scale, kbase, vbase, table, pos0, nt, w, 1);
}

static int paged_prefill(const float *q, int64_t ldq, const void *k_cache, const void *v_cache,
                         const int64_t *block_tables, int64_t bt_stride, const int64_t *query_start_loc,
                         const int64_t *seq_lens, int num_seqs, float *out, int H, int KVH, int D, int64_t NB, int BS,
                         float scale, int nthreads, const int half) {
    if (BS < 1 || BS > 64) return -2;
    if (KVH < 1 || H % KVH || H / KVH > MAX_GROUP || D < 1 || D > 1024) return -3;
    const int G = H / KVH;
    const int tile = TILE_ROWS / G > 0 ? TILE_ROWS / G : 1; /* tokens per work item */
    int64_t nitems = 0, max_dec = 0;
    for (int i = 0; i < num_seqs; i++) {
        const int64_t n = query_start_loc[i + 1] - query_start_loc[i];
        if (n < 0 || n > seq_lens[i] || seq_lens[i] > INT32_MAX) return -4;
        if (n == 1 && seq_lens[i] > max_dec) max_dec = seq_lens[i];
        nitems += (n == 1 ? 1 : (n + tile - 1) / tile) * KVH;
    }
    if (nitems == 0) return 0;
    work_item *items = malloc(sizeof(work_item) * (size_t)nitems);
    if (!items) return -1;
    int64_t w = 0;
    for (int i = 0; i < num_seqs; i++) {
        const int64_t n = query_start_loc[i + 1] - query_start_loc[i], ctx = seq_lens[i];
        if (n == 1) {
            for (int kh = 0; kh < KVH; kh++) items[w++] = (work_item){(int64_t)G * ctx, i, kh, 0, 0};
            continue;
        }
        for (int64_t t0 = 0; t0 < n; t0 += tile) {
            const int nt = (int)(n - t0 < tile ? n - t0 : tile);
            const int64_t cost = (int64_t)nt * G * (ctx - n + t0 + nt);
            for (int kh = 0; kh < KVH; kh++) items[w++] = (work_item){cost, i, kh, t0, nt};
        }
    }
    qsort(items, (size_t)nitems, sizeof(work_item), by_cost_desc);
    const int64_t Dp = round16(D), kc = KC_KEYS < BS ? BS : KC_KEYS / BS * BS, ldk = round16(kc);
    const int64_t Rp = round16((int64_t)tile * G), elem = half ? 2 : 4;
    /* per thread: the tile's scratch, then the decode scores */
    const size_t scratch = (size_t)(D * Rp + Rp * Dp + ldk * Rp + D * ldk + ldk * Dp + 4 * Rp + G * max_dec);
    int failed = 0;
    const int threads = nthreads < 1 ? 1 : (int64_t)nthreads > nitems ? (int)nitems : nthreads;
#pragma omp parallel num_threads(threads)
    {
        float *buf = calloc(scratch, sizeof(float));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
        tile_scratch ts;
        ts.Qt = buf;
        ts.O = ts.Qt + D * Rp;
        ts.St = ts.O + Rp * Dp;
        ts.Ks = ts.St + ldk * Rp;
        ts.Vs = ts.Ks + D * ldk;
        ts.m = ts.Vs + ldk * Dp;
        ts.l = ts.m + Rp;
        ts.alpha = ts.l + Rp;
        ts.pos = (int32_t *)(ts.alpha + Rp);
        float *dec = ts.alpha + 2 * Rp;
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < nitems; it++) {
            if (!buf) continue;
            const work_item wi = items[it];
            const int64_t n = query_start_loc[wi.seq + 1] - query_start_loc[wi.seq];
            const int64_t ctx = seq_lens[wi.seq], row = query_start_loc[wi.seq] + wi.t0;
            const int64_t *table = block_tables + (int64_t)wi.seq * bt_stride;
            const void *kbase = (const char *)k_cache + (int64_t)wi.kh * NB * BS * D * elem;
            const void *vbase = (const char *)v_cache + (int64_t)wi.kh * NB * BS * D * elem;
            if (wi.nt == 0)
                DECODE_UNIT(half)(q + row * ldq + (int64_t)wi.kh * G * D, out + (row * H + (int64_t)wi.kh * G) * D, G,
                                  kbase, vbase, table, ctx, D, BS, scale, dec);
            else
                (half ? prefill_tile_f16 : prefill_tile_f32)(q + row * ldq, ldq, out + row * H * D, H, G, wi.kh, D, BS,
                                                             scale, kbase, vbase, table, ctx - n + wi.t0, wi.nt, ts);
        }
        free(buf);
    }
    free(items);
    return failed ? -1 : 0;
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
int ember_paged_prefill(const float *q, int64_t ldq, const float *k_cache, const float *v_cache,
                        const int64_t *block_tables, int64_t bt_stride, const int64_t *query_start_loc,
                        const int64_t *seq_lens, int num_seqs, float *out, int H, int KVH, int D, int64_t NB, int BS,
                        float scale, int nthreads) {
    return paged_prefill(q, ldq, k_cache, v_cache, block_tables, bt_stride, query_start_loc, seq_lens, num_seqs, out,
                         H, KVH, D, NB, BS, scale, nthreads, 0);
}
int ember_paged_prefill_f16(const float *q, int64_t ldq, const _Float16 *k_cache, const _Float16 *v_cache,
                            const int64_t *block_tables, int64_t bt_stride, const int64_t *query_start_loc,
                            const int64_t *seq_lens, int num_seqs, float *out, int H, int KVH, int D, int64_t NB,
                            int BS, float scale, int nthreads) {
    return paged_prefill(q, ldq, k_cache, v_cache, block_tables, bt_stride, query_start_loc, seq_lens, num_seqs, out,
                         H, KVH, D, NB, BS, scale, nthreads, 1);
}
