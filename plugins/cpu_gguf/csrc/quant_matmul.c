/* Quantized linear layers: y = x @ W.T with W kept in 4 or 8 bits and x quantized per row.
 *
 * Weights are repacked once, at load, from their GGUF blocks into panels of 16 output rows, at
 * exactly the file's size. Every supported type is, exactly, w = s * u + m per group of 32 values
 * (16 for Q6_K): u an unsigned 4-bit (Q4_0, Q4_1, Q4_K), 5-bit (Q5_0, Q5_1, Q5_K), 6-bit (Q6_K) or
 * 8-bit (Q8_0) integer, s and m floats (a zero point z becomes m = -z * s). Within a panel, a
 * group's integers are interleaved so that one 64-byte vector holds 4 consecutive values of each of
 * the 16 rows: vpdpbusd (u8 x s8 -> s32) against 4 broadcast activation bytes advances all 16 rows
 * at once, and the group's scales are applied once per group to 16 rows. The 5- and 6-bit integers
 * are a 4-bit plane and a plane of their high bits; scales stay as the file has them (float16, and
 * the K-quants' 6- or 8-bit sub-block scales under float16 super-block scales), the kernels making
 * the same float products of them that dequantization makes.
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
enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13,
       T_Q6_K = 14 };
/* ember's own: w = s * u + m per 32 values with float32 s and m, u of 4 or 8 bits, what AWQ, GPTQ and
 * compressed-tensors' integer weights are (ember.quant.grouped), built by ember_repack_grouped */
enum { T_G4 = 256 + 4, T_G8 = 256 + 8 };
static int grouped_type(int t) { return t == T_G4 || t == T_G8; }

static int block_bytes(int t) {
    switch (t) {
    case T_Q4_0: return 18; case T_Q4_1: return 20; case T_Q5_0: return 22; case T_Q5_1: return 24;
    case T_Q8_0: return 34; case T_Q2_K: return 84; case T_Q3_K: return 110; case T_Q4_K: return 144;
    case T_Q5_K: return 176; case T_Q6_K: return 210;
    default: return 0;
    }
}
static int block_values(int t) { return t >= T_Q2_K ? 256 : 32; }

static float h2f(const uint8_t *p);
#include "float_matmul.h"

int ember_qmm_supported(int t) { return block_bytes(t) > 0 || float_type(t) || grouped_type(t); }
int ember_qmm_vectorized(void) { return EMBER_VNNI || EMBER_AVX2 || EMBER_NEON; }
/* the inner loop this build runs: "avx512-vnni", "avx2", "neon" or "scalar" */
const char *ember_qmm_path(void) {
    return EMBER_VNNI ? "avx512-vnni" : EMBER_AVX2 ? "avx2" : EMBER_NEON ? "neon" : "scalar";
}

static int amx_enabled = 1; /* the tests turn it off to compare the paths */
void ember_qmm_set_amx(int on) { amx_enabled = on; }
static int amx_available(void);

