/* Quantized linear layers: y = x @ W.T with W kept in 4 or 8 bits and x quantized per row.
 *
 * Weights are repacked once, at load, from their GGUF blocks into panels of 16 output rows. Every
 * supported type is, exactly, w = s * u + m per group of 32 values (16 for Q6_K): u an unsigned
 * 4-bit (Q4_0, Q4_1, Q4_K) or 8-bit (Q5_0, Q5_1, Q8_0, Q5_K, Q6_K) integer, s and m floats (a zero
 * point z becomes m = -z * s). Within a panel, a group's integers are interleaved so that one
 * 64-byte vector holds 4 consecutive values of each of the 16 rows: vpdpbusd (u8 x s8 -> s32)
 * against 4 broadcast activation bytes advances all 16 rows at once, and the group's scales are
 * applied once per group to 16 rows. Scales stay float16 where the file has float16 (exact), float32
 * for the K-quants' products of two scales.
 *
 * Activations: each row, in groups of 32, becomes integers q (two int8 terms, see below) and a
 * float d with q * d ~ x, plus the sums the minimum terms need:
 *     sum_i w_i x_i = sum_groups s * d * (u . q) + m * sum(x).
 * Quantizing each row on its own keeps a sequence's result independent of the rest of the batch,
 * and each (panel, row) pair runs the same operations in the same order whatever the tile, batch
 * size or thread count: results are bitwise independent of batching (the tests check it).
 *
 * Three paths compute the same integer dot products and the same float steps in the same order, so
 * a row's result is the same bits on every CPU:
 *   AVX512-VNNI: the inner loop is vpdpbusd, and blocks of 16 rows run on AMX tiles where the CPU
 *                and kernel allow;
 *   AVX2:        vpmaddubsw pairs summed exactly in 16 bits, then vpmaddwd into 32 (llama.cpp's and
 *                oneDNN's int8 dot on AVX2), each 16-row panel as two 8-row halves;
 *   NEON:        sdot (ARMv8.2 dot product), each panel as four 4-row quarters;
 *   elsewhere:   a portable scalar loop.
 */
#define _GNU_SOURCE /* syscall() for arch_prctl */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && defined(__F16C__)
#include <immintrin.h>
#define EMBER_VNNI 1
#else
#define EMBER_VNNI 0
#endif
#if !EMBER_VNNI && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define EMBER_AVX2 1
#else
#define EMBER_AVX2 0
#endif
#if defined(__aarch64__) && defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#define EMBER_NEON 1
#else
#define EMBER_NEON 0
#endif

/* GGML type ids (gguf.GGMLQuantizationType) */
enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };

static int block_bytes(int t) {
    switch (t) {
    case T_Q4_0: return 18; case T_Q4_1: return 20; case T_Q5_0: return 22; case T_Q5_1: return 24;
    case T_Q8_0: return 34; case T_Q4_K: return 144; case T_Q5_K: return 176; case T_Q6_K: return 210;
    default: return 0;
    }
}
static int block_values(int t) { return t >= T_Q4_K ? 256 : 32; }

int ember_qmm_supported(int t) { return block_bytes(t) > 0; }
int ember_qmm_vectorized(void) { return EMBER_VNNI || EMBER_AVX2 || EMBER_NEON; }
/* the inner loop this build runs: "avx512-vnni", "avx2", "neon" or "scalar" */
const char *ember_qmm_path(void) {
    return EMBER_VNNI ? "avx512-vnni" : EMBER_AVX2 ? "avx2" : EMBER_NEON ? "neon" : "scalar";
}

static int amx_enabled = 1; /* the tests turn it off to compare the paths */
void ember_qmm_set_amx(int on) { amx_enabled = on; }
static int amx_available(void);

static float h2f(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else { /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7f800000 | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static void k4_scale_min(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) { *sc = q[j] & 63; *m = q[j + 4] & 63; }
    else { *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4); *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4); }
}

/* ---------------------------------------------------------------------------------------------
 * One chunk of a row in its GGUF blocks, decoded for the repacker: values 64c .. 64c+63 as
 * unsigned integers u, with s[g], m[g] per group of 16 values (a 32-group repeats its numbers; m is
 * 0 for zero-point types, whose zero point is returned). `half` set: only the first 32 values
 * exist (a row of 32 * odd length); the rest read as zero.
 * ------------------------------------------------------------------------------------------- */
