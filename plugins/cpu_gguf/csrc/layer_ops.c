// The small operations between the matmuls of a decoder layer, one C call each instead of a
// dozen torch ops: per-token Python and dispatch overhead is what a single decode stream pays most.
// All work in place or on row-strided float32 views, so the model never copies to make them fit.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fast_exp.h"

// Each kernel is written once over fast_exp.h's 16-lane v16 operations, so the AVX-512, AVX2 and
// portable builds compute every element with the same float operations in the same order: the
// results are bitwise the same on all of them. A row's last partial vector is loaded and stored
// with the v16 partial loads (lanes past the row read as 0 and are never written).

// out = w * y / rms(y), y = x + res (and res = y) when res is given, else y = x.
// The sum of squares: element i goes into lane i % 16 of accumulator (i / 16) % 4 (an FMA chain in
// order of i), then ((acc0 + acc1) + (acc2 + acc3)) and v16_hsum's tree. A partial last vector adds
// 0 * 0 to its unused lanes, which changes nothing.
V16_INLINE v16 sumsq_step(const float *x, float *r, int64_t i, int n, v16 acc) {
    v16 y = v16_load_upto(x + i, n);
    if (r) {
        y = v16_add(y, v16_load_upto(r + i, n));
        v16_store_upto(r + i, y, n);
    }
    return v16_fma(y, y, acc);
}

static void rms_norm_row(const float *xm, float *rm, const float *w, float *om, int64_t D, float eps) {
    v16 a0 = v16_zero(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 64 <= D; i += 64) {
        a0 = sumsq_step(xm, rm, i, 16, a0);
        a1 = sumsq_step(xm, rm, i + 16, 16, a1);
        a2 = sumsq_step(xm, rm, i + 32, 16, a2);
        a3 = sumsq_step(xm, rm, i + 48, 16, a3);
    }
    /* up to 63 left: the rotation goes on, a0 first */
    if (i < D) a0 = sumsq_step(xm, rm, i, D - i < 16 ? (int)(D - i) : 16, a0);
    if ((i += 16) < D) a1 = sumsq_step(xm, rm, i, D - i < 16 ? (int)(D - i) : 16, a1);
    if ((i += 16) < D) a2 = sumsq_step(xm, rm, i, D - i < 16 ? (int)(D - i) : 16, a2);
    if ((i += 16) < D) a3 = sumsq_step(xm, rm, i, (int)(D - i), a3);
    const float ss = v16_hsum(v16_add(v16_add(a0, a1), v16_add(a2, a3)));
    const float inv = 1.0f / sqrtf(ss / (float)D + eps);
    const float *ym = rm ? rm : xm;
    const v16 vinv = v16_set1(inv);
    for (int64_t j = 0; j < D; j += 16) {
        const int n = D - j < 16 ? (int)(D - j) : 16;
        v16_store_upto(om + j, v16_mul(v16_load_upto(w + j, n), v16_mul(v16_load_upto(ym + j, n), vinv)), n);
    }
}

// Rows go to the threads from 16 rows on (SwiGLU likewise); fewer run on the caller's thread without
// entering an OpenMP region at all: a decode step calls these per layer, and that entry costs about
// as much as a row. Which thread runs a row never changes its bits.
void ember_rms_norm(const float *x, int64_t ldx, float *res, int64_t ldr, const float *w, float *out, int64_t ldo,
                    int64_t M, int64_t D, float eps, int threads) {
    if (M < 16 || threads <= 1) {
        for (int64_t m = 0; m < M; m++) rms_norm_row(x + m * ldx, res ? res + m * ldr : NULL, w, out + m * ldo, D, eps);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++) rms_norm_row(x + m * ldx, res ? res + m * ldr : NULL, w, out + m * ldo, D, eps);
}

// Rotary embedding in place (rotate-half layout) on the first `rot` dims of each head of q and k;
// cos/sin: [positions, rot] tables, row stride ldc. x[i] = a c - b s, x[i + half] = b c' + a s'
// (two products and a sum each, unfused: the reference's roundings).
void ember_rope(float *q, int64_t ldq, int hq, float *k, int64_t ldk, int hk, int64_t M, const int64_t *pos,
                const float *cos_t, const float *sin_t, int64_t ldc, int D, int rot) {
    const int half = rot / 2;
    for (int64_t m = 0; m < M; m++) {
        const float *c = cos_t + pos[m] * ldc, *s = sin_t + pos[m] * ldc;
        for (int h = 0; h < hq + hk; h++) {
            float *x = h < hq ? q + m * ldq + (int64_t)h * D : k + m * ldk + (int64_t)(h - hq) * D;
            for (int i = 0; i < half; i += 16) {
                const int n = half - i < 16 ? half - i : 16;
                const v16 a = v16_load_upto(x + i, n), b = v16_load_upto(x + i + half, n);
                const v16 lo = v16_sub(v16_mul(a, v16_load_upto(c + i, n)), v16_mul(b, v16_load_upto(s + i, n)));
                const v16 hi = v16_add(v16_mul(b, v16_load_upto(c + i + half, n)), v16_mul(a, v16_load_upto(s + i + half, n)));
                v16_store_upto(x + i, lo, n);
                v16_store_upto(x + i + half, hi, n);
            }
        }
    }
}