static float h2f(const uint8_t *p) { /* exact */
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
 * One chunk of a row in its GGUF blocks, decoded for the repacker: values 64c .. 64c+63 as the
 * unsigned integers u of w = s * u + m (the scales are copied from the blocks' own bytes, see
 * ember_repack). `half` set: only the first 32 values exist (a row of 32 * odd length); the rest
 * read as zero.
 * ------------------------------------------------------------------------------------------- */
static void chunk_ints(int t, const uint8_t *row, int64_t c, int half, uint8_t u[64]) {
    memset(u, 0, 64);
    if (t < T_Q2_K) {
        for (int b = 0; b < (half ? 1 : 2); b++) {
            const uint8_t *p = row + (2 * c + b) * block_bytes(t);
            const uint8_t *qs;
            uint32_t qh = 0;
            switch (t) {
            case T_Q4_0: qs = p + 2; break;
            case T_Q4_1: qs = p + 4; break;
            case T_Q5_0: memcpy(&qh, p + 2, 4); qs = p + 6; break;
            case T_Q5_1: memcpy(&qh, p + 4, 4); qs = p + 8; break;
            default: qs = p + 2; break; /* Q8_0: u = q + 128 */
            }
            for (int i = 0; i < 32; i++) {
                int v;
                if (t == T_Q8_0) v = (int)(int8_t)qs[i] + 128;
                else v = (i < 16 ? qs[i] & 0xF : qs[i - 16] >> 4) | (((qh >> i) & 1) << 4);
                u[32 * b + i] = (uint8_t)v;
            }
        }
        return;
    }
    const uint8_t *p = row + (c / 4) * block_bytes(t);
    const int j = (int)(c % 4);
    if (t == T_Q2_K || t == T_Q3_K) { /* value v of the block: bits 2s of byte 32h + l, v = 128h + 32s + l */
        const uint8_t *qs = p + (t == T_Q2_K ? 16 : 32), *hmask = p;
        for (int i = 0; i < 64; i++) {
            const int v = 64 * j + i, h = v / 128, sh = (v % 128) / 32, l = v % 32;
            int q = (qs[32 * h + l] >> (2 * sh)) & 3;
            if (t == T_Q3_K) q |= ((hmask[l] >> (v / 32)) & 1) << 2; /* u = q + 4 * bit: w = s * (u - 4) */
            u[i] = (uint8_t)q;
        }
    } else if (t == T_Q6_K) {
        const uint8_t *ql = p + 64 * (j / 2), *qh = p + 128 + 32 * (j / 2);
        const int sh = 4 * (j % 2);
        for (int l = 0; l < 32; l++) {
            u[l] = (uint8_t)(((ql[l] >> sh) & 0xF) | (((qh[l] >> (2 * (j % 2) * 2)) & 3) << 4));
            u[32 + l] = (uint8_t)(((ql[32 + l] >> sh) & 0xF) | (((qh[l] >> (2 * (j % 2) * 2 + 2)) & 3) << 4));
        }
    } else if (t == T_Q4_K) {
        const uint8_t *qs = p + 16 + 32 * j;
        for (int l = 0; l < 32; l++) { u[l] = qs[l] & 0xF; u[32 + l] = qs[l] >> 4; }
    } else { /* Q5_K */
        const uint8_t *qh = p + 16, *qs = p + 48 + 32 * j;
        for (int l = 0; l < 32; l++) {
            u[l] = (uint8_t)((qs[l] & 0xF) | (((qh[l] >> (2 * j)) & 1) << 4));
            u[32 + l] = (uint8_t)((qs[l] >> 4) | (((qh[l] >> (2 * j + 1)) & 1) << 4));
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Repacked layout: every type at its file's size. Per panel of 16 rows the integers of each group
 * of 32 values come as planes, where u[n][i] is value i of row n:
 *   nibble plane (4-, 5- and 6-bit types): 4 vectors of 64 bytes,
 *       byte 4n+i of vector j = (u[n][4j+i] & 15) | (u[n][16+4j+i] & 15) << 4
 *       (unpacked, its low and high nibbles are the vectors v[j] and v[j+4]: v[J] holds values
 *       4J .. 4J+3 of each row, as vpdpbusd and sdot want them);
 *   high plane, 1 bit (5-bit types): 1 vector, bit t of byte 4n+i = bit 4 of u[n][4t+i];
 *   high plane, 2 bits (Q6_K): 2 vectors, bits 2t..2t+1 of byte 4n+i of vector p = bits 4..5 of
 *       u[n][4(4p+t)+i];
 *   byte plane (Q8_0): 8 vectors, byte 4n+i of vector j = u[n][4j+i];
 *   2-bit plane (Q2_K, Q3_K): 2 vectors, bits 2t..2t+1 of byte 4n+i of vector p = bits 0..1 of
 *       u[n][4(4p+t)+i], then for Q3_K a 1-bit plane of bit 2 as the 5-bit types' high plane.
 * Scales, per format:
 *   legacy (Q4_0 .. Q8_0), after each group's integers: 16 float16 s[n], then for Q4_1 and Q5_1 16
 *       float16 minimums m[n]; the zero-point types' m = -z s is computed, not stored;
 *   grouped (T_G4, T_G8), after each group's integers: 16 float32 s[n], then 16 float32 m[n];
 *   Q4_K and Q5_K, after each super-block's 8 groups: the file's 12 scale bytes of each row,
 *       transposed (byte b of row n at 16b + n), then 16 float16 d, then 16 float16 dmin: the
 *       kernels unpack the 6-bit scales and minimums as the file's readers do;
 *   Q6_K, after each super-block: its 16 int8 scales per row, transposed, then 16 float16 d;
 *   Q2_K: its 16 scale bytes (4-bit scale, 4-bit minimum) per row, transposed, then d and dmin;
 *   Q3_K: its 12 bytes of 6-bit scales per row, transposed, then d (the zero point is 4).
 * The floats the kernels compute from these (s = d * sc, m = -(dmin * mn), m = 0 - z * s) are the
 * same operations the file's dequantization makes, so every path multiplies the same numbers.
 * ------------------------------------------------------------------------------------------- */
enum { SC_F16, SC_F16Z, SC_F32, SC_K4, SC_K6, SC_K2, SC_K3 };
enum { EMBER_QMM_ONE_TERM = 1 }; /* ember_qlinear's flags */
typedef struct {
    int bits; /* 4, 5, 6 or 8 */
    int scales; /* SC_*: how s and m are stored */
    int z; /* the zero point of SC_F16Z and SC_K6: m = 0 - z * s */
    int sub; /* values per scale: 32, or 16 (Q6_K) */
    int terms; /* the activation terms multiplied, set by fmt_for: 1 (hi) or 2 (hi and lo; see Activations) */
} Fmt;

static Fmt fmt_of(int t) {
    switch (t) {
    case T_Q4_0: return (Fmt){4, SC_F16Z, 8, 32};
    case T_Q4_1: return (Fmt){4, SC_F16, 0, 32};
    case T_Q5_0: return (Fmt){5, SC_F16Z, 16, 32};
    case T_Q5_1: return (Fmt){5, SC_F16, 0, 32};
    case T_Q8_0: return (Fmt){8, SC_F16Z, 128, 32};
    case T_G4: return (Fmt){4, SC_F32, 0, 32};
    case T_G8: return (Fmt){8, SC_F32, 0, 32};
    case T_Q4_K: return (Fmt){4, SC_K4, 0, 32};
    case T_Q5_K: return (Fmt){5, SC_K4, 0, 32};
    case T_Q2_K: return (Fmt){2, SC_K2, 0, 16};
    case T_Q3_K: return (Fmt){3, SC_K3, 4, 16};
    default: return (Fmt){6, SC_K6, 32, 16}; /* Q6_K */
    }
}

/* The format a layer's part runs in: two activation terms, or one where the layer asks for it
 * (EMBER_QMM_ONE_TERM, the --int8-activations option) */
static Fmt fmt_for(int t, int flags) {
    Fmt f = fmt_of(t);
    f.terms = flags & EMBER_QMM_ONE_TERM ? 1 : 2;
    return f;
}
static int is_k(Fmt f) { return f.scales >= SC_K4; }
/* bytes of one group's integers for 16 rows */
static int64_t int_bytes(Fmt f) { return f.bits == 8 ? 512 : f.bits >= 4 ? 256 + 64 * (f.bits - 4) : 128 + 64 * (f.bits - 2); }
/* bytes of a legacy group's scales, or a super-block's */
static int64_t scale_bytes(Fmt f) {
    switch (f.scales) {
    case SC_F16: return 64;
    case SC_F16Z: return 32;
    case SC_F32: return 128;
    case SC_K4: return 16 * 12 + 64;
    case SC_K2: return 16 * 16 + 64;
    case SC_K3: return 16 * 12 + 32;
    default: return 16 * 16 + 32;
    }
}
/* a panel's bytes for K values */
static int64_t panel_bytes(Fmt f, int64_t K) {
    return is_k(f) ? K / 256 * (8 * int_bytes(f) + scale_bytes(f)) : K / 32 * (int_bytes(f) + scale_bytes(f));
}
/* where group g's integers start, and where the scales that serve it start */
static inline const uint8_t *group_ints(Fmt f, const uint8_t *w, int64_t g) {
    return is_k(f) ? w + g / 8 * (8 * int_bytes(f) + scale_bytes(f)) + g % 8 * int_bytes(f)
                   : w + g * (int_bytes(f) + scale_bytes(f));
}
static inline const uint8_t *group_scales(Fmt f, const uint8_t *w, int64_t g) {
    return is_k(f) ? w + g / 8 * (8 * int_bytes(f) + scale_bytes(f)) + 8 * int_bytes(f)
                   : w + g * (int_bytes(f) + scale_bytes(f)) + int_bytes(f);
}

/* bytes of the repacked matrix: N rows padded to whole panels */
int64_t ember_repacked_size(int t, int64_t N, int64_t K) {
    if (float_type(t)) /* rows as the file has them (FP8: then their scales) */
        return K % 32 || N < 1 || K % f8_block(t, K) ? -1 : float_matrix_bytes(t, N, K);
    if (grouped_type(t)) return K % 32 || N < 1 ? -1 : (N + 15) / 16 * panel_bytes(fmt_of(t), K);
    if (!block_bytes(t) || K % block_values(t) || N < 1) return -1;
    return (N + 15) / 16 * panel_bytes(fmt_of(t), K);
}

/* Row n's 32 values uu of one group into the group's planes (which start zeroed) */
static void put_ints(Fmt f, uint8_t *ints, int n, const uint8_t *uu) {
    if (f.bits == 8) {
        for (int j = 0; j < 8; j++)
            for (int i = 0; i < 4; i++) ints[64 * j + 4 * n + i] = uu[4 * j + i];
    } else if (f.bits < 4) {
        for (int J = 0; J < 8; J++)
            for (int i = 0; i < 4; i++) {
                ints[64 * (J / 4) + 4 * n + i] |= (uint8_t)((uu[4 * J + i] & 3) << 2 * (J % 4));
                if (f.bits == 3) ints[128 + 4 * n + i] |= (uint8_t)(((uu[4 * J + i] >> 2) & 1) << J);
            }
    } else {
        for (int j = 0; j < 4; j++)
            for (int i = 0; i < 4; i++)
                ints[64 * j + 4 * n + i] = (uint8_t)((uu[4 * j + i] & 15) | (uu[16 + 4 * j + i] & 15) << 4);
        for (int J = 0; J < 8 && f.bits > 4; J++) /* the high plane of 5- and 6-bit types */
            for (int i = 0; i < 4; i++) {
                const int hb = uu[4 * J + i] >> 4;
                if (f.bits == 5) ints[256 + 4 * n + i] |= (uint8_t)((hb & 1) << J);
                else ints[256 + 64 * (J / 4) + 4 * n + i] |= (uint8_t)((hb & 3) << 2 * (J % 4));
            }
    }
}

/* Repack a grouped matrix (T_G4 or T_G8): u[N][K] its unsigned integers, one per byte (below 16 for
 * T_G4), s and m [N][K/32] the float32 scale and minimum of each row's groups of 32, w = s * u + m.
 * Returns 0, or -2 for an unsupported type or shape, -3 for an integer out of range. */
int ember_repack_grouped(int t, const uint8_t *u, const float *s, const float *m, int64_t N, int64_t K, uint8_t *dst,
                         int threads) {
    if (!grouped_type(t) || ember_repacked_size(t, N, K) < 0) return -2;
    const Fmt f = fmt_of(t);
    const int64_t pb = panel_bytes(f, K), panels = (N + 15) / 16;
    if (f.bits == 4)
        for (int64_t i = 0; i < N * K; i++)
            if (u[i] > 15) return -3;
    memset(dst, 0, (size_t)(panels * pb));
    #pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        uint8_t *w = dst + p * pb;
        for (int n = 0; n < 16 && 16 * p + n < N; n++) {
            const int64_t row = 16 * p + n;
            for (int64_t g = 0; g < K / 32; g++) {
                put_ints(f, (uint8_t *)group_ints(f, w, g), n, u + row * K + 32 * g);
                uint8_t *sc = (uint8_t *)group_scales(f, w, g);
                memcpy(sc + 4 * n, s + row * (K / 32) + g, 4);
                memcpy(sc + 64 + 4 * n, m + row * (K / 32) + g, 4);
            }
        }
    }
    return 0;
}

/* Repack N rows of GGUF blocks (row after row) into dst (ember_repacked_size bytes, which is what the
 * file holds for them, padded to 16 rows). Returns 0, or -2 for an unsupported type or shape. */
int ember_repack(int t, const uint8_t *src, int64_t N, int64_t K, uint8_t *dst, int threads) {
    if (ember_repacked_size(t, N, K) < 0 || grouped_type(t)) return -2; /* grouped: ember_repack_grouped */
    if (float_type(t)) {
        memcpy(dst, src, (size_t)ember_repacked_size(t, N, K));
        return 0;
    }
    const Fmt f = fmt_of(t);
    const int64_t rb = K / block_values(t) * block_bytes(t), pb = panel_bytes(f, K);
    const int64_t panels = (N + 15) / 16;
    memset(dst, 0, (size_t)(panels * pb)); /* padding rows: zero integers and scales */
    #pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        uint8_t *w = dst + p * pb;
        for (int n = 0; n < 16 && 16 * p + n < N; n++) {
            const uint8_t *row = src + (16 * p + n) * rb;
            for (int64_t c = 0; c < (K + 63) / 64; c++) {
                uint8_t u[64];
                chunk_ints(t, row, c, 64 * c + 64 > K, u);
                for (int gi = 0; gi < 2 && c * 64 + gi * 32 < K; gi++) {
                    const int64_t g = 2 * c + gi;
                    put_ints(f, (uint8_t *)group_ints(f, w, g), n, u + 32 * gi);
                    if (!is_k(f)) { /* legacy: float16 s (and m), exact: they came from float16 */
                        uint8_t *sc = (uint8_t *)group_scales(f, w, g);
                        const uint8_t *blk = row + g * block_bytes(t);
                        memcpy(sc + 2 * n, blk, 2);
                        if (f.scales == SC_F16) memcpy(sc + 32 + 2 * n, blk + 2, 2);
                    }
                }
            }
            for (int64_t sb = 0; is_k(f) && sb < K / 256; sb++) { /* the file's scale bytes */
                const uint8_t *blk = row + sb * block_bytes(t);
                uint8_t *sc = (uint8_t *)group_scales(f, w, 8 * sb);
                if (f.scales == SC_K4) {
                    for (int b = 0; b < 12; b++) sc[16 * b + n] = blk[4 + b];
                    memcpy(sc + 192 + 2 * n, blk, 2);
                    memcpy(sc + 224 + 2 * n, blk + 2, 2);
                } else if (f.scales == SC_K2) {
                    for (int b = 0; b < 16; b++) sc[16 * b + n] = blk[b];
                    memcpy(sc + 256 + 2 * n, blk + 80, 2);
                    memcpy(sc + 288 + 2 * n, blk + 82, 2);
                } else if (f.scales == SC_K3) {
                    for (int b = 0; b < 12; b++) sc[16 * b + n] = blk[96 + b];
                    memcpy(sc + 192 + 2 * n, blk + 108, 2);
                } else {
                    for (int b = 0; b < 16; b++) sc[16 * b + n] = blk[192 + b];
                    memcpy(sc + 256 + 2 * n, blk + 208, 2);
                }
            }
        }
    }
    return 0;
}

/* The float scale and minimum of row n for group g (sub-group `half` of Q6_K's 16-value scales):
 * the per-lane steps every path's vector code repeats. */
static inline void lane_scales(Fmt f, const uint8_t *sc, int64_t g, int half, int n, float *s, float *m) {
    switch (f.scales) {
    case SC_F16: *s = h2f(sc + 2 * n); *m = h2f(sc + 32 + 2 * n); break;
    case SC_F32: memcpy(s, sc + 4 * n, 4); memcpy(m, sc + 64 + 4 * n, 4); break;
    case SC_F16Z: *s = h2f(sc + 2 * n); *m = 0.f - (float)f.z * *s; break;
    case SC_K4: {
        uint8_t q[12];
        for (int b = 0; b < 12; b++) q[b] = sc[16 * b + n];
        int scv, mv;
        k4_scale_min((int)(g % 8), q, &scv, &mv);
        *s = h2f(sc + 192 + 2 * n) * (float)scv;
        *m = -(h2f(sc + 224 + 2 * n) * (float)mv);
        break;
    }
    case SC_K2: {
        const int b = sc[16 * (2 * (g % 8) + half) + n];
        *s = h2f(sc + 256 + 2 * n) * (float)(b & 15);
        *m = -(h2f(sc + 288 + 2 * n) * (float)(b >> 4));
        break;
    }
    case SC_K3: {
        const int j = (int)(2 * (g % 8) + half);
        const int lo = j < 8 ? sc[16 * j + n] & 15 : sc[16 * (j - 8) + n] >> 4;
        const int hi = (sc[16 * (8 + j % 4) + n] >> (2 * (j / 4))) & 3;
        *s = h2f(sc + 192 + 2 * n) * (float)((lo | hi << 4) - 32);
        *m = 0.f - (float)f.z * *s;
        break;
    }
    default: /* SC_K6 */
        *s = h2f(sc + 256 + 2 * n) * (float)(int8_t)sc[16 * (2 * (g % 8) + half) + n];
        *m = 0.f - (float)f.z * *s;
    }
}

/* ---------------------------------------------------------------------------------------------
 * Activations, in two int8 terms (or one, where a layer asks): per group of 32, with
 * e = max|x| / 127,
 *     hi = round(x / e),  lo = round(256 * (x / e - hi))  (clamped to +-127),
 *     two terms:  x ~ d * (256 * hi + lo),   one term:  x ~ d * 256 * hi,   d = e / 256.
 * One int8 term (llama.cpp's q8 activations) leaves about 0.5% noise on every activation, which
 * compounds over the layers: on SmolLM2 it costs 0.2 to 1% perplexity, and greedy outputs leave
 * the float reference's within 16 tokens on 2 to 4 of 8 prompts (against 0 or 1 with two terms).
 * The second term brings it to about 16-bit precision for twice the integer dot products and no
 * more weight bytes, so it is the default; EMBER_QMM_ONE_TERM (--int8-activations) trades the
 * precision for speed. Row r -> hi[K], lo[K] int8, d[K/32], and the sums of x the minimum terms
 * multiply, per 16 and per 32 values (sx*: both terms, sh*: hi only).
 * ------------------------------------------------------------------------------------------- */
typedef struct {
    int8_t *hi, *lo;
    float *d, *sx16, *sx32, *sh16, *sh32;
    /* the integer sums per 32 of 256 * hi + lo, and of 256 * hi (the signed 8-bit dots of the
     * AVX2 and NEON paths need them for Q8_0) */
    int32_t *is32, *ih32;
    int64_t k;
} Acts;

/* A block's scale, and its two halves' and whole's sums of 256 * hi + lo times it (the weights'
 * offsets multiply these). */
static inline void block_scales(float amax, const int s[2], const int h[2], const Acts *a, int64_t r, int64_t b) {
    const float scale = amax / 127.f / 256.f;
    const int64_t k = a->k;
    a->d[r * (k / 32) + b] = scale;
    a->sx16[r * (k / 16) + 2 * b] = scale * (float)s[0];
    a->sx16[r * (k / 16) + 2 * b + 1] = scale * (float)s[1];
    a->sx32[r * (k / 32) + b] = scale * (float)(s[0] + s[1]);
    a->is32[r * (k / 32) + b] = s[0] + s[1];
    a->sh16[r * (k / 16) + 2 * b] = scale * (float)(256 * h[0]);
    a->sh16[r * (k / 16) + 2 * b + 1] = scale * (float)(256 * h[1]);
    a->sh32[r * (k / 32) + b] = scale * (float)(256 * (h[0] + h[1]));
    a->ih32[r * (k / 32) + b] = 256 * (h[0] + h[1]);
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
        int s[2], hs[2];
        for (int half = 0; half < 2; half++) {
            const __m512 v = _mm512_mul_ps(half ? x1 : x0, inv), h = _mm512_roundscale_ps(v, R);
            __m512 l = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(v, h), _mm512_set1_ps(256.f)), R);
            l = _mm512_min_ps(_mm512_max_ps(l, _mm512_set1_ps(-127.f)), _mm512_set1_ps(127.f));
            const __m512i hq = _mm512_cvtps_epi32(h), lq = _mm512_cvtps_epi32(l);
            _mm_storeu_si128((__m128i *)(hi + 32 * b + 16 * half), _mm512_cvtepi32_epi8(hq));
            _mm_storeu_si128((__m128i *)(lo + 32 * b + 16 * half), _mm512_cvtepi32_epi8(lq));
            s[half] = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(hq, 8), lq));
            hs[half] = _mm512_reduce_add_epi32(hq);
        }
        block_scales(amax, s, hs, a, r, b);
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
        int s[2] = {0, 0}, hs[2] = {0, 0};
        for (int q = 0; q < 4; q++) {
            const __m256 v = _mm256_mul_ps(xv[q], inv), h = _mm256_round_ps(v, R);
            __m256 l = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(v, h), _mm256_set1_ps(256.f)), R);
            l = _mm256_min_ps(_mm256_max_ps(l, _mm256_set1_ps(-127.f)), _mm256_set1_ps(127.f));
            const __m256i hq = _mm256_cvtps_epi32(h), lq = _mm256_cvtps_epi32(l);
            store8_epi8(hi + 32 * b + 8 * q, hq);
            store8_epi8(lo + 32 * b + 8 * q, lq);
            s[q / 2] += hsum8_epi32(_mm256_add_epi32(_mm256_slli_epi32(hq, 8), lq));
            hs[q / 2] += hsum8_epi32(hq);
        }
        block_scales(amax, s, hs, a, r, b);
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
        int s[2] = {0, 0}, hs[2] = {0, 0};
        for (int q = 0; q < 8; q++) {
            const float32x4_t v = vmulq_f32(xv[q], inv), h = vrndnq_f32(v);
            float32x4_t l = vrndnq_f32(vmulq_f32(vsubq_f32(v, h), vdupq_n_f32(256.f)));
            l = vminq_f32(vmaxq_f32(l, vdupq_n_f32(-127.f)), vdupq_n_f32(127.f));
            const int32x4_t hq = vcvtq_s32_f32(h), lq = vcvtq_s32_f32(l);
            store4_s8(hi + 32 * b + 4 * q, hq);
            store4_s8(lo + 32 * b + 4 * q, lq);
            s[q / 4] += vaddvq_s32(vaddq_s32(vshlq_n_s32(hq, 8), lq));
            hs[q / 4] += vaddvq_s32(hq);
        }
        block_scales(amax, s, hs, a, r, b);
    }
}
#else
static void quantize_row(const float *x, const Acts *a, int64_t r) {
    int8_t *hi = a->hi + r * a->k, *lo = a->lo + r * a->k;
    for (int64_t b = 0; b < a->k / 32; b++) {
        float amax = 0.f;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(x[32 * b + i]));
        float inv = amax > 0.f ? 127.f / amax : 0.f;
        int s[2] = {0, 0}, hs[2] = {0, 0};
        for (int i = 0; i < 32; i++) {
            float v = x[32 * b + i] * inv, h = nearbyintf(v), l = nearbyintf((v - h) * 256.f);
            l = l > 127.f ? 127.f : l < -127.f ? -127.f : l;
            hi[32 * b + i] = (int8_t)h;
            lo[32 * b + i] = (int8_t)l;
            s[i / 16] += 256 * (int)h + (int)l;
            hs[i / 16] += (int)h;
        }
        block_scales(amax, s, hs, a, r, b);
    }
}
#endif