static int chunk_scalar(int t, const uint8_t *row, int64_t c, int half, uint8_t u[64], float s[4], float m[4]) {
    int z = 0;
    memset(u, 0, 64);
    for (int g = 0; g < 4; g++) s[g] = m[g] = 0.f;
    if (t < T_Q4_K) {
        for (int b = 0; b < (half ? 1 : 2); b++) {
            const uint8_t *p = row + (2 * c + b) * block_bytes(t);
            float d = h2f(p), mm = 0.f;
            const uint8_t *qs;
            uint32_t qh = 0;
            switch (t) {
            case T_Q4_0: qs = p + 2; z = 8; break;
            case T_Q4_1: mm = h2f(p + 2); qs = p + 4; break;
            case T_Q5_0: memcpy(&qh, p + 2, 4); qs = p + 6; z = 16; break;
            case T_Q5_1: mm = h2f(p + 2); memcpy(&qh, p + 4, 4); qs = p + 8; break;
            default: qs = p + 2; z = 128; break; /* Q8_0: u = q + 128 */
            }
            for (int i = 0; i < 32; i++) {
                int v;
                if (t == T_Q8_0) v = (int)(int8_t)qs[i] + 128;
                else v = (i < 16 ? qs[i] & 0xF : qs[i - 16] >> 4) | (((qh >> i) & 1) << 4);
                u[32 * b + i] = (uint8_t)v;
            }
            s[2 * b] = s[2 * b + 1] = d;
            m[2 * b] = m[2 * b + 1] = mm;
        }
        return z;
    }
    const uint8_t *p = row + (c / 4) * block_bytes(t);
    int j = (int)(c % 4);
    if (t == T_Q6_K) {
        const uint8_t *ql = p + 64 * (j / 2), *qh = p + 128 + 32 * (j / 2);
        const int8_t *sc = (const int8_t *)(p + 192) + 8 * (j / 2) + 4 * (j % 2);
        float d = h2f(p + 208);
        int sh = 4 * (j % 2);
        for (int l = 0; l < 32; l++) {
            u[l] = (uint8_t)(((ql[l] >> sh) & 0xF) | (((qh[l] >> (2 * (j % 2) * 2)) & 3) << 4));
            u[32 + l] = (uint8_t)(((ql[32 + l] >> sh) & 0xF) | (((qh[l] >> (2 * (j % 2) * 2 + 2)) & 3) << 4));
        }
        for (int g = 0; g < 4; g++) s[g] = d * (float)sc[g];
        return 32;
    }
    float d = h2f(p), dmin = h2f(p + 2);
    int sc0, m0, sc1, m1;
    k4_scale_min(2 * j, p + 4, &sc0, &m0);
    k4_scale_min(2 * j + 1, p + 4, &sc1, &m1);
    s[0] = s[1] = d * (float)sc0; s[2] = s[3] = d * (float)sc1;
    m[0] = m[1] = -(dmin * (float)m0); m[2] = m[3] = -(dmin * (float)m1);
    if (t == T_Q4_K) {
        const uint8_t *qs = p + 16 + 32 * j;
        for (int l = 0; l < 32; l++) { u[l] = qs[l] & 0xF; u[32 + l] = qs[l] >> 4; }
    } else { /* Q5_K */
        const uint8_t *qh = p + 16, *qs = p + 48 + 32 * j;
        for (int l = 0; l < 32; l++) {
            u[l] = (uint8_t)((qs[l] & 0xF) | (((qh[l] >> (2 * j)) & 1) << 4));
            u[32 + l] = (uint8_t)((qs[l] >> 4) | (((qh[l] >> (2 * j + 1)) & 1) << 4));
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Repacked layout. A format is (bits, group, f16 scales). Per panel of 16 rows, per group, in order:
 *   integers: 4-bit: 4 vectors of 64 bytes, byte 4n+i of vector j = u[n][4j+i] | u[n][16+4j+i] << 4
 *             8-bit: group/4 vectors, byte 4n+i of vector j = u[n][4j+i]
 *   then 16 scales s[n], then 16 minimums m[n] (float16 or float32).
 * ------------------------------------------------------------------------------------------- */
typedef struct {
    int bits, group, f16;
    int wide; /* 8-bit integers may exceed 127 (Q8_0's q + 128): the AVX2 path takes them signed */
} Fmt;

static Fmt fmt_of(int t) {
    switch (t) {
    case T_Q4_0: case T_Q4_1: return (Fmt){4, 32, 1, 0};
    case T_Q4_K: return (Fmt){4, 32, 0, 0};
    case T_Q5_0: case T_Q5_1: return (Fmt){8, 32, 1, 0};
    case T_Q8_0: return (Fmt){8, 32, 1, 1};
    case T_Q5_K: return (Fmt){8, 32, 0, 0};
    default: return (Fmt){8, 16, 0, 0}; /* Q6_K */
    }
}
static int64_t group_bytes(Fmt f) { return 16 * f.group * f.bits / 8 + 2 * 16 * (f.f16 ? 2 : 4); }

/* bytes of the repacked matrix: N rows padded to whole panels */
int64_t ember_repacked_size(int t, int64_t N, int64_t K) {
    if (!block_bytes(t) || K % block_values(t) || N < 1) return -1;
    Fmt f = fmt_of(t);
    return (N + 15) / 16 * (K / f.group) * group_bytes(f);
}

static uint16_t f2h(float x) { /* exact for the values we store (they came from float16) */
    uint32_t b;
    memcpy(&b, &x, 4);
    uint32_t sign = (b >> 16) & 0x8000, e = (b >> 23) & 0xff, man = b & 0x7fffff;
    if (e == 0xff) return (uint16_t)(sign | 0x7c00 | (man ? 0x200 : 0));
    int ee = (int)e - 127 + 15;
    if (ee >= 31) return (uint16_t)(sign | 0x7c00);
    if (ee <= 0) { /* subnormal in float16 */
        if (ee < -10) return (uint16_t)sign;
        man |= 0x800000;
        int shift = 14 - ee;
        uint32_t h = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = (uint32_t)ee << 10 | man >> 13, rem = man & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

/* Repack N rows of GGUF blocks (row after row) into dst (ember_repacked_size bytes). Returns 0, or
 * -2 for an unsupported type or shape, -3 when a minimum overflows float16 (not from a real file). */
int ember_repack(int t, const uint8_t *src, int64_t N, int64_t K, uint8_t *dst, int threads) {
    if (ember_repacked_size(t, N, K) < 0) return -2;
    const Fmt f = fmt_of(t);
    const int64_t rb = K / block_values(t) * block_bytes(t), ng = K / f.group, gb = group_bytes(f);
    const int64_t panels = (N + 15) / 16;
    int bad = 0;
    #pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static) reduction(|:bad)
    for (int64_t p = 0; p < panels; p++) {
        for (int n = 0; n < 16; n++) {
            int64_t row = 16 * p + n;
            for (int64_t c = 0; c < K / 64 + (K % 64 ? 1 : 0); c++) {
                uint8_t u[64];
                float s[4], m[4];
                if (row < N) {
                    int z = chunk_scalar(t, src + row * rb, c, 64 * c + 64 > K, u, s, m);
                    for (int g = 0; g < 4; g++) m[g] = m[g] - (float)z * s[g]; /* exact: z is a power of 2 */
                } else {
                    memset(u, 0, 64);
                    for (int g = 0; g < 4; g++) s[g] = m[g] = 0.f;
                }
                int per = 64 / f.group; /* groups in this chunk */
                for (int gi = 0; gi < per && c * 64 + gi * f.group < K; gi++) {
                    int64_t g = c * per + gi;
                    uint8_t *blk = dst + (p * ng + g) * gb;
                    const uint8_t *uu = u + gi * f.group;
                    if (f.bits == 4) {
                        for (int j = 0; j < 4; j++)
                            for (int i = 0; i < 4; i++)
                                blk[64 * j + 4 * n + i] = (uint8_t)(uu[4 * j + i] | uu[16 + 4 * j + i] << 4);
                    } else {
                        for (int j = 0; j < f.group / 4; j++)
                            for (int i = 0; i < 4; i++) blk[64 * j + 4 * n + i] = uu[4 * j + i];
                    }
                    uint8_t *sc = blk + 16 * f.group * f.bits / 8;
                    float ss = s[gi * f.group / 16], mm = m[gi * f.group / 16];
                    if (f.f16) {
                        uint16_t hs = f2h(ss), hm = f2h(mm);
                        if (isfinite(mm) && !isfinite(h2f((const uint8_t *)&hm))) bad = 1;
                        memcpy(sc + 2 * n, &hs, 2);
                        memcpy(sc + 32 + 2 * n, &hm, 2);
                    } else {
                        memcpy(sc + 4 * n, &ss, 4);
                        memcpy(sc + 64 + 4 * n, &mm, 4);
                    }
                }
            }
        }
    }
    return bad ? -3 : 0;
}

/* ---------------------------------------------------------------------------------------------
 * Activations, in two int8 terms: per group of 32, with e = max|x| / 127,
 *     hi = round(x / e),  lo = round(256 * (x / e - hi))  (clamped to +-127),
 *     x ~ d * (256 * hi + lo),  d = e / 256.
 * One int8 term alone leaves about 0.5% noise on every activation, which compounds over the
 * layers (about 1.5% perplexity on SmolLM2 in Q8_0); the second term brings it to about 16-bit
 * precision for twice the integer dot products and no more weight bytes.
 * Row r -> hi[K], lo[K] int8, d[K/32], and sx16[K/16], sx32[K/32]: the sums of x the minimum
 * terms multiply.
 * ------------------------------------------------------------------------------------------- */
typedef struct {
    int8_t *hi, *lo;
    float *d, *sx16, *sx32;
    int32_t *is32; /* the integer sums of 256 * hi + lo per 32 (the AVX2 path's signed 8-bit dot needs them) */
    int64_t k;
} Acts;

/* A block's scale, and its two halves' and whole's sums of 256 * hi + lo times it (the weights'
 * offsets multiply these). */
static inline void block_scales(float amax, const int s[2], const Acts *a, int64_t r, int64_t b) {
    const float scale = amax / 127.f / 256.f;
    const int64_t k = a->k;
    a->d[r * (k / 32) + b] = scale;
    a->sx16[r * (k / 16) + 2 * b] = scale * (float)s[0];
    a->sx16[r * (k / 16) + 2 * b + 1] = scale * (float)s[1];
    a->sx32[r * (k / 32) + b] = scale * (float)(s[0] + s[1]);
    a->is32[r * (k / 32) + b] = s[0] + s[1];
}

#if EMBER_VNNI
/* The same operations as the scalar loop below, 16 lanes at a time (so the same bytes): with 32
 * or 64 rows a call, quantizing activations one value at a time was a tenth of a step. */
static void quantize_row(const float *x, const Acts *a, int64_t r) {
    const int R = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    int8_t *hi = a->hi + r * a->k, *lo = a->lo + r * a->k;
    for (int64_t b = 0; b < a->k / 32; b++) {
        const __m512 x0 = _mm512_loadu_ps(x + 32 * b), x1 = _mm512_loadu_ps(x + 32 * b + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        int s[2];
        for (int half = 0; half < 2; half++) {
            const __m512 v = _mm512_mul_ps(half ? x1 : x0, inv), h = _mm512_roundscale_ps(v, R);
            __m512 l = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(v, h), _mm512_set1_ps(256.f)), R);
            l = _mm512_min_ps(_mm512_max_ps(l, _mm512_set1_ps(-127.f)), _mm512_set1_ps(127.f));
            const __m512i hq = _mm512_cvtps_epi32(h), lq = _mm512_cvtps_epi32(l);
            _mm_storeu_si128((__m128i *)(hi + 32 * b + 16 * half), _mm512_cvtepi32_epi8(hq));
            _mm_storeu_si128((__m128i *)(lo + 32 * b + 16 * half), _mm512_cvtepi32_epi8(lq));
            s[half] = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(hq, 8), lq));
        }
        block_scales(amax, s, a, r, b);
    }
}
#elif EMBER_AVX2
static inline int hsum8_epi32(__m256i v) { /* exact: any order gives the same integer */
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
    return _mm_cvtsi128_si32(t);
}

/* 8 int32 lanes (integral values within int8) to 8 bytes, in order */
static inline void store8_epi8(int8_t *dst, __m256i v) {
    const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64((__m128i *)dst, _mm_packs_epi16(p16, p16));
}

/* The scalar loop's operations, 8 lanes at a time: the same multiplies, roundings and clamps */
static void quantize_row(const float *x, const Acts *a, int64_t r) {
    const int R = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    int8_t *hi = a->hi + r * a->k, *lo = a->lo + r * a->k;
    for (int64_t b = 0; b < a->k / 32; b++) {
        __m256 xv[4], mx;
        for (int q = 0; q < 4; q++) xv[q] = _mm256_loadu_ps(x + 32 * b + 8 * q);
        mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, xv[0]), _mm256_andnot_ps(sign, xv[1])),
                           _mm256_max_ps(_mm256_andnot_ps(sign, xv[2]), _mm256_andnot_ps(sign, xv[3])));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
        const float amax = _mm_cvtss_f32(m4);
        const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        int s[2] = {0, 0};
        for (int q = 0; q < 4; q++) {
            const __m256 v = _mm256_mul_ps(xv[q], inv), h = _mm256_round_ps(v, R);
            __m256 l = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(v, h), _mm256_set1_ps(256.f)), R);
            l = _mm256_min_ps(_mm256_max_ps(l, _mm256_set1_ps(-127.f)), _mm256_set1_ps(127.f));
            const __m256i hq = _mm256_cvtps_epi32(h), lq = _mm256_cvtps_epi32(l);
            store8_epi8(hi + 32 * b + 8 * q, hq);
            store8_epi8(lo + 32 * b + 8 * q, lq);
            s[q / 2] += hsum8_epi32(_mm256_add_epi32(_mm256_slli_epi32(hq, 8), lq));
        }
        block_scales(amax, s, a, r, b);
    }
}
#elif EMBER_NEON
/* 4 int32 lanes (integral values within int8) to 4 bytes, in order */
static inline void store4_s8(int8_t *dst, int32x4_t v) {
    const int8x8_t b = vmovn_s16(vcombine_s16(vmovn_s32(v), vmovn_s32(v)));
    vst1_lane_s32((int32_t *)(void *)dst, vreinterpret_s32_s8(b), 0);
}

