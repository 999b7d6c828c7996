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
#pragma omp simd
        for (int64_t i = 0; i < I; i++) o[i] = g[i] / (1.0f + exp_nonpos(-g[i])) * u[i];
    }
}
