/* y = x @ W.T for float weights (GGML's F32, F16 and BF16: unquantized GGUF tensors and the bf16,
 * fp16 and fp32 weights of a Hugging Face checkpoint). Included by quant_matmul.c, whose ISA
 * macros (EMBER_VNNI, EMBER_AVX2, EMBER_NEON) pick the vectors; ember_qlinear calls float_linear
 * for a layer whose parts are all float.
 *
 * Every path computes every output the same way, so that a row's result depends neither on the
 * rows computed beside it nor on the path: 16 lanes, lane j accumulating x[16i + j] * w[16i + j]
 * by fused multiply-adds for i = 0, 1, ... from +0; then the lanes fold in halves (lane j plus lane
 * j + 8, then + 4, + 2, + 1). AVX-512 holds the 16 lanes in one register, AVX2 in two, NEON in
 * four and the portable C in an array; weights convert to float32 exactly (BF16 by a shift, F16
 * by F16C or its exact C equivalent). The weights stay as the file has them: [N, K] rows. */
#ifndef EMBER_FLOAT_MATMUL_H
#define EMBER_FLOAT_MATMUL_H

#include <math.h>

enum { T_F32 = 0, T_F16 = 1, T_BF16 = 30 };
/* ember's own: FP8 (e4m3) weights with a float32 scale per row and block of columns, the whole row
 * (T_F8_ROW: per-tensor and per-channel scales) or 128 columns (T_F8_B128: DeepSeek-style blocks,
 * whose 128-row extent the loader spreads over the rows). The matrix is the N rows of K bytes, then
 * the [N][K / block] scales. */
enum { T_F8_ROW = 256 + 32, T_F8_B128 = 256 + 33 };
static int float_type(int t) { return t == T_F32 || t == T_F16 || t == T_BF16 || t == T_F8_ROW || t == T_F8_B128; }
static int is_f8(int t) { return t == T_F8_ROW || t == T_F8_B128; }
static int float_bytes(int t) { return t == T_F32 ? 4 : is_f8(t) ? 1 : 2; }
/* the columns one scale covers */
static int64_t f8_block(int t, int64_t K) { return t == T_F8_B128 ? 128 : K; }
/* bytes of an N x K float matrix as the kernels hold it */
static int64_t float_matrix_bytes(int t, int64_t N, int64_t K) {
    return N * K * float_bytes(t) + (is_f8(t) ? N * (K / f8_block(t, K)) * 4 : 0);
}
/* e4m3 as float16 bits, exactly scaled down by 2^8: sign, then the exponent and mantissa shifted
 * into float16's (exponent bias 15 against e4m3's 7; subnormals land on float16's subnormals). The
 * value is 256 times this float16's. */
static inline uint16_t f8_as_h(uint8_t b) { return (uint16_t)(((b & 0x80) << 8) | ((b & 0x7F) << 7)); }