/* The scalar loop's operations, 4 lanes at a time (vrndnq rounds to nearest even, as nearbyintf) */
static void quantize_row(const float *x, const Acts *a, int64_t r) {
    int8_t *hi = a->hi + r * a->k, *lo = a->lo + r * a->k;
    for (int64_t b = 0; b < a->k / 32; b++) {
        float32x4_t xv[8], mx = vdupq_n_f32(0.f);
        for (int q = 0; q < 8; q++) {
            xv[q] = vld1q_f32(x + 32 * b + 4 * q);
            mx = vmaxq_f32(mx, vabsq_f32(xv[q]));
        }
        const float amax = vmaxvq_f32(mx);
        const float32x4_t inv = vdupq_n_f32(amax > 0.f ? 127.f / amax : 0.f);
        int s[2] = {0, 0};
        for (int q = 0; q < 8; q++) {
            const float32x4_t v = vmulq_f32(xv[q], inv), h = vrndnq_f32(v);
            float32x4_t l = vrndnq_f32(vmulq_f32(vsubq_f32(v, h), vdupq_n_f32(256.f)));
            l = vminq_f32(vmaxq_f32(l, vdupq_n_f32(-127.f)), vdupq_n_f32(127.f));
            const int32x4_t hq = vcvtq_s32_f32(h), lq = vcvtq_s32_f32(l);
            store4_s8(hi + 32 * b + 4 * q, hq);
            store4_s8(lo + 32 * b + 4 * q, lq);
            s[q / 4] += vaddvq_s32(vaddq_s32(vshlq_n_s32(hq, 8), lq));
        }
        block_scales(amax, s, a, r, b);
    }
}
#else
static void quantize_row(const float *x, const Acts *a, int64_t r) {
    int8_t *hi = a->hi + r * a->k, *lo = a->lo + r * a->k;
    for (int64_t b = 0; b < a->k / 32; b++) {
        float amax = 0.f;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(x[32 * b + i]));
        float inv = amax > 0.f ? 127.f / amax : 0.f;
        int s[2] = {0, 0};
        for (int i = 0; i < 32; i++) {
            float v = x[32 * b + i] * inv, h = nearbyintf(v), l = nearbyintf((v - h) * 256.f);
            l = l > 127.f ? 127.f : l < -127.f ? -127.f : l;
            hi[32 * b + i] = (int8_t)h;
            lo[32 * b + i] = (int8_t)l;
            s[i / 16] += 256 * (int)h + (int)l;
        }
        block_scales(amax, s, a, r, b);
    }
}
#endif

