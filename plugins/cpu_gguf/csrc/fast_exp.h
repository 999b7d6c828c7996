// Shared by the kernels of paged_attention.c and layer_ops.c (included, not linked, so each library
// stays one file): 16-lane "virtual vectors" (v16) and exp16 over them.
//
// Why: the project's rule is that every build computes the same float steps in the same order, so a
// result is bitwise the same whichever instruction set ran it. The kernels are written once over the
// small set of v16 operations below, and each operation is implemented three times, chosen at compile
// time by the compiler's predefined macros:
//   AVX-512 (__AVX512F__)                 one __m512 per v16;
//   AVX2 (__AVX2__, __FMA__, __F16C__)    two __m256 halves (lanes 0..7, 8..15) doing the same per-lane work;
//   anything else (baseline x86-64, ARM)  a plain array of 16 floats, lane by lane, portable C.
// Every operation is exactly one IEEE-754 operation per lane (v16_fma is one fused multiply-add:
// fmaf() on the portable path), so a lane's result is the same bits on all three. What is not per
// lane is defined here once: the horizontal sum's tree (v16_hsum) and the partial loads and stores.
// The kernels never leave fusing a * b + c to the compiler, and the build must not let it either
// (-std=c11, -ffp-contract=off). The price of exactness on the portable path: where the target has
// no FMA instruction (baseline x86-64) each fmaf() is a libm call, so that build is several times
// slower than the vectorised paths; ARMv8 has the instruction.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#define V16_INLINE static inline __attribute__((always_inline))

#if defined(__AVX512F__)
#define V16_AVX512 1
#include <immintrin.h>
typedef __m512 v16;   // 16 floats
typedef __mmask16 m16; // a lane mask
typedef __m512i i16;  // 16 int32

V16_INLINE v16 v16_zero(void) { return _mm512_setzero_ps(); }
V16_INLINE v16 v16_set1(float x) { return _mm512_set1_ps(x); }
V16_INLINE v16 v16_load(const float *p) { return _mm512_loadu_ps(p); }
V16_INLINE v16 v16_load_h(const _Float16 *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
V16_INLINE void v16_store(float *p, v16 x) { _mm512_storeu_ps(p, x); }
V16_INLINE m16 m16_first(int n) { return (m16)((1u << n) - 1); } // lanes 0 .. n - 1, n in 0..16
V16_INLINE v16 v16_loadn(const float *p, int n) { return _mm512_maskz_loadu_ps(m16_first(n), p); }
V16_INLINE v16 v16_loadn_h(const _Float16 *p, int n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m16_first(n), p));
}
V16_INLINE void v16_storen(float *p, v16 x, int n) { _mm512_mask_storeu_ps(p, m16_first(n), x); }
V16_INLINE v16 v16_add(v16 a, v16 b) { return _mm512_add_ps(a, b); }
V16_INLINE v16 v16_sub(v16 a, v16 b) { return _mm512_sub_ps(a, b); }
V16_INLINE v16 v16_mul(v16 a, v16 b) { return _mm512_mul_ps(a, b); }
V16_INLINE v16 v16_div(v16 a, v16 b) { return _mm512_div_ps(a, b); }
V16_INLINE v16 v16_max(v16 a, v16 b) { return _mm512_max_ps(a, b); } // a > b ? a : b, as on every path
V16_INLINE v16 v16_min(v16 a, v16 b) { return _mm512_min_ps(a, b); } // a < b ? a : b
V16_INLINE v16 v16_fma(v16 a, v16 b, v16 c) { return _mm512_fmadd_ps(a, b, c); }   // a * b + c, one rounding
V16_INLINE v16 v16_fnma(v16 a, v16 b, v16 c) { return _mm512_fnmadd_ps(a, b, c); } // c - a * b, one rounding
V16_INLINE v16 v16_round(v16 x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// p * 2^n for integral n in [-126, 127] (2^n a normal float): one rounding of the exact product
V16_INLINE v16 v16_mul_pow2(v16 p, v16 n) { return _mm512_scalef_ps(p, n); }
V16_INLINE v16 v16_select(m16 k, v16 a, v16 b) { return _mm512_mask_blend_ps(k, b, a); } // k ? a : b
V16_INLINE v16 v16_keep(m16 k, v16 a) { return _mm512_maskz_mov_ps(k, a); }             // k ? a : 0
V16_INLINE m16 v16_ne(v16 a, v16 b) { return _mm512_cmp_ps_mask(a, b, _CMP_NEQ_OQ); }
V16_INLINE i16 i16_load(const int32_t *p) { return _mm512_loadu_si512(p); }
V16_INLINE i16 i16_sub(i16 a, int32_t c) { return _mm512_sub_epi32(a, _mm512_set1_epi32(c)); }
V16_INLINE m16 i16_ge(i16 a, int32_t c) { return _mm512_cmpge_epi32_mask(a, _mm512_set1_epi32(c)); }
// the two halves, for the reduction trees (lanes 0..7 and 8..15)
V16_INLINE __m256 v16_lo_(v16 x) { return _mm512_castps512_ps256(x); }
V16_INLINE __m256 v16_hi_(v16 x) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)); }

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define V16_AVX2 1
#include <immintrin.h>
typedef struct { __m256 lo, hi; } v16;   // lanes 0..7, 8..15
typedef struct { __m256 lo, hi; } m16;   // all ones where set
typedef struct { __m256i lo, hi; } i16;