#if EMBER_VNNI
#define MRF 4 /* activation rows per tile */
#define NRF 4 /* weight rows per tile */
typedef __m512 v16;
static inline v16 v16_zero(void) { return _mm512_setzero_ps(); }
static inline v16 v16_x(const float *p) { return _mm512_loadu_ps(p); }
static inline __attribute__((always_inline)) v16 v16_w(const int t, const uint8_t *p) {
    if (t == T_F32) return _mm512_loadu_ps((const float *)(const void *)p);
    if (t == T_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)p));
    if (is_f8(t)) {
        const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(const void *)p));
        const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8),
                                          _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7F)), 7));
        return _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.0f));
    }
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(const void *)p)), 16));
}
static inline v16 v16_fma(v16 a, v16 b, v16 c) { return _mm512_fmadd_ps(a, b, c); }
static inline float v16_fold(v16 v) {
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
#elif EMBER_AVX2
#define MRF 2
#define NRF 2
typedef struct { __m256 lo, hi; } v16; /* lanes 0-7, 8-15 */
static inline v16 v16_zero(void) { v16 v = {_mm256_setzero_ps(), _mm256_setzero_ps()}; return v; }
static inline v16 v16_x(const float *p) { v16 v = {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; return v; }
static inline __attribute__((always_inline)) __m256 w8(const int t, const uint8_t *p) {
    if (t == T_F32) return _mm256_loadu_ps((const float *)(const void *)p);
    if (t == T_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)p));
    if (is_f8(t)) {
        const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(const void *)p));
        const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8),
                                       _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7F)), 7));
        return _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0f));
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(const void *)p)), 16));
}
static inline __attribute__((always_inline)) v16 v16_w(const int t, const uint8_t *p) {
    v16 v = {w8(t, p), w8(t, p + 8 * float_bytes(t))};
    return v;
}
static inline v16 v16_fma(v16 a, v16 b, v16 c) {
    v16 v = {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
    return v;
}
static inline float v16_fold(v16 v) {
    __m256 s8 = _mm256_add_ps(v.lo, v.hi);
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
#elif EMBER_NEON
#define MRF 2
#define NRF 2
typedef struct { float32x4_t q[4]; } v16; /* lanes 0-3, 4-7, 8-11, 12-15 */
static inline v16 v16_zero(void) { v16 v; for (int i = 0; i < 4; i++) v.q[i] = vdupq_n_f32(0.0f); return v; }
static inline v16 v16_x(const float *p) { v16 v; for (int i = 0; i < 4; i++) v.q[i] = vld1q_f32(p + 4 * i); return v; }
static inline __attribute__((always_inline)) float32x4_t w4(const int t, const uint8_t *p) {
    if (t == T_F32) return vld1q_f32((const float *)(const void *)p);
    if (t == T_F16) return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)(const void *)p)));
    if (is_f8(t)) {
        uint32_t four;
        memcpy(&four, p, 4);
        const uint16x4_t b = vget_low_u16(vmovl_u8(vreinterpret_u8_u32(vdup_n_u32(four))));
        const uint16x4_t h = vorr_u16(vshl_n_u16(vand_u16(b, vdup_n_u16(0x80)), 8), vshl_n_u16(vand_u16(b, vdup_n_u16(0x7F)), 7));
        return vmulq_f32(vcvt_f32_f16(vreinterpret_f16_u16(h)), vdupq_n_f32(256.0f));
    }
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16((const uint16_t *)(const void *)p), 16));
}
static inline __attribute__((always_inline)) v16 v16_w(const int t, const uint8_t *p) {
    v16 v;
    for (int i = 0; i < 4; i++) v.q[i] = w4(t, p + 4 * i * float_bytes(t));
    return v;
}
static inline v16 v16_fma(v16 a, v16 b, v16 c) {
    v16 v;
    for (int i = 0; i < 4; i++) v.q[i] = vfmaq_f32(c.q[i], a.q[i], b.q[i]);
    return v;
}
static inline float v16_fold(v16 v) {
    float32x4_t s4 = vaddq_f32(vaddq_f32(v.q[0], v.q[2]), vaddq_f32(v.q[1], v.q[3]));
    float32x2_t s2 = vadd_f32(vget_low_f32(s4), vget_high_f32(s4));
    return vget_lane_f32(s2, 0) + vget_lane_f32(s2, 1);
}
#else
#define MRF 1
#define NRF 1
typedef struct { float l[16]; } v16;
static inline v16 v16_zero(void) { v16 v; for (int j = 0; j < 16; j++) v.l[j] = 0.0f; return v; }
static inline v16 v16_x(const float *p) { v16 v; memcpy(v.l, p, sizeof v.l); return v; }
static inline v16 v16_w(const int t, const uint8_t *p) {
    v16 v;
    for (int j = 0; j < 16; j++) {
        if (t == T_F32) memcpy(&v.l[j], p + 4 * j, 4);
        else if (t == T_F16) v.l[j] = h2f(p + 2 * j);
        else if (is_f8(t)) {
            const uint16_t h = f8_as_h(p[j]);
            uint8_t hb[2] = {(uint8_t)(h & 0xFF), (uint8_t)(h >> 8)};
            v.l[j] = h2f(hb) * 256.0f;
        }
        else {
            uint32_t bits = (uint32_t)(p[2 * j] | p[2 * j + 1] << 8) << 16;
            memcpy(&v.l[j], &bits, 4);
        }
    }
    return v;
}
static inline v16 v16_fma(v16 a, v16 b, v16 c) { for (int j = 0; j < 16; j++) c.l[j] = fmaf(a.l[j], b.l[j], c.l[j]); return c; }
static inline float v16_fold(v16 v) {
    for (int w = 8; w >= 1; w /= 2)
        for (int j = 0; j < w; j++) v.l[j] = v.l[j] + v.l[j + w];
    return v.l[0];
}
#endif

/* out[r * NRF + n] = row r of x (stride ldx) . weight row n (stride ldw bytes), r < mr, n < nr. FP8:
 * each block of columns' dot is folded, then out = fma(dot, scale, out) block after block (sc: the
 * tile's first row's scales, ldsc apart). */
static inline __attribute__((always_inline)) void ftile_t(const int t, const int mr, const int nr, const uint8_t *w,
                                                          int64_t ldw, int64_t K, const float *x, int64_t ldx,
                                                          float *out, const float *sc, int64_t ldsc) {
    const int b = float_bytes(t);
    const int64_t block = is_f8(t) ? f8_block(t, K) : K;
    for (int r = 0; r < mr; r++)
        for (int n = 0; n < nr; n++) out[r * NRF + n] = 0.0f;
    for (int64_t k0 = 0; k0 < K; k0 += block) {
        v16 acc[MRF][NRF];
        for (int r = 0; r < mr; r++)
            for (int n = 0; n < nr; n++) acc[r][n] = v16_zero();
        for (int64_t k = k0; k < k0 + block; k += 16) {
            v16 wv[NRF];
            for (int n = 0; n < nr; n++) wv[n] = v16_w(t, w + n * ldw + k * b);
            for (int r = 0; r < mr; r++) {
                const v16 xv = v16_x(x + r * ldx + k);
                for (int n = 0; n < nr; n++) acc[r][n] = v16_fma(xv, wv[n], acc[r][n]);
            }
        }
        for (int r = 0; r < mr; r++)
            for (int n = 0; n < nr; n++) {
                const float d = v16_fold(acc[r][n]);
                out[r * NRF + n] = is_f8(t) ? fmaf(d, sc[n * ldsc + k0 / block], out[r * NRF + n]) : d;
            }
    }
}