#define MR 4 /* activation rows per tile, at most */
#ifndef PF_BYTES
#define PF_BYTES 4096
#endif

#if EMBER_VNNI
/* 4 activation bytes to every lane, as one load (vbroadcastss from memory: no shuffle port) */
static inline __m512i bcast4(const int8_t *p) {
    float f;
    memcpy(&f, p, 4);
    return _mm512_castps_si512(_mm512_set1_ps(f));
}

static inline __m512 load_scales(const uint8_t *p, int f16) {
    return f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)) : _mm512_loadu_ps((const float *)p);
}

/* One panel (16 output rows) against rows m0 .. m0+mr-1. bits, group, f16 and mr are constants
 * after inlining: each format and tile height gets its own loop. */
static inline __attribute__((always_inline)) void panel_t(const int bits, const int group, const int f16, const int mr,
                                                           const uint8_t *w, int64_t ng, const Acts *a, int64_t m0,
                                                           float out[][16], const int first) {
    const int64_t gb = 16 * group * bits / 8 + 2 * 16 * (f16 ? 2 : 4), k = a->k;
    const int sb = 16 * (f16 ? 2 : 4);
    const __m512i lo4 = _mm512_set1_epi8(0x0F);
    __m512 acc[MR];
    for (int r = 0; r < mr; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *blk = w + g * gb;
        /* a panel's first pass streams its weights from memory: ask for them PF_BYTES ahead
         * (past the panel's end is the next panel, which this thread reads next); later passes
         * over the same panel find it in cache */
        if (first)
            for (int64_t off = 0; off < gb; off += 64) _mm_prefetch((const char *)blk + PF_BYTES + off, _MM_HINT_T0);
        __m512i v[8];
        if (bits == 4) {
            for (int j = 0; j < 4; j++) {
                __m512i t = _mm512_loadu_si512(blk + 64 * j);
                v[j] = _mm512_and_si512(t, lo4);
                v[j + 4] = _mm512_and_si512(_mm512_srli_epi16(t, 4), lo4);
            }
        } else {
            for (int j = 0; j < group / 4; j++) v[j] = _mm512_loadu_si512(blk + 64 * j);
        }
        const uint8_t *sc = blk + 16 * group * bits / 8;
        __m512 s = load_scales(sc, f16), mn = load_scales(sc + sb, f16);
        for (int r = 0; r < mr; r++) {
            const int64_t row = m0 + r, e = g * group;
            const int8_t *qh = a->hi + row * k + e, *ql = a->lo + row * k + e;
            /* four independent chains (integer sums are exact, so the split changes no bits):
             * one chain of dependent vpdpbusd would leave a single row waiting on latency */
            __m512i h0 = _mm512_setzero_si512(), h1 = h0, l0 = h0, l1 = h0;
            for (int j = 0; j < group / 4; j += 2) {
                h0 = _mm512_dpbusd_epi32(h0, v[j], bcast4(qh + 4 * j));
                h1 = _mm512_dpbusd_epi32(h1, v[j + 1], bcast4(qh + 4 * j + 4));
                l0 = _mm512_dpbusd_epi32(l0, v[j], bcast4(ql + 4 * j));
                l1 = _mm512_dpbusd_epi32(l1, v[j + 1], bcast4(ql + 4 * j + 4));
            }
            /* 256 * (u . hi) + u . lo, exact: |u . hi| < 2^21 */
            __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(h0, h1), 8), _mm512_add_epi32(l0, l1));
            float dx = a->d[row * (k / 32) + e / 32];
            float sx = group == 16 ? a->sx16[row * (k / 16) + g] : a->sx32[row * (k / 32) + g];
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s, _mm512_set1_ps(dx)), acc[r]);
            acc[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(sx), acc[r]);
        }
    }
    for (int r = 0; r < mr; r++) _mm512_storeu_ps(out[r], acc[r]);
}

#define PANEL_MR(B, G, H) \
    switch (mr) { \
    case 1: panel_t(B, G, H, 1, w, ng, a, m0, out, m0 == 0); break; \
    case 2: panel_t(B, G, H, 2, w, ng, a, m0, out, m0 == 0); break; \
    case 3: panel_t(B, G, H, 3, w, ng, a, m0, out, m0 == 0); break; \
    default: panel_t(B, G, H, 4, w, ng, a, m0, out, m0 == 0); break; \
    }

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
/* AMX: 16 activation rows at a time. The tiles compute the same exact integer dot products as
 * vpdpbusd (tdpbsud: signed activations x unsigned weights), and the float work after them is the
 * VNNI path's, operation for operation, so a row gets the same bits whichever path it takes:
 * batch invariance holds across the two. */