V16_INLINE v16 v16_zero(void) { return (v16){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
V16_INLINE v16 v16_set1(float x) { return (v16){_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
V16_INLINE v16 v16_load(const float *p) { return (v16){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
V16_INLINE v16 v16_load_h(const _Float16 *p) {
    return (v16){_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)),
                 _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)))};
}
V16_INLINE void v16_store(float *p, v16 x) {
    _mm256_storeu_ps(p, x.lo);
    _mm256_storeu_ps(p + 8, x.hi);
}
V16_INLINE i16 m16_first_i_(int n) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), nn = _mm256_set1_epi32(n);
    return (i16){_mm256_cmpgt_epi32(nn, lanes), _mm256_cmpgt_epi32(nn, _mm256_add_epi32(lanes, _mm256_set1_epi32(8)))};
}
V16_INLINE m16 m16_first(int n) {
    const i16 k = m16_first_i_(n);
    return (m16){_mm256_castsi256_ps(k.lo), _mm256_castsi256_ps(k.hi)};
}
V16_INLINE v16 v16_loadn(const float *p, int n) { // masked lanes are not read
    const i16 k = m16_first_i_(n);
    return (v16){_mm256_maskload_ps(p, k.lo), _mm256_maskload_ps(p + 8, k.hi)};
}
V16_INLINE v16 v16_loadn_h(const _Float16 *p, int n) {
    if (n == 8) return (v16){_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)), _mm256_setzero_ps()}; // 8-slot blocks
    _Float16 b[16] = {0};
    memcpy(b, p, sizeof(_Float16) * (size_t)n);
    return v16_load_h(b);
}
V16_INLINE void v16_storen(float *p, v16 x, int n) {
    const i16 k = m16_first_i_(n);
    _mm256_maskstore_ps(p, k.lo, x.lo);
    _mm256_maskstore_ps(p + 8, k.hi, x.hi);
}
#define V16_AVX2_OP2(name, op) \
    V16_INLINE v16 name(v16 a, v16 b) { return (v16){op(a.lo, b.lo), op(a.hi, b.hi)}; }