#define MR 4 /* activation rows per tile, at most */
#ifndef CHUNK_DIV
#define CHUNK_DIV 4 /* chunks of panels per thread and call (see ember_qlinear) */
#endif
#ifndef PF_BYTES
#define PF_BYTES 8192
#endif

/* The activation sums a group's minimum term multiplies: per 32 values, or per 16 (Q6_K), of the
 * terms the format multiplies */
static inline float act_sum(const Acts *a, int64_t row, int64_t g, int sub, int t, int terms) {
    if (terms == 2) return sub == 16 ? a->sx16[row * (a->k / 16) + 2 * g + t] : a->sx32[row * (a->k / 32) + g];
    return sub == 16 ? a->sh16[row * (a->k / 16) + 2 * g + t] : a->sh32[row * (a->k / 32) + g];
}
/* 128 * the integer sum of the multiplied terms (u . a = q . a + 128 * sum(a) for Q8_0's q = u - 128) */
static inline int32_t q8_offset(const Acts *a, int64_t row, int64_t g, int terms) {
    return 128 * (terms == 2 ? a->is32 : a->ih32)[row * (a->k / 32) + g];
}

/* Every format's constants, for code specialised per format and activation terms: X(bits, scales,
 * z, sub, terms) must be a statement. */
#define FORMATS_T(X, T) \
    if (f.bits == 4 && f.scales == SC_F16Z) X(4, SC_F16Z, 8, 32, T) \
    else if (f.bits == 4 && f.scales == SC_F16) X(4, SC_F16, 0, 32, T) \
    else if (f.bits == 5 && f.scales == SC_F16Z) X(5, SC_F16Z, 16, 32, T) \
    else if (f.bits == 5 && f.scales == SC_F16) X(5, SC_F16, 0, 32, T) \
    else if (f.bits == 4 && f.scales == SC_F32) X(4, SC_F32, 0, 32, T) \
    else if (f.bits == 8 && f.scales == SC_F32) X(8, SC_F32, 0, 32, T) \
    else if (f.bits == 8) X(8, SC_F16Z, 128, 32, T) \
    else if (f.bits == 4) X(4, SC_K4, 0, 32, T) \
    else if (f.bits == 5) X(5, SC_K4, 0, 32, T) \
    else if (f.bits == 2) X(2, SC_K2, 0, 16, T) \
    else if (f.bits == 3) X(3, SC_K3, 4, 16, T) \
    else X(6, SC_K6, 32, 16, T)