#define EMBER_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

static int amx_state = -1; /* -1: not asked yet */

/* Linux hands out AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA). */
static int amx_available(void) {
    if (amx_state < 0) amx_state = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return amx_state;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* tiles 0, 1: integer dots against hi and lo; 2, 3: hi and lo activations; 4: weights. */
static void tile_config(TileConfig *cfg, int group) {
    memset(cfg, 0, sizeof *cfg);
    cfg->palette = 1;
    cfg->rows[0] = cfg->rows[1] = 16; cfg->colsb[0] = cfg->colsb[1] = 64;
    cfg->rows[2] = cfg->rows[3] = 16; cfg->colsb[2] = cfg->colsb[3] = (uint16_t)group;
    cfg->rows[4] = (uint8_t)(group / 4); cfg->colsb[4] = 64;
}

/* Loading a configuration, and releasing it after every call, cost about 4% of a batched decode
 * step, so a thread keeps its tiles configured between calls. Another library on the same thread
 * (oneDNN, say) may have loaded its own since: reading the live configuration back is cheap, and
 * only a mismatch reloads it. */
static void amx_configure(int group) {
    TileConfig want, live;
    tile_config(&want, group);
    _tile_storeconfig(&live);
    if (memcmp(&want, &live, sizeof want)) _tile_loadconfig(&want);
}

static inline __attribute__((always_inline)) void panel_amx_t(const int bits, const int group, const int f16,
                                                               const uint8_t *w, int64_t ng, const Acts *a,
                                                               int64_t m0, float out[][16]) {
    const int64_t gb = 16 * group * bits / 8 + 2 * 16 * (f16 ? 2 : 4), k = a->k;
    const int sb = 16 * (f16 ? 2 : 4);
    const __m512i lo4 = _mm512_set1_epi8(0x0F);
    _Alignas(64) uint8_t bt[512];
    _Alignas(64) int32_t ch[256], cl[256];
    __m512 acc[16];
    for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *blk = w + g * gb;
        const int64_t e = g * group;
        if (bits == 4) { /* the 4-bit layout unpacks to exactly the tile's rows */
            for (int j = 0; j < 4; j++) {
                __m512i t = _mm512_loadu_si512(blk + 64 * j);
                _mm512_store_si512(bt + 64 * j, _mm512_and_si512(t, lo4));
                _mm512_store_si512(bt + 64 * (j + 4), _mm512_and_si512(_mm512_srli_epi16(t, 4), lo4));
            }
            _tile_loadd(4, bt, 64);
        } else {
            _tile_loadd(4, blk, 64);
        }
        _tile_zero(0);
        _tile_zero(1);
        _tile_loadd(2, a->hi + m0 * k + e, k);
        _tile_loadd(3, a->lo + m0 * k + e, k);
        _tile_dpbsud(0, 2, 4);
        _tile_dpbsud(1, 3, 4);
        _tile_stored(0, ch, 64);
        _tile_stored(1, cl, 64);
        const uint8_t *sc = blk + 16 * group * bits / 8;
        __m512 s = load_scales(sc, f16), mn = load_scales(sc + sb, f16);
        for (int r = 0; r < 16; r++) {
            const int64_t row = m0 + r;
            __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(ch + 16 * r), 8),
                                           _mm512_load_si512(cl + 16 * r));
            float dx = a->d[row * (k / 32) + e / 32];
            float sx = group == 16 ? a->sx16[row * (k / 16) + g] : a->sx32[row * (k / 32) + g];
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s, _mm512_set1_ps(dx)), acc[r]);
            acc[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(sx), acc[r]);
        }
    }
    for (int r = 0; r < 16; r++) _mm512_storeu_ps(out[r], acc[r]);
}

static void panel_amx(Fmt f, const uint8_t *w, int64_t ng, const Acts *a, int64_t m0, float out[][16]) {
    if (f.bits == 4 && f.f16) panel_amx_t(4, 32, 1, w, ng, a, m0, out);
    else if (f.bits == 4) panel_amx_t(4, 32, 0, w, ng, a, m0, out);
    else if (f.group == 32 && f.f16) panel_amx_t(8, 32, 1, w, ng, a, m0, out);
    else if (f.group == 32) panel_amx_t(8, 32, 0, w, ng, a, m0, out);
    else panel_amx_t(8, 16, 0, w, ng, a, m0, out);
}
#endif

static void panel(Fmt f, const uint8_t *w, int64_t ng, const Acts *a, int64_t m0, int mr, float out[][16]) {
    if (f.bits == 4 && f.f16) PANEL_MR(4, 32, 1)
    else if (f.bits == 4) PANEL_MR(4, 32, 0)
    else if (f.group == 32 && f.f16) PANEL_MR(8, 32, 1)
    else if (f.group == 32) PANEL_MR(8, 32, 0)
    else PANEL_MR(8, 16, 0)
}
#elif EMBER_AVX2
/* 4 activation bytes to every 32-bit lane, as one load */
static inline __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* 8 scales (rows 8h .. 8h+7 of the panel) */
static inline __m256 load_scales8(const uint8_t *p, int f16, int h) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16 * h)))
               : _mm256_loadu_ps((const float *)p + 8 * h);
}

/* Half h of one panel (output rows 8h .. 8h+7) against activation rows m0 .. m0+mr-1: the VNNI
 * path's integer dot per (row, group) and then its two FMAs, lane for lane.
 *
 * vpmaddubsw multiplies unsigned weight bytes by signed activation bytes and adds neighbours into
 * int16 with saturation, so each format is arranged to never saturate, keeping the sums exact:
 *   4-bit (u <= 15): |pair| <= 2 * 15 * 127 = 3810, and a group's eight vectors sum to at most
 *       30480 in int16 before one vpmaddwd (by 256 for hi, 1 for lo) takes them to int32;
 *   8-bit, u <= 63 (Q5_*, Q6_K): |pair| <= 16002, two vectors summed in int16 at a time;
 *   wide 8-bit (Q8_0, u = q + 128 up to 255): the product is taken as |q| * (a * sign q), both
 *       within range (|q| <= 128, |a| <= 127: |pair| <= 32512), one vector at a time, and
 *       u . a = q . a + 128 * sum(a) restores the unsigned dot exactly. */