#define FTILE_NR(T, MR)                                                                                       \
    switch (nr) {                                                                                             \
    case 1: ftile_t(T, MR, 1, w, ldw, K, x, ldx, out, sc, ldsc); return;                                      \
    case 2: if (NRF >= 2) { ftile_t(T, MR, NRF >= 2 ? 2 : 1, w, ldw, K, x, ldx, out, sc, ldsc); return; } break; \
    case 3: if (NRF >= 3) { ftile_t(T, MR, NRF >= 3 ? 3 : 1, w, ldw, K, x, ldx, out, sc, ldsc); return; } break; \
    case 4: if (NRF >= 4) { ftile_t(T, MR, NRF >= 4 ? 4 : 1, w, ldw, K, x, ldx, out, sc, ldsc); return; } break; \
    }
#define FTILE_MR(T)                                                                                           \
    switch (mr) {                                                                                             \
    case 1: FTILE_NR(T, 1) break;                                                                             \
    case 2: if (MRF >= 2) { FTILE_NR(T, MRF >= 2 ? 2 : 1) } break;                                            \
    case 3: if (MRF >= 3) { FTILE_NR(T, MRF >= 3 ? 3 : 1) } break;                                            \
    case 4: if (MRF >= 4) { FTILE_NR(T, MRF >= 4 ? 4 : 1) } break;                                            \
    }
static void ftile(int t, int mr, int nr, const uint8_t *w, int64_t ldw, int64_t K, const float *x, int64_t ldx,
                  float *out, const float *sc, int64_t ldsc) {
    if (t == T_F32) { FTILE_MR(T_F32) }
    else if (t == T_F16) { FTILE_MR(T_F16) }
    else if (t == T_BF16) { FTILE_MR(T_BF16) }
    else if (t == T_F8_ROW) { FTILE_MR(T_F8_ROW) }
    else { FTILE_MR(T_F8_B128) }
}
#undef FTILE_MR
#undef FTILE_NR

/* ember_qlinear for parts that are all float: y[M, N] (stride ldy) = x @ W.T (+ bias) */
static int float_linear(int nparts, const int *types, const void *const *data, const int64_t *ns, int64_t K,
                        const float *x, int64_t ldx, int64_t M, float *y, int64_t ldy, const float *bias,
                        int threads) {
    int64_t first[64 + 1], col[64];
    first[0] = 0;
    for (int p = 0; p < nparts; p++) {
        first[p + 1] = first[p] + (ns[p] + NRF - 1) / NRF;
        col[p] = p ? col[p - 1] + ns[p - 1] : 0;
    }
    const int64_t blocks = first[nparts];
    /* as for the quantized panels: long runs for a row or two (the weights stream from memory),
     * short ones when each block of weight rows is used for many rows from cache */
    const int64_t chunk = M <= 2 && blocks / (threads * 4) > 8 ? blocks / (threads * 4) : 8;
    #pragma omp parallel for num_threads(threads) schedule(dynamic, chunk)
    for (int64_t bi = 0; bi < blocks; bi++) {
        int p = 0;
        while (bi >= first[p + 1]) p++;
        const int t = types[p];
        const int64_t n0 = (bi - first[p]) * NRF, ldw = K * float_bytes(t);
        const int nr = ns[p] - n0 < NRF ? (int)(ns[p] - n0) : NRF;
        const uint8_t *w = (const uint8_t *)data[p] + n0 * ldw;
        /* FP8: the scales follow the rows */
        const int64_t ldsc = is_f8(t) ? K / f8_block(t, K) : 0;
        const float *sc = is_f8(t) ? (const float *)(const void *)((const uint8_t *)data[p] + ns[p] * ldw) + n0 * ldsc : NULL;
        float out[MRF * NRF];
        for (int64_t m0 = 0; m0 < M; m0 += MRF) {
            const int mr = M - m0 < MRF ? (int)(M - m0) : MRF;
            ftile(t, mr, nr, w, ldw, K, x + m0 * ldx, ldx, out, sc, ldsc);
            for (int r = 0; r < mr; r++) {
                float *yr = y + (m0 + r) * ldy + col[p] + n0;
                for (int n = 0; n < nr; n++) yr[n] = bias ? out[r * NRF + n] + bias[col[p] + n0 + n] : out[r * NRF + n];
            }
        }
    }
    return 0;
}

#endif
