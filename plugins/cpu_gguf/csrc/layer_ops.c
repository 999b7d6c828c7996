// The small operations between the matmuls of a decoder layer, one C call each instead of a
// dozen torch ops: per-token Python and dispatch overhead is what a single decode stream pays most.
// All work in place or on row-strided float32 views, so the model never copies to make them fit.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fast_exp.h"

// out = w * y / rms(y), y = x + res (and res = y) when res is given, else y = x.
void ember_rms_norm(const float *x, int64_t ldx, float *res, int64_t ldr, const float *w, float *out, int64_t ldo,
                    int64_t M, int64_t D, float eps, int threads) {
#pragma omp parallel for num_threads(threads) if (M >= 16) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * ldx;
        float *om = out + m * ldo, *rm = res ? res + m * ldr : NULL;
        float ss = 0.f;
        if (rm) {
#pragma omp simd reduction(+ : ss)
            for (int64_t i = 0; i < D; i++) {
                float y = xm[i] + rm[i];
                rm[i] = y;
                ss += y * y;
            }
            xm = rm;
        } else {
#pragma omp simd reduction(+ : ss)
            for (int64_t i = 0; i < D; i++) ss += xm[i] * xm[i];
        }
        const float inv = 1.0f / sqrtf(ss / (float)D + eps);
#pragma omp simd
        for (int64_t i = 0; i < D; i++) om[i] = w[i] * (xm[i] * inv);
    }
}

// Rotary embedding in place (rotate-half layout) on the first `rot` dims of each head of q and k;
// cos/sin: [positions, rot] tables, row stride ldc.
void ember_rope(float *q, int64_t ldq, int hq, float *k, int64_t ldk, int hk, int64_t M, const int64_t *pos,
                const float *cos_t, const float *sin_t, int64_t ldc, int D, int rot) {
    const int half = rot / 2;
    for (int64_t m = 0; m < M; m++) {
        const float *c = cos_t + pos[m] * ldc, *s = sin_t + pos[m] * ldc;
        for (int h = 0; h < hq + hk; h++) {
            float *x = h < hq ? q + m * ldq + (int64_t)h * D : k + m * ldk + (int64_t)(h - hq) * D;
#pragma omp simd
            for (int i = 0; i < half; i++) {
                const float a = x[i], b = x[i + half];
                x[i] = a * c[i] - b * s[i];
                x[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

// out[m, i] = silu(x[m, i]) * x[m, I + i]: gate and up halves of one fused projection.
void ember_swiglu(const float *x, int64_t ldx, float *out, int64_t ldo, int64_t M, int64_t I, int threads) {
#pragma omp parallel for num_threads(threads) if (M >= 16) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float *g = x + m * ldx, *u = g + I;
        float *o = out + m * ldo;
        int64_t i = 0;
#ifdef __AVX512F__
        const __m512 one = _mm512_set1_ps(1.0f);
        for (; i + 16 <= I; i += 16) {
            const __m512 gv = _mm512_loadu_ps(g + i);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + i)));
        }
#endif
        for (; i < I; i++) o[i] = g[i] / (1.0f + exp_nonpos(-g[i])) * u[i];
    }
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
        case 1:  // F16
            for (int64_t i = 0; i < dim; i++) o[i] = f16_at(row + 2 * i);
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
                if (type == 8) {
                    for (int i = 0; i < 32; i++) ob[i] = (float)(int8_t)blk[2 + i] * d;
                    continue;
                }
                const float m = (type == 3 || type == 7) ? f16_at(blk + 2) : 0.f;
                uint32_t qh = 0;
                if (type == 6) memcpy(&qh, blk + 2, 4);
                if (type == 7) memcpy(&qh, blk + 4, 4);
                const uint8_t *qs = blk + (type == 2 ? 2 : type == 3 ? 4 : type == 6 ? 6 : 8);
                for (int i = 0; i < 32; i++) {
                    int q = i < 16 ? (qs[i] & 0x0F) : (qs[i - 16] >> 4);
                    if (type == 6 || type == 7) q |= (int)((qh >> i) & 1) << 4;
                    if (type == 2) ob[i] = d * (float)(q - 8);
                    else if (type == 6) ob[i] = d * (float)(q - 16);
                    else ob[i] = d * (float)q + m;
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