static inline __attribute__((always_inline)) void half_t(const int bits, const int group, const int f16,
                                                          const int wide, const int mr, const uint8_t *w,
                                                          int64_t ng, const Acts *a, int64_t m0, float out[][16],
                                                          const int h, const int first) {
    const int64_t gb = 16 * group * bits / 8 + 2 * 16 * (f16 ? 2 : 4), k = a->k;
    const int sb = 16 * (f16 ? 2 : 4), nv = bits == 4 ? 8 : group / 4;
    const __m256i lo4 = _mm256_set1_epi8(0x0F), x80 = _mm256_set1_epi8((char)0x80);
    const __m256i by256 = _mm256_set1_epi16(256), by1 = _mm256_set1_epi16(1);
    __m256 acc[MR];
    for (int r = 0; r < mr; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *blk = w + g * gb;
        if (first)
            for (int64_t off = 0; off < gb; off += 64) _mm_prefetch((const char *)blk + PF_BYTES + off, _MM_HINT_T0);
        /* v[j]: this half's 8 rows, values 4j .. 4j+3 of each (as in the VNNI path's v[j]) */
        __m256i v[8];
        if (bits == 4) {
            for (int j = 0; j < 4; j++) {
                const __m256i t = _mm256_loadu_si256((const __m256i *)(blk + 64 * j + 32 * h));
                v[j] = _mm256_and_si256(t, lo4);
                v[j + 4] = _mm256_and_si256(_mm256_srli_epi16(t, 4), lo4);
            }
        } else {
            for (int j = 0; j < nv; j++) {
                v[j] = _mm256_loadu_si256((const __m256i *)(blk + 64 * j + 32 * h));
                if (wide) v[j] = _mm256_xor_si256(v[j], x80); /* q = u - 128, signed */
            }
        }
        const uint8_t *sc = blk + 16 * group * bits / 8;
        const __m256 s = load_scales8(sc, f16, h), mn = load_scales8(sc + sb, f16, h);
        for (int r = 0; r < mr; r++) {
            const int64_t row = m0 + r, e = g * group;
            const int8_t *qh = a->hi + row * k + e, *ql = a->lo + row * k + e;
            __m256i dot;
            if (bits == 4) {
                __m256i ph = _mm256_maddubs_epi16(v[0], bcast4(qh)), pl = _mm256_maddubs_epi16(v[0], bcast4(ql));
                for (int j = 1; j < 8; j++) {
                    ph = _mm256_add_epi16(ph, _mm256_maddubs_epi16(v[j], bcast4(qh + 4 * j)));
                    pl = _mm256_add_epi16(pl, _mm256_maddubs_epi16(v[j], bcast4(ql + 4 * j)));
                }
                dot = _mm256_add_epi32(_mm256_madd_epi16(ph, by256), _mm256_madd_epi16(pl, by1));
            } else if (!wide) {
                dot = _mm256_setzero_si256();
                for (int j = 0; j < nv; j += 2) {
                    const __m256i ph = _mm256_add_epi16(_mm256_maddubs_epi16(v[j], bcast4(qh + 4 * j)),
                                                        _mm256_maddubs_epi16(v[j + 1], bcast4(qh + 4 * j + 4)));
                    const __m256i pl = _mm256_add_epi16(_mm256_maddubs_epi16(v[j], bcast4(ql + 4 * j)),
                                                        _mm256_maddubs_epi16(v[j + 1], bcast4(ql + 4 * j + 4)));
                    dot = _mm256_add_epi32(dot, _mm256_add_epi32(_mm256_madd_epi16(ph, by256), _mm256_madd_epi16(pl, by1)));
                }
            } else {
                dot = _mm256_set1_epi32(128 * a->is32[row * (k / 32) + e / 32]);
                for (int j = 0; j < nv; j++) {
                    const __m256i aq = _mm256_abs_epi8(v[j]);
                    const __m256i ph = _mm256_maddubs_epi16(aq, _mm256_sign_epi8(bcast4(qh + 4 * j), v[j]));
                    const __m256i pl = _mm256_maddubs_epi16(aq, _mm256_sign_epi8(bcast4(ql + 4 * j), v[j]));
                    dot = _mm256_add_epi32(dot, _mm256_add_epi32(_mm256_madd_epi16(ph, by256), _mm256_madd_epi16(pl, by1)));
                }
            }
            const float dx = a->d[row * (k / 32) + e / 32];
            const float sx = group == 16 ? a->sx16[row * (k / 16) + g] : a->sx32[row * (k / 32) + g];
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(s, _mm256_set1_ps(dx)), acc[r]);
            acc[r] = _mm256_fmadd_ps(mn, _mm256_set1_ps(sx), acc[r]);
        }
    }
    for (int r = 0; r < mr; r++) _mm256_storeu_ps(out[r] + 8 * h, acc[r]);
}

static inline __attribute__((always_inline)) void panel_t(const int bits, const int group, const int f16,
                                                           const int wide, const int mr, const uint8_t *w,
                                                           int64_t ng, const Acts *a, int64_t m0, float out[][16]) {
    /* the second half finds the panel's weights in cache: the first streamed them */
    half_t(bits, group, f16, wide, mr, w, ng, a, m0, out, 0, m0 == 0);
    half_t(bits, group, f16, wide, mr, w, ng, a, m0, out, 1, 0);
}

#define PANEL_MR(B, G, H, W) \
    switch (mr) { \
    case 1: panel_t(B, G, H, W, 1, w, ng, a, m0, out); break; \
    case 2: panel_t(B, G, H, W, 2, w, ng, a, m0, out); break; \
    case 3: panel_t(B, G, H, W, 3, w, ng, a, m0, out); break; \
    default: panel_t(B, G, H, W, 4, w, ng, a, m0, out); break; \
    }

static void panel(Fmt f, const uint8_t *w, int64_t ng, const Acts *a, int64_t m0, int mr, float out[][16]) {
    if (f.bits == 4 && f.f16) PANEL_MR(4, 32, 1, 0)
    else if (f.bits == 4) PANEL_MR(4, 32, 0, 0)
    else if (f.wide) PANEL_MR(8, 32, 1, 1)
    else if (f.group == 32 && f.f16) PANEL_MR(8, 32, 1, 0)
    else if (f.group == 32) PANEL_MR(8, 32, 0, 0)
    else PANEL_MR(8, 16, 0, 0)
}
#elif EMBER_NEON
/* 4 scales (rows 4q .. 4q+3 of the panel) */
static inline float32x4_t load_scales4(const uint8_t *p, int f16, int q) {
    return f16 ? vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)(const void *)p + 4 * q)))
               : vld1q_f32((const float *)(const void *)p + 4 * q);
}