#define FORMATS(X) if (f.terms == 2) { FORMATS_T(X, 2) } else { FORMATS_T(X, 1) }

#define PANEL_FMT(B, KIND, Z, SUB, TERMS) \
    switch (mr) { \
    case 1: panel_t(B, KIND, Z, SUB, TERMS, 1, f, w, ng, a, m0, out, m0 == 0); break; \
    case 2: panel_t(B, KIND, Z, SUB, TERMS, 2, f, w, ng, a, m0, out, m0 == 0); break; \
    case 3: panel_t(B, KIND, Z, SUB, TERMS, 3, f, w, ng, a, m0, out, m0 == 0); break; \
    default: panel_t(B, KIND, Z, SUB, TERMS, 4, f, w, ng, a, m0, out, m0 == 0); break; \
    }

#if EMBER_VNNI
/* 4 activation bytes to every lane, as one load (vbroadcastss from memory: no shuffle port) */
static inline __m512i bcast4(const int8_t *p) {
    float f;
    memcpy(&f, p, 4);
    return _mm512_castps_si512(_mm512_set1_ps(f));
}

/* A group's integers for the panel's 16 rows, unpacked into v[J] (values 4J .. 4J+3 of each row) */
static inline __attribute__((always_inline)) void ints16(const int bits, const uint8_t *ints, __m512i v[8]) {
    const __m512i lo4 = _mm512_set1_epi8(0x0F);
    if (bits == 8) {
        for (int j = 0; j < 8; j++) v[j] = _mm512_loadu_si512(ints + 64 * j);
        return;
    }
    if (bits < 4) {
        const __m512i three = _mm512_set1_epi8(3), one = _mm512_set1_epi8(1);
        for (int p = 0; p < 2; p++) {
            const __m512i t = _mm512_loadu_si512(ints + 64 * p);
            for (int i = 0; i < 4; i++) v[4 * p + i] = _mm512_and_si512(_mm512_srli_epi16(t, 2 * i), three);
        }
        if (bits == 3) {
            const __m512i h = _mm512_loadu_si512(ints + 128);
            for (int J = 0; J < 8; J++)
                v[J] = _mm512_or_si512(v[J], _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(h, J), one), 2));
        }
        return;
    }
    for (int j = 0; j < 4; j++) {
        const __m512i t = _mm512_loadu_si512(ints + 64 * j);
        v[j] = _mm512_and_si512(t, lo4);
        v[j + 4] = _mm512_and_si512(_mm512_srli_epi16(t, 4), lo4);
    }
    if (bits == 5) {
        const __m512i h = _mm512_loadu_si512(ints + 256), one = _mm512_set1_epi8(1);
        for (int J = 0; J < 8; J++)
            v[J] = _mm512_or_si512(v[J], _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(h, J), one), 4));
    } else if (bits == 6) {
        const __m512i three = _mm512_set1_epi8(3);
        for (int p = 0; p < 2; p++) {
            const __m512i h = _mm512_loadu_si512(ints + 256 + 64 * p);
            for (int t = 0; t < 4; t++)
                v[4 * p + t] = _mm512_or_si512(v[4 * p + t], _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(h, 2 * t), three), 4));
        }
    }
}

static inline __m512 bytes_to_ps(const uint8_t *p, int is_signed) {
    const __m128i b = _mm_loadu_si128((const __m128i *)p);
    return _mm512_cvtepi32_ps(is_signed ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
}
static inline __m512 h16(const uint8_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }

/* lane_scales for all 16 rows at once */
#define QB(b) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(sc + 16 * (b))))
static inline __attribute__((always_inline)) void scales16(const int kind, const int z, const uint8_t *sc, int64_t g,
                                                           int t, __m512 *s, __m512 *m) {
    if (kind == SC_F16) {
        *s = h16(sc);
        *m = h16(sc + 32);
    } else if (kind == SC_F32) {
        *s = _mm512_loadu_ps((const float *)(const void *)sc);
        *m = _mm512_loadu_ps((const float *)(const void *)(sc + 64));
    } else if (kind == SC_F16Z) {
        *s = h16(sc);
        *m = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(_mm512_set1_ps((float)z), *s));
    } else if (kind == SC_K4) {
        const int j = (int)(g % 8);
        __m512i scv, mv;
        const __m512i m63 = _mm512_set1_epi32(63), m15 = _mm512_set1_epi32(15);
        if (j < 4) {
            scv = _mm512_and_si512(QB(j), m63);
            mv = _mm512_and_si512(QB(j + 4), m63);
        } else {
            const __m512i qa = QB(j + 4);
            scv = _mm512_or_si512(_mm512_and_si512(qa, m15), _mm512_slli_epi32(_mm512_srli_epi32(QB(j - 4), 6), 4));
            mv = _mm512_or_si512(_mm512_srli_epi32(qa, 4), _mm512_slli_epi32(_mm512_srli_epi32(QB(j), 6), 4));
        }
        *s = _mm512_mul_ps(h16(sc + 192), _mm512_cvtepi32_ps(scv));
        *m = _mm512_xor_ps(_mm512_mul_ps(h16(sc + 224), _mm512_cvtepi32_ps(mv)), _mm512_set1_ps(-0.0f));
    } else if (kind == SC_K2) {
        const __m512i b = QB(2 * (g % 8) + t);
        *s = _mm512_mul_ps(h16(sc + 256), _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15))));
        *m = _mm512_xor_ps(_mm512_mul_ps(h16(sc + 288), _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4))), _mm512_set1_ps(-0.0f));
    } else if (kind == SC_K3) {
        const int j = (int)(2 * (g % 8) + t);
        const __m512i lo = j < 8 ? _mm512_and_si512(QB(j), _mm512_set1_epi32(15)) : _mm512_srli_epi32(QB(j - 8), 4);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi32(QB(8 + j % 4), 2 * (j / 4)), _mm512_set1_epi32(3));
        const __m512i scv = _mm512_sub_epi32(_mm512_or_si512(lo, _mm512_slli_epi32(hi, 4)), _mm512_set1_epi32(32));
        *s = _mm512_mul_ps(h16(sc + 192), _mm512_cvtepi32_ps(scv));
        *m = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(_mm512_set1_ps((float)z), *s));
    } else {
        *s = _mm512_mul_ps(h16(sc + 256), bytes_to_ps(sc + 16 * (2 * (g % 8) + t), 1));
        *m = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(_mm512_set1_ps((float)z), *s));
    }
}
#undef QB

/* One panel (16 output rows) against rows m0 .. m0+mr-1. The format and mr are constants after
 * inlining: each gets its own loop. */
static inline __attribute__((always_inline)) void panel_t(const int bits, const int kind, const int z, const int sub,
                                                           const int terms, const int mr, const Fmt f, const uint8_t *w,
                                                           int64_t ng, const Acts *a, int64_t m0, float out[][16],
                                                           const int first) {
    const int64_t k = a->k;
    __m512 acc[MR];
    for (int r = 0; r < mr; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *ints = group_ints(f, w, g), *sc = group_scales(f, w, g);
        /* a panel's first pass streams its weights from memory: ask for them PF_BYTES ahead
         * (past the panel's end is the next panel, which this thread reads next); later passes
         * over the same panel find it in cache */
        if (first)
            for (int64_t off = 0; off < int_bytes(f); off += 64) _mm_prefetch((const char *)ints + PF_BYTES + off, _MM_HINT_T0);
        __m512i v[8];
        ints16(bits, ints, v);
        for (int t = 0; t < 32 / sub; t++) {
            __m512 s, mn;
            scales16(kind, z, sc, g, t, &s, &mn);
            const int j0 = t * sub / 4, j1 = j0 + sub / 4;
            for (int r = 0; r < mr; r++) {
                const int64_t row = m0 + r, e = g * 32;
                const int8_t *qh = a->hi + row * k + e, *ql = a->lo + row * k + e;
                /* four independent chains (integer sums are exact, so the split changes no bits):
                 * one chain of dependent vpdpbusd would leave a single row waiting on latency */
                __m512i h0 = _mm512_setzero_si512(), h1 = h0, l0 = h0, l1 = h0;
                for (int j = j0; j < j1; j += 2) {
                    h0 = _mm512_dpbusd_epi32(h0, v[j], bcast4(qh + 4 * j));
                    h1 = _mm512_dpbusd_epi32(h1, v[j + 1], bcast4(qh + 4 * j + 4));
                    if (terms == 2) {
                        l0 = _mm512_dpbusd_epi32(l0, v[j], bcast4(ql + 4 * j));
                        l1 = _mm512_dpbusd_epi32(l1, v[j + 1], bcast4(ql + 4 * j + 4));
                    }
                }
                /* 256 * (u . hi) (+ u . lo), exact: |u . hi| < 2^21 */
                __m512i dot = _mm512_slli_epi32(_mm512_add_epi32(h0, h1), 8);
                if (terms == 2) dot = _mm512_add_epi32(dot, _mm512_add_epi32(l0, l1));
                const float dx = a->d[row * (k / 32) + g], sx = act_sum(a, row, g, sub, t, terms);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s, _mm512_set1_ps(dx)), acc[r]);
                acc[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(sx), acc[r]);
            }
        }
    }
    for (int r = 0; r < mr; r++) _mm512_storeu_ps(out[r], acc[r]);
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

/* tiles 0, 1: integer dots against hi and lo; 2, 3: hi and lo activations; 4: weights. `sub`:
 * the values one scale covers (32, or 16 for Q6_K), which is what one tile product sums. */