// out[m, i] = silu(x[m, i]) * x[m, I + i]: gate and up halves of one fused projection.
// silu(g) = g / (1 + exp(0 - g)), with exp16.
static void swiglu_row(const float *g, float *o, int64_t I) {
    const float *u = g + I;
    for (int64_t i = 0; i < I; i += 16) {
        const int n = I - i < 16 ? (int)(I - i) : 16;
        const v16 gv = v16_load_upto(g + i, n);
        const v16 e = exp16(v16_sub(v16_zero(), gv));
        v16_store_upto(o + i, v16_mul(v16_div(gv, v16_add(v16_set1(1.0f), e)), v16_load_upto(u + i, n)), n);
    }
}

void ember_swiglu(const float *x, int64_t ldx, float *out, int64_t ldo, int64_t M, int64_t I, int threads) {
    if (M < 16 || threads <= 1) {
        for (int64_t m = 0; m < M; m++) swiglu_row(x + m * ldx, out + m * ldo, I);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++) swiglu_row(x + m * ldx, out + m * ldo, I);
}

// Embedding lookup: rows ids[0..n) of a GGUF table (row_bytes per row), dequantized into out
// [n, dim] with the reference's float operations (d * q, d * q + m), so the values are the bits
// the core's dequantize gives. Legacy block types and plain floats only (GGML type numbers);
// returns -2 for any other type, which the caller dequantizes itself.
static float h2f(uint16_t h) {
    _Float16 v;
    memcpy(&v, &h, 2);
    return (float)v;
}

static float f16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return h2f(h);
}

int ember_dequant_rows(int type, const uint8_t *table, int64_t row_bytes, const int64_t *ids, int64_t n,
                       float *out, int64_t dim) {
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *row = table + ids[r] * row_bytes;
        float *o = out + r * dim;
        switch (type) {
        case 0:  // F32
            memcpy(o, row, sizeof(float) * dim);
            break;
        case 1:  // F16 (an exact conversion, 16 at a time)
            for (int64_t i = 0; i < dim; i += 16) {
                const int k = dim - i < 16 ? (int)(dim - i) : 16;
                v16_store_upto(o + i, v16_load_h_upto((const _Float16 *)(row + 2 * i), k), k);
            }
            break;
        case 30:  // BF16
            for (int64_t i = 0; i < dim; i++) {
                uint32_t bits = (uint32_t)(row[2 * i] | (row[2 * i + 1] << 8)) << 16;
                memcpy(o + i, &bits, 4);
            }
            break;
        case 2:   // Q4_0
        case 3:   // Q4_1
        case 6:   // Q5_0
        case 7:   // Q5_1
        case 8: {  // Q8_0
            const int bytes = type == 2 ? 18 : type == 3 ? 20 : type == 6 ? 22 : type == 7 ? 24 : 34;
            for (int64_t b = 0; b < dim / 32; b++) {
                const uint8_t *blk = row + b * bytes;
                float *ob = o + b * 32;
                const float d = f16_at(blk);
                float qv[32]; /* the block's integers, exact as floats */
                if (type == 8) {
                    for (int i = 0; i < 32; i++) qv[i] = (float)(int8_t)blk[2 + i];
                } else {
                    uint32_t qh = 0;
                    if (type == 6) memcpy(&qh, blk + 2, 4);
                    if (type == 7) memcpy(&qh, blk + 4, 4);
                    const uint8_t *qs = blk + (type == 2 ? 2 : type == 3 ? 4 : type == 6 ? 6 : 8);
                    const int off = type == 2 ? 8 : type == 6 ? 16 : 0;
                    for (int i = 0; i < 32; i++) {
                        int q = i < 16 ? (qs[i] & 0x0F) : (qs[i - 16] >> 4);
                        if (type == 6 || type == 7) q |= (int)((qh >> i) & 1) << 4;
                        qv[i] = (float)(q - off);
                    }
                }
                /* d * q, or d * q + m (a product, then a sum) for the types with a minimum */
                const int with_min = type == 3 || type == 7;
                const float m = with_min ? f16_at(blk + 2) : 0.f;
                for (int h = 0; h < 32; h += 16) {
                    v16 y = v16_mul(v16_set1(d), v16_load(qv + h));
                    if (with_min) y = v16_add(y, v16_set1(m));
                    v16_store(ob + h, y);
                }
            }
            break;
        }
        default:
            return -2;
        }
    }
    return 0;
}