/* Quarter q of one panel (output rows 4q .. 4q+3) against activation rows m0 .. m0+mr-1: the VNNI
 * path's integer dot per (row, group), then its two FMAs, lane for lane. sdot multiplies signed
 * bytes: weights up to 127 (4-bit, Q5_*, Q6_K) are taken as they are; Q8_0's (u = q + 128) as
 * q = u - 128, and u . a = q . a + 128 * sum(a) restores the unsigned dot exactly. */
static inline __attribute__((always_inline)) void quarter_t(const int bits, const int group, const int f16,
                                                             const int wide, const int mr, const uint8_t *w,
                                                             int64_t ng, const Acts *a, int64_t m0, float out[][16],
                                                             const int q, const int first) {
    const int64_t gb = 16 * group * bits / 8 + 2 * 16 * (f16 ? 2 : 4), k = a->k;
    const int sb = 16 * (f16 ? 2 : 4), nv = bits == 4 ? 8 : group / 4;
    float32x4_t acc[MR];
    for (int r = 0; r < mr; r++) acc[r] = vdupq_n_f32(0.f);
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *blk = w + g * gb;
        if (first)
            for (int64_t off = 0; off < gb; off += 64) __builtin_prefetch(blk + PF_BYTES + off);
        int8x16_t v[8]; /* v[j]: this quarter's 4 rows, values 4j .. 4j+3 of each */
        if (bits == 4) {
            for (int j = 0; j < 4; j++) {
                const uint8x16_t t = vld1q_u8(blk + 64 * j + 16 * q);
                v[j] = vreinterpretq_s8_u8(vandq_u8(t, vdupq_n_u8(0x0F)));
                v[j + 4] = vreinterpretq_s8_u8(vshrq_n_u8(t, 4));
            }
        } else {
            for (int j = 0; j < nv; j++) {
                uint8x16_t t = vld1q_u8(blk + 64 * j + 16 * q);
                if (wide) t = veorq_u8(t, vdupq_n_u8(0x80));
                v[j] = vreinterpretq_s8_u8(t);
            }
        }
        const uint8_t *sc = blk + 16 * group * bits / 8;
        const float32x4_t s = load_scales4(sc, f16, q), mn = load_scales4(sc + sb, f16, q);
        for (int r = 0; r < mr; r++) {
            const int64_t row = m0 + r, e = g * group;
            const int8_t *qh = a->hi + row * k + e, *ql = a->lo + row * k + e;
            int32x4_t dh = vdupq_n_s32(0), dl = dh;
            for (int j = 0; j < nv; j++) {
                int32_t h4, l4;
                memcpy(&h4, qh + 4 * j, 4);
                memcpy(&l4, ql + 4 * j, 4);
                dh = vdotq_s32(dh, v[j], vreinterpretq_s8_s32(vdupq_n_s32(h4)));
                dl = vdotq_s32(dl, v[j], vreinterpretq_s8_s32(vdupq_n_s32(l4)));
            }
            /* 256 * (u . hi) + u . lo, exact: |u . hi| < 2^21 */
            int32x4_t dot = vaddq_s32(vshlq_n_s32(dh, 8), dl);
            if (wide) dot = vaddq_s32(dot, vdupq_n_s32(128 * a->is32[row * (k / 32) + e / 32]));
            const float dx = a->d[row * (k / 32) + e / 32];
            const float sx = group == 16 ? a->sx16[row * (k / 16) + g] : a->sx32[row * (k / 32) + g];
            acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(dot), vmulq_f32(s, vdupq_n_f32(dx)));
            acc[r] = vfmaq_f32(acc[r], mn, vdupq_n_f32(sx));
        }
    }
    for (int r = 0; r < mr; r++) vst1q_f32(out[r] + 4 * q, acc[r]);
}

static inline __attribute__((always_inline)) void panel_t(const int bits, const int group, const int f16,
                                                           const int wide, const int mr, const uint8_t *w,
                                                           int64_t ng, const Acts *a, int64_t m0, float out[][16]) {
    for (int q = 0; q < 4; q++) quarter_t(bits, group, f16, wide, mr, w, ng, a, m0, out, q, q == 0 && m0 == 0);
}

#define PANEL_MR(B, G, H, W) \
    switch (mr) { \
    case 1: panel_t(B, G, H, W, 1, w, ng, a, m0, out); break; \
    case 2: panel_t(B, G, H, W, 2, w, ng, a, m0, out); break; \
    case 3: panel_t(B, G, H, W, 3, w, ng, a, m0, out); break; \
    default: panel_t(B, G, H, W, 4, w, ng, a, m0, out); break; \
    }

static void panel(Fmt f, const uint8_t *w, int64_t ng, const Acts *a, int64_t m0, int mr, float out[][16]) {
    if (f.bits == 4 && f.f16) PANEL_MR(4, 32, 1, 0)
    else if (f.bits == 4) PANEL_MR(4, 32, 0, 0)
    else if (f.wide) PANEL_MR(8, 32, 1, 1)
    else if (f.group == 32 && f.f16) PANEL_MR(8, 32, 1, 0)
    else if (f.group == 32) PANEL_MR(8, 32, 0, 0)
    else PANEL_MR(8, 16, 0, 0)
}
#else
static float scale_at(const uint8_t *p, int f16, int n) {
    if (f16) return h2f(p + 2 * n);
    float x;
    memcpy(&x, p + 4 * n, 4);
    return x;
}