static void tile_config(TileConfig *cfg, int sub) {
    memset(cfg, 0, sizeof *cfg);
    cfg->palette = 1;
    cfg->rows[0] = cfg->rows[1] = 16; cfg->colsb[0] = cfg->colsb[1] = 64;
    cfg->rows[2] = cfg->rows[3] = 16; cfg->colsb[2] = cfg->colsb[3] = (uint16_t)sub;
    cfg->rows[4] = (uint8_t)(sub / 4); cfg->colsb[4] = 64;
}

/* Loading a configuration, and releasing it after every call, cost about 4% of a batched decode
 * step, so a thread keeps its tiles configured between calls. Another library on the same thread
 * (oneDNN, say) may have loaded its own since: reading the live configuration back is cheap, and
 * only a mismatch reloads it. */
static void amx_configure(int sub) {
    TileConfig want, live;
    tile_config(&want, sub);
    _tile_storeconfig(&live);
    if (memcmp(&want, &live, sizeof want)) _tile_loadconfig(&want);
}

static inline __attribute__((always_inline)) void panel_amx_t(const int bits, const int kind, const int z,
                                                               const int sub, const int terms, const Fmt f, const uint8_t *w,
                                                               int64_t ng, const Acts *a, int64_t m0, float out[][16]) {
    const int64_t k = a->k;
    _Alignas(64) uint8_t bt[512];
    _Alignas(64) int32_t ch[256], cl[256];
    __m512 acc[16];
    for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *ints = group_ints(f, w, g), *sc = group_scales(f, w, g), *b = ints;
        const int64_t e = g * 32;
        if (bits != 8) { /* the unpacked vectors are exactly the tile's rows */
            __m512i v[8];
            ints16(bits, ints, v);
            for (int j = 0; j < 8; j++) _mm512_store_si512(bt + 64 * j, v[j]);
            b = bt;
        }
        for (int t = 0; t < 32 / sub; t++) {
            _tile_loadd(4, b + 64 * (sub / 4) * t, 64);
            _tile_zero(0);
            _tile_loadd(2, a->hi + m0 * k + e + sub * t, k);
            _tile_dpbsud(0, 2, 4);
            _tile_stored(0, ch, 64);
            if (terms == 2) {
                _tile_zero(1);
                _tile_loadd(3, a->lo + m0 * k + e + sub * t, k);
                _tile_dpbsud(1, 3, 4);
                _tile_stored(1, cl, 64);
            }
            __m512 s, mn;
            scales16(kind, z, sc, g, t, &s, &mn);
            for (int r = 0; r < 16; r++) {
                const int64_t row = m0 + r;
                __m512i dot = _mm512_slli_epi32(_mm512_load_si512(ch + 16 * r), 8);
                if (terms == 2) dot = _mm512_add_epi32(dot, _mm512_load_si512(cl + 16 * r));
                const float dx = a->d[row * (k / 32) + g], sx = act_sum(a, row, g, sub, t, terms);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s, _mm512_set1_ps(dx)), acc[r]);
                acc[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(sx), acc[r]);
            }
        }
    }
    for (int r = 0; r < 16; r++) _mm512_storeu_ps(out[r], acc[r]);
}

#define PANEL_AMX(B, KIND, Z, SUB, TERMS) { panel_amx_t(B, KIND, Z, SUB, TERMS, f, w, ng, a, m0, out); }
static void panel_amx(Fmt f, const uint8_t *w, int64_t ng, const Acts *a, int64_t m0, float out[][16]) {
    FORMATS(PANEL_AMX)
}
#endif

static void panel(Fmt f, const uint8_t *w, int64_t ng, const Acts *a, int64_t m0, int mr, float out[][16]) {
    FORMATS(PANEL_FMT)
}

#elif EMBER_AVX2
/* 4 activation bytes to every 32-bit lane, as one load */
static inline __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* Vector J of half h of a group (rows 8h .. 8h+7): values 4J .. 4J+3 of each row, as ints16 has
 * them; Q8_0's bytes as signed q = u - 128 */
static inline __attribute__((always_inline)) __m256i int8_at(const int bits, const uint8_t *ints, int h, int J) {
    const __m256i lo4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1), three = _mm256_set1_epi8(3);
#define LD(off) _mm256_loadu_si256((const __m256i *)(ints + (off) + 32 * h))
    if (bits == 8) return _mm256_xor_si256(LD(64 * J), _mm256_set1_epi8((char)0x80));
    if (bits < 4) {
        __m256i v = _mm256_and_si256(_mm256_srli_epi16(LD(64 * (J / 4)), 2 * (J % 4)), three);
        if (bits == 3) v = _mm256_or_si256(v, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(LD(128), J), one), 2));
        return v;
    }
    const __m256i t = LD(64 * (J % 4));
    __m256i v = J < 4 ? _mm256_and_si256(t, lo4) : _mm256_and_si256(_mm256_srli_epi16(t, 4), lo4);
    if (bits == 5) v = _mm256_or_si256(v, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(LD(256), J), one), 4));
    if (bits == 6)
        v = _mm256_or_si256(v, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(LD(256 + 64 * (J / 4)), 2 * (J % 4)), three), 4));
    return v;
#undef LD
}

/* All eight of a group's vectors for half h: int8_at's bytes, each shared plane loaded once */
static inline __attribute__((always_inline)) void ints8(const int bits, const uint8_t *ints, int h, __m256i v[8]) {
    const __m256i lo4 = _mm256_set1_epi8(0x0F);
#define LD(off) _mm256_loadu_si256((const __m256i *)(ints + (off) + 32 * h))
    if (bits == 8) {
        for (int j = 0; j < 8; j++) v[j] = _mm256_xor_si256(LD(64 * j), _mm256_set1_epi8((char)0x80));
        return;
    }
    if (bits < 4) {
        const __m256i three = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
        for (int p = 0; p < 2; p++) {
            const __m256i t = LD(64 * p);
            for (int i = 0; i < 4; i++) v[4 * p + i] = _mm256_and_si256(_mm256_srli_epi16(t, 2 * i), three);
        }
        if (bits == 3) {
            const __m256i hb = LD(128);
            for (int J = 0; J < 8; J++)
                v[J] = _mm256_or_si256(v[J], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, J), one), 2));
        }
        return;
    }
    for (int j = 0; j < 4; j++) {
        const __m256i t = LD(64 * j);
        v[j] = _mm256_and_si256(t, lo4);
        v[j + 4] = _mm256_and_si256(_mm256_srli_epi16(t, 4), lo4);
    }
    if (bits == 5) {
        const __m256i hb = LD(256), one = _mm256_set1_epi8(1);
        for (int J = 0; J < 8; J++)
            v[J] = _mm256_or_si256(v[J], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, J), one), 4));
    } else if (bits == 6) {
        const __m256i three = _mm256_set1_epi8(3);
        for (int p = 0; p < 2; p++) {
            const __m256i hb = LD(256 + 64 * p);
            for (int t = 0; t < 4; t++)
                v[4 * p + t] = _mm256_or_si256(v[4 * p + t], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * t), three), 4));
        }
    }
#undef LD
}

static inline __m256 h8(const uint8_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline __m256i b8(const uint8_t *p, int is_signed) {
    const __m128i b = _mm_loadl_epi64((const __m128i *)p);
    return is_signed ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
}

/* lane_scales for rows 8h .. 8h+7 */
#define QB(b) b8(sc + 16 * (b) + 8 * h, 0)
static inline __attribute__((always_inline)) void scales8(const int kind, const int z, const uint8_t *sc, int64_t g,
                                                          int t, int h, __m256 *s, __m256 *m) {
    if (kind == SC_F16) {
        *s = h8(sc + 16 * h);
        *m = h8(sc + 32 + 16 * h);
    } else if (kind == SC_F32) {
        *s = _mm256_loadu_ps((const float *)(const void *)(sc + 32 * h));
        *m = _mm256_loadu_ps((const float *)(const void *)(sc + 64 + 32 * h));
    } else if (kind == SC_F16Z) {
        *s = h8(sc + 16 * h);
        *m = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(_mm256_set1_ps((float)z), *s));
    } else if (kind == SC_K4) {
        const int j = (int)(g % 8);
        const __m256i m63 = _mm256_set1_epi32(63), m15 = _mm256_set1_epi32(15);
        __m256i scv, mv;
        if (j < 4) {
            scv = _mm256_and_si256(QB(j), m63);
            mv = _mm256_and_si256(QB(j + 4), m63);
        } else {
            const __m256i qa = QB(j + 4);
            scv = _mm256_or_si256(_mm256_and_si256(qa, m15), _mm256_slli_epi32(_mm256_srli_epi32(QB(j - 4), 6), 4));
            mv = _mm256_or_si256(_mm256_srli_epi32(qa, 4), _mm256_slli_epi32(_mm256_srli_epi32(QB(j), 6), 4));
        }
        *s = _mm256_mul_ps(h8(sc + 192 + 16 * h), _mm256_cvtepi32_ps(scv));
        *m = _mm256_xor_ps(_mm256_mul_ps(h8(sc + 224 + 16 * h), _mm256_cvtepi32_ps(mv)), _mm256_set1_ps(-0.0f));
    } else if (kind == SC_K2) {
        const __m256i b = QB(2 * (g % 8) + t);
        *s = _mm256_mul_ps(h8(sc + 256 + 16 * h), _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15))));
        *m = _mm256_xor_ps(_mm256_mul_ps(h8(sc + 288 + 16 * h), _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4))),
                           _mm256_set1_ps(-0.0f));
    } else if (kind == SC_K3) {
        const int j = (int)(2 * (g % 8) + t);
        const __m256i lo = j < 8 ? _mm256_and_si256(QB(j), _mm256_set1_epi32(15)) : _mm256_srli_epi32(QB(j - 8), 4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi32(QB(8 + j % 4), 2 * (j / 4)), _mm256_set1_epi32(3));
        const __m256i scv = _mm256_sub_epi32(_mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)), _mm256_set1_epi32(32));
        *s = _mm256_mul_ps(h8(sc + 192 + 16 * h), _mm256_cvtepi32_ps(scv));
        *m = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(_mm256_set1_ps((float)z), *s));
    } else {
        *s = _mm256_mul_ps(h8(sc + 256 + 16 * h), _mm256_cvtepi32_ps(b8(sc + 16 * (2 * (g % 8) + t) + 8 * h, 1)));
        *m = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(_mm256_set1_ps((float)z), *s));
    }
}
#undef QB