V16_AVX2_OP2(v16_add, _mm256_add_ps)
V16_AVX2_OP2(v16_sub, _mm256_sub_ps)
V16_AVX2_OP2(v16_mul, _mm256_mul_ps)
V16_AVX2_OP2(v16_div, _mm256_div_ps)
V16_AVX2_OP2(v16_max, _mm256_max_ps)
V16_AVX2_OP2(v16_min, _mm256_min_ps)
V16_INLINE v16 v16_fma(v16 a, v16 b, v16 c) { return (v16){_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
V16_INLINE v16 v16_fnma(v16 a, v16 b, v16 c) { return (v16){_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)}; }
V16_INLINE v16 v16_round(v16 x) {
    return (v16){_mm256_round_ps(x.lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                 _mm256_round_ps(x.hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
// 2^n built in the exponent bits (exact for n in [-126, 127]), then one multiply: scalef's product
V16_INLINE __m256 pow2_8_(__m256 n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
V16_INLINE v16 v16_mul_pow2(v16 p, v16 n) { return (v16){_mm256_mul_ps(p.lo, pow2_8_(n.lo)), _mm256_mul_ps(p.hi, pow2_8_(n.hi))}; }
V16_INLINE v16 v16_select(m16 k, v16 a, v16 b) { return (v16){_mm256_blendv_ps(b.lo, a.lo, k.lo), _mm256_blendv_ps(b.hi, a.hi, k.hi)}; }
V16_INLINE v16 v16_keep(m16 k, v16 a) { return (v16){_mm256_and_ps(k.lo, a.lo), _mm256_and_ps(k.hi, a.hi)}; }
V16_INLINE m16 v16_ne(v16 a, v16 b) { return (m16){_mm256_cmp_ps(a.lo, b.lo, _CMP_NEQ_OQ), _mm256_cmp_ps(a.hi, b.hi, _CMP_NEQ_OQ)}; }
V16_INLINE i16 i16_load(const int32_t *p) {
    return (i16){_mm256_loadu_si256((const __m256i *)p), _mm256_loadu_si256((const __m256i *)(p + 8))};
}
V16_INLINE i16 i16_sub(i16 a, int32_t c) {
    const __m256i cc = _mm256_set1_epi32(c);
    return (i16){_mm256_sub_epi32(a.lo, cc), _mm256_sub_epi32(a.hi, cc)};
}
V16_INLINE m16 i16_ge(i16 a, int32_t c) { // a >= c: not c > a
    const __m256i cc = _mm256_set1_epi32(c), ones = _mm256_set1_epi32(-1);
    return (m16){_mm256_castsi256_ps(_mm256_xor_si256(_mm256_cmpgt_epi32(cc, a.lo), ones)),
                 _mm256_castsi256_ps(_mm256_xor_si256(_mm256_cmpgt_epi32(cc, a.hi), ones))};
}
V16_INLINE __m256 v16_lo_(v16 x) { return x.lo; }
V16_INLINE __m256 v16_hi_(v16 x) { return x.hi; }

#else
#define V16_SCALAR 1
// Portable C, one lane at a time: each statement is the vector paths' instruction for that lane.
typedef struct { float f[16]; } v16;
typedef struct { int32_t b[16]; } m16; // 0 or 1
typedef struct { int32_t i[16]; } i16;
#define V16_EACH(i) for (int i = 0; i < 16; i++)

V16_INLINE v16 v16_set1(float x) { v16 r; V16_EACH(i) r.f[i] = x; return r; }
V16_INLINE v16 v16_zero(void) { return v16_set1(0.0f); }
V16_INLINE v16 v16_load(const float *p) { v16 r; memcpy(r.f, p, sizeof r.f); return r; }
V16_INLINE v16 v16_load_h(const _Float16 *p) { v16 r; V16_EACH(i) r.f[i] = (float)p[i]; return r; } // exact
V16_INLINE void v16_store(float *p, v16 x) { memcpy(p, x.f, sizeof x.f); }
V16_INLINE m16 m16_first(int n) { m16 k; V16_EACH(i) k.b[i] = i < n; return k; }
V16_INLINE v16 v16_loadn(const float *p, int n) { v16 r = v16_zero(); for (int i = 0; i < n; i++) r.f[i] = p[i]; return r; }
V16_INLINE v16 v16_loadn_h(const _Float16 *p, int n) { v16 r = v16_zero(); for (int i = 0; i < n; i++) r.f[i] = (float)p[i]; return r; }
V16_INLINE void v16_storen(float *p, v16 x, int n) { for (int i = 0; i < n; i++) p[i] = x.f[i]; }
#define V16_SCALAR_OP2(name, expr) \
    V16_INLINE v16 name(v16 a, v16 b) { v16 r; V16_EACH(i) { const float x = a.f[i], y = b.f[i]; r.f[i] = (expr); } return r; }
V16_SCALAR_OP2(v16_add, x + y)
V16_SCALAR_OP2(v16_sub, x - y)
V16_SCALAR_OP2(v16_mul, x * y)
V16_SCALAR_OP2(v16_div, x / y)
V16_SCALAR_OP2(v16_max, x > y ? x : y) // the x86 instructions' own definition (NaN or equal: the second)
V16_SCALAR_OP2(v16_min, x < y ? x : y)
V16_INLINE v16 v16_fma(v16 a, v16 b, v16 c) { v16 r; V16_EACH(i) r.f[i] = fmaf(a.f[i], b.f[i], c.f[i]); return r; }
V16_INLINE v16 v16_fnma(v16 a, v16 b, v16 c) { v16 r; V16_EACH(i) r.f[i] = fmaf(-a.f[i], b.f[i], c.f[i]); return r; }
V16_INLINE v16 v16_round(v16 x) { v16 r; V16_EACH(i) r.f[i] = __builtin_roundevenf(x.f[i]); return r; }
V16_INLINE v16 v16_mul_pow2(v16 p, v16 n) {
    v16 r;
    V16_EACH(i) {
        union { float f; int32_t i; } s = {.i = ((int32_t)n.f[i] + 127) << 23};
        r.f[i] = p.f[i] * s.f;
    }
    return r;
}
V16_INLINE v16 v16_select(m16 k, v16 a, v16 b) { v16 r; V16_EACH(i) r.f[i] = k.b[i] ? a.f[i] : b.f[i]; return r; }
V16_INLINE v16 v16_keep(m16 k, v16 a) { v16 r; V16_EACH(i) r.f[i] = k.b[i] ? a.f[i] : 0.0f; return r; }
V16_INLINE m16 v16_ne(v16 a, v16 b) { m16 k; V16_EACH(i) k.b[i] = a.f[i] != b.f[i]; return k; }
V16_INLINE i16 i16_load(const int32_t *p) { i16 r; memcpy(r.i, p, sizeof r.i); return r; }
V16_INLINE i16 i16_sub(i16 a, int32_t c) { V16_EACH(i) a.i[i] -= c; return a; }
V16_INLINE m16 i16_ge(i16 a, int32_t c) { m16 k; V16_EACH(i) k.b[i] = a.i[i] >= c; return k; }
#endif

// --- defined once, over the operations above -------------------------------------------------------

// the first n lanes (n in 1..16): a whole-vector load or store when n is 16 (a constant in the hot loops)
V16_INLINE v16 v16_load_upto(const float *p, int n) { return n == 16 ? v16_load(p) : v16_loadn(p, n); }
V16_INLINE v16 v16_load_h_upto(const _Float16 *p, int n) { return n == 16 ? v16_load_h(p) : v16_loadn_h(p, n); }
V16_INLINE void v16_store_upto(float *p, v16 x, int n) {
    if (n == 16) v16_store(p, x);
    else v16_storen(p, x, n);
}

// The horizontal sum, in one fixed tree on every path: lanes i and i + 8, then i and i + 4, then
// i and i + 2, then the two left. (Not _mm512_reduce_add_ps, whose order is the compiler's.)
#if defined(V16_SCALAR)
V16_INLINE float v16_hsum(v16 x) {
    for (int w = 8; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) x.f[i] = x.f[i] + x.f[i + w];
    return x.f[0];
}
V16_INLINE float v16_hmax(v16 x) {
    for (int w = 8; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) x.f[i] = x.f[i] > x.f[i + w] ? x.f[i] : x.f[i + w];
    return x.f[0];
}
#else
V16_INLINE float v16_hsum(v16 x) {
    const __m256 s8 = _mm256_add_ps(v16_lo_(x), v16_hi_(x));                          // i + (i + 8)
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1)); // i + (i + 4)
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                          // i + (i + 2)
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));                        // 0 + 1
}
V16_INLINE float v16_hmax(v16 x) { // the same tree; a max is exact in any order anyway
    const __m256 s8 = _mm256_max_ps(v16_lo_(x), v16_hi_(x));
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
#endif

// exp(x) on 16 lanes, for x in [-87, 88] (clamped outside: softmax after subtracting the max, SiLU):
// Cody-Waite range reduction to r in [-ln2/2, ln2/2] with fused multiply-adds, a degree-6
// polynomial in Horner form (fused), and the power of two put in through the exponent bits (or
// scalef, the same exact product). Relative error about 2e-7; the same bits on every path.
V16_INLINE v16 exp16(v16 x) {
    x = v16_min(v16_max(x, v16_set1(-87.0f)), v16_set1(88.0f));
    const v16 n = v16_round(v16_mul(x, v16_set1(1.44269504088896341f)));
    const v16 r = v16_fnma(n, v16_set1(1.428606765330187045e-06f), v16_fnma(n, v16_set1(0.693145751953125f), x));
    v16 p = v16_set1(1.0f / 720.0f);
    p = v16_fma(p, r, v16_set1(1.0f / 120.0f));
    p = v16_fma(p, r, v16_set1(1.0f / 24.0f));
    p = v16_fma(p, r, v16_set1(1.0f / 6.0f));
    p = v16_fma(p, r, v16_set1(0.5f));
    p = v16_fma(p, r, v16_set1(1.0f));
    p = v16_fma(p, r, v16_set1(1.0f));
    return v16_mul_pow2(p, n); // p * 2^n, n in [-126, 127] after the clamp
}