static void panel(Fmt f, const uint8_t *w, int64_t ng, const Acts *a, int64_t m0, int mr, float out[][16]) {
    const int64_t gb = group_bytes(f), k = a->k;
    const int sb = 16 * (f.f16 ? 2 : 4);
    for (int r = 0; r < mr; r++) {
        const int64_t row = m0 + r;
        for (int n = 0; n < 16; n++) out[r][n] = 0.f;
        for (int64_t g = 0; g < ng; g++) {
            const uint8_t *blk = w + g * gb, *sc = blk + 16 * f.group * f.bits / 8;
            const int64_t e = g * f.group;
            const int8_t *qh = a->hi + row * k + e, *ql = a->lo + row * k + e;
            float dx = a->d[row * (k / 32) + e / 32];
            float sx = f.group == 16 ? a->sx16[row * (k / 16) + g] : a->sx32[row * (k / 32) + g];
            for (int n = 0; n < 16; n++) {
                int32_t dot = 0;
                for (int i = 0; i < f.group; i++) {
                    int u;
                    if (f.bits == 4) {
                        int j = i % 16, byte = blk[64 * (j / 4) + 4 * n + j % 4];
                        u = i < 16 ? byte & 0xF : byte >> 4;
                    } else {
                        u = blk[64 * (i / 4) + 4 * n + i % 4];
                    }
                    dot += u * (256 * qh[i] + ql[i]);
                }
                out[r][n] = fmaf((float)dot, scale_at(sc, f.f16, n) * dx, out[r][n]);
                out[r][n] = fmaf(scale_at(sc + sb, f.f16, n), sx, out[r][n]);
            }
        }
    }
}
#endif

#ifndef EMBER_AMX
static int amx_available(void) { return 0; }
#endif
/* whether 16-row tiles run on AMX here (compiled in, and the kernel granted the tile state) */
int ember_qmm_amx(void) { return amx_available(); }

/* y[M, N] (row stride ldy) = x[M, K] (row stride ldx) @ W.T (+ bias), W the concatenation along
 * the output dimension of nparts repacked matrices (types[p], data[p], ns[p] rows of K values).
 * Returns 0, or -1 when out of memory, -2 for an unsupported type or shape. */
int ember_qlinear(int nparts, const int *types, const void *const *data, const int64_t *ns, int64_t K,
                  const float *x, int64_t ldx, int64_t M, float *y, int64_t ldy, const float *bias, int threads) {
    if (K % 32 || K < 32 || nparts < 1 || nparts > 64 || M < 0) return -2;
    for (int p = 0; p < nparts; p++)
        if (ember_repacked_size(types[p], ns[p], K) < 0) return -2;
    if (M == 0) return 0;
    Acts a;
    a.k = K;
    a.hi = malloc((size_t)(M * K));
    a.lo = malloc((size_t)(M * K));
    a.d = malloc(sizeof(float) * (size_t)(M * K / 32));
    a.sx32 = malloc(sizeof(float) * (size_t)(M * K / 32));
    a.sx16 = malloc(sizeof(float) * (size_t)(M * K / 16));
    a.is32 = malloc(sizeof(int32_t) * (size_t)(M * K / 32));
    if (!a.hi || !a.lo || !a.d || !a.sx32 || !a.sx16 || !a.is32) {
        free(a.hi); free(a.lo); free(a.d); free(a.sx32); free(a.sx16); free(a.is32);
        return -1;
    }
    if (threads < 1) threads = 1;

    int64_t first[64 + 1], col[64];
    first[0] = 0;
    for (int p = 0; p < nparts; p++) {
        first[p + 1] = first[p] + (ns[p] + 15) / 16;
        col[p] = p ? col[p - 1] + ns[p - 1] : 0;
    }
    const int64_t panels = first[nparts];
#ifdef EMBER_AMX
    const int use_amx = M >= 16 && amx_enabled && amx_available();
#endif

    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < M; r++)
            quantize_row(x + r * ldx, &a, r);
#ifdef EMBER_AMX
        int tiles = 0; /* the group size this call has checked the tiles for; 0: none */
#endif
        /* dynamic: when another busy thread (a server's event loop) takes a core for a while, the
         * other kernel thread picks up the panels instead of waiting at the end; a panel's result
         * does not depend on which thread computes it */
        #pragma omp for schedule(dynamic, 2)
        for (int64_t pi = 0; pi < panels; pi++) {
            int p = 0;
            while (pi >= first[p + 1]) p++;
            const Fmt f = fmt_of(types[p]);
            const int64_t ng = K / f.group, n0 = (pi - first[p]) * 16;
            const int nr = ns[p] - n0 < 16 ? (int)(ns[p] - n0) : 16;
            const uint8_t *w = (const uint8_t *)data[p] + (pi - first[p]) * ng * group_bytes(f);
            float out[16][16];
            for (int64_t m0 = 0; m0 < M;) {
                int mr = M - m0 < MR ? (int)(M - m0) : MR;
#ifdef EMBER_AMX
                if (use_amx && M - m0 >= 16) {
                    if (tiles != f.group) amx_configure(tiles = f.group);
                    panel_amx(f, w, ng, &a, m0, out);
                    mr = 16;
                } else
#endif
                    panel(f, w, ng, &a, m0, mr, out);
                for (int r = 0; r < mr; r++) {
                    float *yr = y + (m0 + r) * ldy + col[p] + n0;
                    for (int n = 0; n < nr; n++) yr[n] = bias ? out[r][n] + bias[col[p] + n0 + n] : out[r][n];
                }
                m0 += mr;
            }
        }
    }
    free(a.hi); free(a.lo); free(a.d); free(a.sx32); free(a.sx16); free(a.is32);
    return 0;
}

/* A layer's fixed arguments, kept on the C side: a decode step calls each layer once per token,
 * and converting a dozen Python arguments per call costs more than a small matmul. */
typedef struct {
    int nparts, threads;
    int types[64];
    const void *data[64];
    int64_t ns[64], K, N;
    const float *bias;
} QLinear;

void *ember_qlinear_new(int nparts, const int *types, const void *const *data, const int64_t *ns, int64_t K,
                        const float *bias, int threads) {
    if (nparts < 1 || nparts > 64) return NULL;
    QLinear *h = calloc(1, sizeof(QLinear));
    if (!h) return NULL;
    h->nparts = nparts;
    h->threads = threads;
    h->K = K;
    h->bias = bias;
    for (int p = 0; p < nparts; p++) {
        h->types[p] = types[p];
        h->data[p] = data[p];
        h->ns[p] = ns[p];
        h->N += ns[p];
    }
    return h;
}

/* y[M, N] (contiguous) = x[M, K] (row stride ldx) @ W.T (+ bias) */
int ember_qlinear_run(const void *handle, const float *x, int64_t ldx, int64_t M, float *y) {
    const QLinear *h = handle;
    return ember_qlinear(h->nparts, h->types, h->data, h->ns, h->K, x, ldx, M, y, h->N, h->bias, h->threads);
}

void ember_qlinear_free(void *handle) { free(handle); }