/* The integer dot of a row's activations with vectors j0 .. j1-1: 256 * (u . hi), plus u . lo for
 * two terms, each vector used by both terms as soon as it is made (two passes over v[] kept all
 * eight vectors live, and the registers spilled).
 *
 * vpmaddubsw multiplies unsigned weight bytes by signed activation bytes and adds neighbours into
 * int16 with saturation, so each format is arranged to never saturate, keeping the sums exact:
 *   2- to 4-bit (u <= 15): |pair| <= 2 * 15 * 127 = 3810, a group's eight vectors summed in int16
 *       (at most 30480) before one vpmaddwd takes them to int32;
 *   5-bit (u <= 31): |pair| <= 7874, four at a time (pairs with two terms: measured faster);
 *   6-bit (u <= 63): |pair| <= 16002, two at a time;
 *   Q8_0 (u = q + 128 up to 255): the product is taken as |q| * (a * sign q), both within range
 *       (|q| <= 128, |a| <= 127: |pair| <= 32512), one vector at a time, and
 *       u . a = q . a + 128 * sum(a) restores the unsigned dot exactly (q8_offset, added by the
 *       caller). */
static inline __attribute__((always_inline)) __m256i group_dot(const int bits, const int terms, const __m256i v[8],
                                                               const int8_t *qh, const int8_t *ql, const int j0,
                                                               const int j1) {
    const __m256i by256 = _mm256_set1_epi16(256), by1 = _mm256_set1_epi16(1);
    const int per = bits <= 4 ? 8 : bits == 5 && terms == 1 ? 4 : bits == 8 ? 1 : 2;
    __m256i dot = _mm256_setzero_si256();
    for (int j = j0; j < j1; j += per) {
        __m256i ph = _mm256_setzero_si256(), pl = ph;
        for (int i = 0; i < per && j + i < j1; i++) {
            __m256i u = v[j + i], xh = bcast4(qh + 4 * (j + i)), xl = bcast4(ql + 4 * (j + i));
            if (bits == 8) {
                xh = _mm256_sign_epi8(xh, u);
                xl = _mm256_sign_epi8(xl, u);
                u = _mm256_abs_epi8(u);
            }
            const __m256i mh = _mm256_maddubs_epi16(u, xh);
            ph = i ? _mm256_add_epi16(ph, mh) : mh;
            if (terms == 2) {
                const __m256i ml = _mm256_maddubs_epi16(u, xl);
                pl = i ? _mm256_add_epi16(pl, ml) : ml;
            }
        }
        __m256i d = _mm256_madd_epi16(ph, by256);
        if (terms == 2) d = _mm256_add_epi32(d, _mm256_madd_epi16(pl, by1));
        dot = _mm256_add_epi32(dot, d);
    }
    return dot;
}

/* A panel's integers unpacked once per call where many rows use them (set by ember_qlinear for the
 * thread's current panel, or NULL): ints8's vectors for group g, half h at 512 g + 256 h, the same
 * bytes. At 512 rows, unpacking per 4-row tile cost Q5_0 10 to 13% of its time. */
static __thread const uint8_t *unpacked;

static void unpack_panel(Fmt f, const uint8_t *w, int64_t ng, uint8_t *dst) {
#define UNPACK(B, KIND, Z, SUB, TERMS) \
    for (int64_t g = 0; g < ng; g++) \
        for (int h = 0; h < 2; h++) { \
            __m256i v[8]; \
            ints8(B, group_ints(f, w, g), h, v); \
            for (int j = 0; j < 8; j++) _mm256_store_si256((__m256i *)(dst + 512 * g + 256 * h + 32 * j), v[j]); \
        }
    FORMATS(UNPACK)
#undef UNPACK
}

/* Half h of one panel (output rows 8h .. 8h+7) against activation rows m0 .. m0+mr-1: the VNNI
 * path's integer dot per (row, group), then its two FMAs, lane for lane. */
static inline __attribute__((always_inline)) void half_t(const int bits, const int kind, const int z, const int sub,
                                                          const int terms, const int mr, const Fmt f, const uint8_t *w,
                                                          int64_t ng, const Acts *a, int64_t m0, float out[][16],
                                                          const int h, const int first) {
    const int64_t k = a->k;
    __m256 acc[MR];
    for (int r = 0; r < mr; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *ints = group_ints(f, w, g), *sc = group_scales(f, w, g);
        if (first)
            for (int64_t off = 0; off < int_bytes(f); off += 64) _mm_prefetch((const char *)ints + PF_BYTES + off, _MM_HINT_T0);
        __m256i v[8];
        if (unpacked)
            for (int j = 0; j < 8; j++) v[j] = _mm256_load_si256((const __m256i *)(unpacked + 512 * g + 256 * h + 32 * j));
        else
            ints8(bits, ints, h, v);
        for (int t = 0; t < 32 / sub; t++) {
            __m256 s, mn;
            scales8(kind, z, sc, g, t, h, &s, &mn);
            const int j0 = t * sub / 4, j1 = j0 + sub / 4;
            for (int r = 0; r < mr; r++) {
                const int64_t row = m0 + r, e = g * 32;
                __m256i dot = group_dot(bits, terms, v, a->hi + row * k + e, a->lo + row * k + e, j0, j1);
                if (bits == 8) dot = _mm256_add_epi32(dot, _mm256_set1_epi32(q8_offset(a, row, g, terms)));
                const float dx = a->d[row * (k / 32) + g], sx = act_sum(a, row, g, sub, t, terms);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(s, _mm256_set1_ps(dx)), acc[r]);
                acc[r] = _mm256_fmadd_ps(mn, _mm256_set1_ps(sx), acc[r]);
            }
        }
    }
    for (int r = 0; r < mr; r++) _mm256_storeu_ps(out[r] + 8 * h, acc[r]);
}

/* One or two activation rows against the whole panel, group by group, so the weights stream from
 * memory without pause: each activation broadcast serves both halves, and each weight vector is
 * made where it is used, which keeps the loop in registers (half_t's arrays of vectors spilled
 * here). The same integer dots and float steps as half_t, lane for lane. */
static inline __attribute__((always_inline)) void rows_t(const int bits, const int kind, const int z, const int sub,
                                                          const int terms, const int mr, const Fmt f, const uint8_t *w,
                                                          int64_t ng, const Acts *a, int64_t m0, float out[][16],
                                                          const int first) {
    const int64_t k = a->k;
    const __m256i by256 = _mm256_set1_epi16(256), by1 = _mm256_set1_epi16(1);
    const int per = bits <= 4 ? 8 : bits == 5 ? 4 : bits == 6 ? 2 : 1; /* see group_dot */
    __m256 acc[2][2];
    for (int h = 0; h < 2; h++)
        for (int r = 0; r < mr; r++) acc[h][r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *ints = group_ints(f, w, g), *sc = group_scales(f, w, g);
        if (first)
            for (int64_t off = 0; off < int_bytes(f); off += 64) _mm_prefetch((const char *)ints + PF_BYTES + off, _MM_HINT_T0);
        for (int t = 0; t < 32 / sub; t++) {
            const int j0 = t * sub / 4, j1 = j0 + sub / 4;
            for (int r = 0; r < mr; r++) {
                const int64_t row = m0 + r, e = g * 32;
                const int8_t *qh = a->hi + row * k + e, *ql = a->lo + row * k + e;
                __m256i dot[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
                for (int j = j0; j < j1; j += per) {
                    __m256i ph[2], pl[2];
                    for (int i = 0; i < per && j + i < j1; i++) {
                        const __m256i bh = bcast4(qh + 4 * (j + i)), bl = bcast4(ql + 4 * (j + i));
                        for (int h = 0; h < 2; h++) {
                            const __m256i v = int8_at(bits, ints, h, j + i);
                            __m256i u = v, xh = bh, xl = bl;
                            if (bits == 8) { /* |q| * (a * sign q): see group_dot */
                                u = _mm256_abs_epi8(v);
                                xh = _mm256_sign_epi8(bh, v);
                                xl = _mm256_sign_epi8(bl, v);
                            }
                            const __m256i mh = _mm256_maddubs_epi16(u, xh);
                            ph[h] = i ? _mm256_add_epi16(ph[h], mh) : mh;
                            if (terms == 2) {
                                const __m256i ml = _mm256_maddubs_epi16(u, xl);
                                pl[h] = i ? _mm256_add_epi16(pl[h], ml) : ml;
                            }
                        }
                    }
                    for (int h = 0; h < 2; h++) {
                        __m256i d = _mm256_madd_epi16(ph[h], by256);
                        if (terms == 2) d = _mm256_add_epi32(d, _mm256_madd_epi16(pl[h], by1));
                        dot[h] = _mm256_add_epi32(dot[h], d);
                    }
                }
                const float dx = a->d[row * (k / 32) + g], sx = act_sum(a, row, g, sub, t, terms);
                for (int h = 0; h < 2; h++) {
                    __m256 s, mn;
                    scales8(kind, z, sc, g, t, h, &s, &mn);
                    __m256i d = dot[h];
                    if (bits == 8) d = _mm256_add_epi32(d, _mm256_set1_epi32(q8_offset(a, row, g, terms)));
                    acc[h][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(s, _mm256_set1_ps(dx)), acc[h][r]);
                    acc[h][r] = _mm256_fmadd_ps(mn, _mm256_set1_ps(sx), acc[h][r]);
                }
            }
        }
    }
    for (int h = 0; h < 2; h++)
        for (int r = 0; r < mr; r++) _mm256_storeu_ps(out[r] + 8 * h, acc[h][r]);
}

static inline __attribute__((always_inline)) void panel_t(const int bits, const int kind, const int z, const int sub,
                                                           const int terms, const int mr, const Fmt f, const uint8_t *w,
                                                           int64_t ng, const Acts *a, int64_t m0, float out[][16],
                                                           const int first) {
    /* One or two activation rows: rows_t. More would not fit the registers: half after half, the
     * second finding the panel's weights in cache. Either way each (row, output) sees the same
     * steps. */
    if (mr <= 2) {
        rows_t(bits, kind, z, sub, terms, mr, f, w, ng, a, m0, out, first);
    } else {
        half_t(bits, kind, z, sub, terms, mr, f, w, ng, a, m0, out, 0, first);
        half_t(bits, kind, z, sub, terms, mr, f, w, ng, a, m0, out, 1, 0);
    }
}

static void panel(Fmt f, const uint8_t *w, int64_t ng, const Acts *a, int64_t m0, int mr, float out[][16]) {
    FORMATS(PANEL_FMT)
}

#elif EMBER_NEON
/* ints16 for quarter q of the panel (rows 4q .. 4q+3), as signed bytes (u <= 63; Q8_0 as u - 128) */
static inline __attribute__((always_inline)) void ints4(const int bits, const uint8_t *ints, int q, int8x16_t v[8]) {
    if (bits == 8) {
        for (int j = 0; j < 8; j++) v[j] = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(ints + 64 * j + 16 * q), vdupq_n_u8(0x80)));
        return;
    }
    uint8x16_t u[8];
    if (bits < 4) {
        for (int p = 0; p < 2; p++) {
            const uint8x16_t t = vld1q_u8(ints + 64 * p + 16 * q);
            for (int i = 0; i < 4; i++) u[4 * p + i] = vandq_u8(vshlq_u8(t, vdupq_n_s8((int8_t)(-2 * i))), vdupq_n_u8(3));
        }
        if (bits == 3) {
            const uint8x16_t hb = vld1q_u8(ints + 128 + 16 * q);
            for (int J = 0; J < 8; J++)
                u[J] = vorrq_u8(u[J], vshlq_n_u8(vandq_u8(vshlq_u8(hb, vdupq_n_s8((int8_t)-J)), vdupq_n_u8(1)), 2));
        }
        for (int j = 0; j < 8; j++) v[j] = vreinterpretq_s8_u8(u[j]);
        return;
    }
    for (int j = 0; j < 4; j++) {
        const uint8x16_t t = vld1q_u8(ints + 64 * j + 16 * q);
        u[j] = vandq_u8(t, vdupq_n_u8(0x0F));
        u[j + 4] = vshrq_n_u8(t, 4);
    }
    if (bits == 5) {
        const uint8x16_t hb = vld1q_u8(ints + 256 + 16 * q);
        for (int J = 0; J < 8; J++)
            u[J] = vorrq_u8(u[J], vshlq_n_u8(vandq_u8(vshlq_u8(hb, vdupq_n_s8((int8_t)-J)), vdupq_n_u8(1)), 4));
    } else if (bits == 6) {
        for (int p = 0; p < 2; p++) {
            const uint8x16_t hb = vld1q_u8(ints + 256 + 64 * p + 16 * q);
            for (int t = 0; t < 4; t++)
                u[4 * p + t] = vorrq_u8(u[4 * p + t], vshlq_n_u8(vandq_u8(vshlq_u8(hb, vdupq_n_s8((int8_t)(-2 * t))), vdupq_n_u8(3)), 4));
        }
    }
    for (int j = 0; j < 8; j++) v[j] = vreinterpretq_s8_u8(u[j]);
}

static inline float32x4_t h4(const uint8_t *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)(const void *)p))); }
static inline uint32x4_t b4(const uint8_t *p) {
    uint32_t x;
    memcpy(&x, p, 4);
    return vmovl_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_u32(vdup_n_u32(x)))));
}

/* lane_scales for rows 4q .. 4q+3 */
#define QB(b) b4(sc + 16 * (b) + 4 * q)
static inline __attribute__((always_inline)) void scales4(const int kind, const int z, const uint8_t *sc, int64_t g,
                                                          int t, int q, float32x4_t *s, float32x4_t *m) {
    if (kind == SC_F16) {
        *s = h4(sc + 8 * q);
        *m = h4(sc + 32 + 8 * q);
    } else if (kind == SC_F32) {
        *s = vld1q_f32((const float *)(const void *)(sc + 16 * q));
        *m = vld1q_f32((const float *)(const void *)(sc + 64 + 16 * q));
    } else if (kind == SC_F16Z) {
        *s = h4(sc + 8 * q);
        *m = vsubq_f32(vdupq_n_f32(0.f), vmulq_f32(vdupq_n_f32((float)z), *s));
    } else if (kind == SC_K4) {
        const int j = (int)(g % 8);
        uint32x4_t scv, mv;
        if (j < 4) {
            scv = vandq_u32(QB(j), vdupq_n_u32(63));
            mv = vandq_u32(QB(j + 4), vdupq_n_u32(63));
        } else {
            const uint32x4_t qa = QB(j + 4);
            scv = vorrq_u32(vandq_u32(qa, vdupq_n_u32(15)), vshlq_n_u32(vshrq_n_u32(QB(j - 4), 6), 4));
            mv = vorrq_u32(vshrq_n_u32(qa, 4), vshlq_n_u32(vshrq_n_u32(QB(j), 6), 4));
        }
        *s = vmulq_f32(h4(sc + 192 + 8 * q), vcvtq_f32_u32(scv));
        *m = vnegq_f32(vmulq_f32(h4(sc + 224 + 8 * q), vcvtq_f32_u32(mv)));
    } else if (kind == SC_K2) {
        const uint32x4_t b = QB(2 * (g % 8) + t);
        *s = vmulq_f32(h4(sc + 256 + 8 * q), vcvtq_f32_u32(vandq_u32(b, vdupq_n_u32(15))));
        *m = vnegq_f32(vmulq_f32(h4(sc + 288 + 8 * q), vcvtq_f32_u32(vshrq_n_u32(b, 4))));
    } else if (kind == SC_K3) {
        const int j = (int)(2 * (g % 8) + t);
        const uint32x4_t lo = j < 8 ? vandq_u32(QB(j), vdupq_n_u32(15)) : vshrq_n_u32(QB(j - 8), 4);
        const uint32x4_t hi = vandq_u32(vshlq_u32(QB(8 + j % 4), vdupq_n_s32(-2 * (j / 4))), vdupq_n_u32(3));
        const int32x4_t scv = vsubq_s32(vreinterpretq_s32_u32(vorrq_u32(lo, vshlq_n_u32(hi, 4))), vdupq_n_s32(32));
        *s = vmulq_f32(h4(sc + 192 + 8 * q), vcvtq_f32_s32(scv));
        *m = vsubq_f32(vdupq_n_f32(0.f), vmulq_f32(vdupq_n_f32((float)z), *s));
    } else {
        int8_t b[4];
        memcpy(b, sc + 16 * (2 * (g % 8) + t) + 4 * q, 4);
        const float32x4_t scf = {(float)b[0], (float)b[1], (float)b[2], (float)b[3]};
        *s = vmulq_f32(h4(sc + 256 + 8 * q), scf);
        *m = vsubq_f32(vdupq_n_f32(0.f), vmulq_f32(vdupq_n_f32((float)z), *s));
    }
}
#undef QB

/* Quarter q of one panel (output rows 4q .. 4q+3): the VNNI path's integer dot per (row, group),
 * then its two FMAs, lane for lane. sdot multiplies signed bytes: weights up to 63 are taken as
 * they are; Q8_0's (u = q + 128) as q = u - 128, and u . a = q . a + 128 * sum(a) restores the
 * unsigned dot exactly. */
static inline __attribute__((always_inline)) void quarter_t(const int bits, const int kind, const int z, const int sub,
                                                             const int terms, const int mr, const Fmt f, const uint8_t *w, int64_t ng,
                                                             const Acts *a, int64_t m0, float out[][16], const int q,
                                                             const int first) {
    const int64_t k = a->k;
    float32x4_t acc[MR];
    for (int r = 0; r < mr; r++) acc[r] = vdupq_n_f32(0.f);
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *ints = group_ints(f, w, g), *sc = group_scales(f, w, g);
        if (first)
            for (int64_t off = 0; off < int_bytes(f); off += 64) __builtin_prefetch(ints + PF_BYTES + off);
        int8x16_t v[8];
        ints4(bits, ints, q, v);
        for (int t = 0; t < 32 / sub; t++) {
            float32x4_t s, mn;
            scales4(kind, z, sc, g, t, q, &s, &mn);
            const int j0 = t * sub / 4, j1 = j0 + sub / 4;
            for (int r = 0; r < mr; r++) {
                const int64_t row = m0 + r, e = g * 32;
                const int8_t *qh = a->hi + row * k + e, *ql = a->lo + row * k + e;
                int32x4_t dh = vdupq_n_s32(0), dl = dh;
                for (int j = j0; j < j1; j++) {
                    int32_t h4v, l4v;
                    memcpy(&h4v, qh + 4 * j, 4);
                    memcpy(&l4v, ql + 4 * j, 4);
                    dh = vdotq_s32(dh, v[j], vreinterpretq_s8_s32(vdupq_n_s32(h4v)));
                    if (terms == 2) dl = vdotq_s32(dl, v[j], vreinterpretq_s8_s32(vdupq_n_s32(l4v)));
                }
                int32x4_t dot = vshlq_n_s32(dh, 8); /* exact: |u . hi| < 2^21 */
                if (terms == 2) dot = vaddq_s32(dot, dl);
                if (bits == 8) dot = vaddq_s32(dot, vdupq_n_s32(q8_offset(a, row, g, terms)));
                const float dx = a->d[row * (k / 32) + g], sx = act_sum(a, row, g, sub, t, terms);
                acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(dot), vmulq_f32(s, vdupq_n_f32(dx)));
                acc[r] = vfmaq_f32(acc[r], mn, vdupq_n_f32(sx));
            }
        }
    }
    for (int r = 0; r < mr; r++) vst1q_f32(out[r] + 4 * q, acc[r]);
}

static inline __attribute__((always_inline)) void panel_t(const int bits, const int kind, const int z, const int sub,
                                                           const int terms, const int mr, const Fmt f, const uint8_t *w,
                                                           int64_t ng, const Acts *a, int64_t m0, float out[][16],
                                                           const int first) {
    for (int q = 0; q < 4; q++) quarter_t(bits, kind, z, sub, terms, mr, f, w, ng, a, m0, out, q, first && q == 0);
}

static void panel(Fmt f, const uint8_t *w, int64_t ng, const Acts *a, int64_t m0, int mr, float out[][16]) {
    FORMATS(PANEL_FMT)
}

#else
/* value i (0..31) of row n in a group's planes (see the layout above) */
static inline int u_at(Fmt f, const uint8_t *ints, int n, int i) {
    if (f.bits == 8) return ints[64 * (i / 4) + 4 * n + i % 4];
    if (f.bits < 4) {
        const int J = i / 4, ii = i % 4;
        int u = (ints[64 * (J / 4) + 4 * n + ii] >> 2 * (J % 4)) & 3;
        if (f.bits == 3) u |= ((ints[128 + 4 * n + ii] >> J) & 1) << 2;
        return u;
    }
    const int J = i / 4, ii = i % 4, byte = ints[64 * (J % 4) + 4 * n + ii];
    int u = J < 4 ? byte & 0xF : byte >> 4;
    if (f.bits == 5) u |= ((ints[256 + 4 * n + ii] >> J) & 1) << 4;
    if (f.bits == 6) u |= ((ints[256 + 64 * (J / 4) + 4 * n + ii] >> 2 * (J % 4)) & 3) << 4;
    return u;
}

static void panel(Fmt f, const uint8_t *w, int64_t ng, const Acts *a, int64_t m0, int mr, float out[][16]) {
    const int64_t k = a->k;
    for (int r = 0; r < mr; r++) {
        const int64_t row = m0 + r;
        for (int n = 0; n < 16; n++) out[r][n] = 0.f;
        for (int64_t g = 0; g < ng; g++) {
            const uint8_t *ints = group_ints(f, w, g), *sc = group_scales(f, w, g);
            const int8_t *qh = a->hi + row * k + g * 32, *ql = a->lo + row * k + g * 32;
            const float dx = a->d[row * (k / 32) + g];
            for (int t = 0; t < 32 / f.sub; t++) {
                const float sx = act_sum(a, row, g, f.sub, t, f.terms);
                for (int n = 0; n < 16; n++) {
                    int32_t dot = 0;
                    for (int i = t * f.sub; i < (t + 1) * f.sub; i++)
                        dot += u_at(f, ints, n, i) * (256 * qh[i] + (f.terms == 2 ? ql[i] : 0));
                    float s, m;
                    lane_scales(f, sc, g, t, n, &s, &m);
                    out[r][n] = fmaf((float)dot, s * dx, out[r][n]);
                    out[r][n] = fmaf(m, sx, out[r][n]);
                }
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
 * the output dimension of nparts repacked matrices (types[p], data[p], ns[p] rows of K values);
 * flags: EMBER_QMM_ONE_TERM or 0. Returns 0, or -1 when out of memory, -2 for an unsupported type
 * or shape. */
int ember_qlinear(int nparts, const int *types, const void *const *data, const int64_t *ns, int64_t K,
                  const float *x, int64_t ldx, int64_t M, float *y, int64_t ldy, const float *bias, int threads,
                  int flags) {
    if (K % 32 || K < 32 || nparts < 1 || nparts > 64 || M < 0) return -2;
    int floats = 0;
    for (int p = 0; p < nparts; p++) {
        if (ember_repacked_size(types[p], ns[p], K) < 0) return -2;
        floats += float_type(types[p]);
    }
    if (floats && floats != nparts) return -2; /* float and quantized parts do not fuse */
    if (M == 0) return 0;
    if (threads < 1) threads = 1;
    if (floats) return float_linear(nparts, types, data, ns, K, x, ldx, M, y, ldy, bias, threads);
    Acts a;
    a.k = K;
    a.hi = malloc((size_t)(M * K));
    a.lo = malloc((size_t)(M * K));
    a.d = malloc(sizeof(float) * (size_t)(M * K / 32));
    a.sx32 = malloc(sizeof(float) * (size_t)(M * K / 32));
    a.sx16 = malloc(sizeof(float) * (size_t)(M * K / 16));
    a.sh32 = malloc(sizeof(float) * (size_t)(M * K / 32));
    a.sh16 = malloc(sizeof(float) * (size_t)(M * K / 16));
    a.is32 = malloc(sizeof(int32_t) * (size_t)(M * K / 32));
    a.ih32 = malloc(sizeof(int32_t) * (size_t)(M * K / 32));
    int rc = 0;
    if (!a.hi || !a.lo || !a.d || !a.sx32 || !a.sx16 || !a.sh32 || !a.sh16 || !a.is32 || !a.ih32) {
        rc = -1;
        goto done;
    }
    if (threads < 1) threads = 1;

    int64_t first[64 + 1], col[64];
    first[0] = 0;
    for (int p = 0; p < nparts; p++) {
        first[p + 1] = first[p] + (ns[p] + 15) / 16;
        col[p] = p ? col[p - 1] + ns[p - 1] : 0;
    }
    const int64_t panels = first[nparts];
    /* a few long runs of panels per thread where the weights stream from memory (a row or two: see
     * below), runs of 2 where each panel is computed on from cache for many rows */
    const int64_t chunk = M <= 2 && panels / (threads * CHUNK_DIV) > 2 ? panels / (threads * CHUNK_DIV) : 2;
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
#if EMBER_AVX2
        uint8_t *scratch = M >= 8 ? aligned_alloc(64, (size_t)(K / 32) * 512) : NULL;
#endif
        /* Contiguous runs of panels, a few per thread: each thread streams long stretches of
         * memory that the prefetchers follow (runs of 2 panels, interleaved between the threads,
         * read at 12 to 16 GB/s where these get 21 to 24 on the 2-core AMD EPYC), and the runs
         * are handed out dynamically, so that when another busy thread (a server's event loop)
         * takes a core for a while the other kernel thread picks up its share instead of waiting
         * at the end. A panel's result does not depend on which thread computes it. */
        #pragma omp for schedule(dynamic, chunk)
        for (int64_t pi = 0; pi < panels; pi++) {
            int p = 0;
            while (pi >= first[p + 1]) p++;
            const Fmt f = fmt_for(types[p], flags);
            const int64_t ng = K / 32, n0 = (pi - first[p]) * 16;
            const int nr = ns[p] - n0 < 16 ? (int)(ns[p] - n0) : 16;
            const uint8_t *w = (const uint8_t *)data[p] + (pi - first[p]) * panel_bytes(f, K);
            float out[16][16];
#if EMBER_AVX2
            /* 4- and 8-bit vectors cost about what loading them back does: only the others */
            unpacked = scratch && f.bits != 4 && f.bits != 8 ? scratch : NULL;
            if (unpacked) unpack_panel(f, w, ng, scratch);
#endif
            for (int64_t m0 = 0; m0 < M;) {
                int mr = M - m0 < MR ? (int)(M - m0) : MR;
#ifdef EMBER_AMX
                if (use_amx && M - m0 >= 16) {
                    if (tiles != f.sub) amx_configure(tiles = f.sub);
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
#if EMBER_AVX2
        unpacked = NULL;
        free(scratch);
#endif
    }
done:
    free(a.hi); free(a.lo); free(a.d); free(a.sx32); free(a.sx16); free(a.sh32); free(a.sh16); free(a.is32);
    free(a.ih32);
    return rc;
}

/* A layer's fixed arguments, kept on the C side: a decode step calls each layer once per token,
 * and converting a dozen Python arguments per call costs more than a small matmul. */
typedef struct {
    int nparts, threads, flags;
    int types[64];
    const void *data[64];
    int64_t ns[64], K, N;
    const float *bias;
    const int64_t *perm; /* the input columns in the weights' order (GPTQ's act order), or NULL */
} QLinear;

void *ember_qlinear_new(int nparts, const int *types, const void *const *data, const int64_t *ns, int64_t K,
                        const float *bias, int threads, int flags) {
    if (nparts < 1 || nparts > 64) return NULL;
    QLinear *h = calloc(1, sizeof(QLinear));
    if (!h) return NULL;
    h->nparts = nparts;
    h->threads = threads;
    h->flags = flags;
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

/* The weights' columns are the input's reordered: column j multiplies x[perm[j]] (perm[K], kept by
 * the caller; NULL: in order). */
void ember_qlinear_set_perm(void *handle, const int64_t *perm) { ((QLinear *)handle)->perm = perm; }

/* y[M, N] (contiguous) = x[M, K] (row stride ldx) @ W.T (+ bias) */
int ember_qlinear_run(const void *handle, const float *x, int64_t ldx, int64_t M, float *y) {
    const QLinear *h = handle;
    if (!h->perm || M == 0)
        return ember_qlinear(h->nparts, h->types, h->data, h->ns, h->K, x, ldx, M, y, h->N, h->bias, h->threads,
                             h->flags);
    const int64_t K = h->K;
    float *xp = malloc(sizeof(float) * (size_t)(M * K));
    if (!xp) return -1;
    for (int64_t r = 0; r < M; r++)
        for (int64_t j = 0; j < K; j++) xp[r * K + j] = x[r * ldx + h->perm[j]];
    const int rc = ember_qlinear(h->nparts, h->types, h->data, h->ns, K, xp, K, M, y, h->N, h->bias, h->threads,
                                 h->flags);
    free(xp);
    return rc;
}

void ember_qlinear_free(void *handle) { free(handle); }
