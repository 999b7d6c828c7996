/* What this CPU (and its operating system) can run: one bit per kernel ISA, probed once at load.
 * Built for the baseline of its architecture, so it loads everywhere; native.py picks the
 * best build of every other kernel library from its answer. */
#include <stdint.h>
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#ifndef HWCAP_ASIMDHP
#define HWCAP_ASIMDHP (1 << 10)
#endif
#ifndef HWCAP2_I8MM
#define HWCAP2_I8MM (1 << 13)
#endif
#endif

enum {
    EMBER_CPU_AVX2 = 1 << 0,         /* with FMA and F16C: x86-64-v3 */
    EMBER_CPU_AVX512_VNNI = 1 << 1,  /* x86-64-v4 (F, BW, CD, DQ, VL) and VNNI */
    EMBER_CPU_AMX_INT8 = 1 << 2,
    EMBER_CPU_AVX_VNNI = 1 << 3,
    EMBER_CPU_NEON_DOTPROD = 1 << 8, /* ARMv8.2 dot product (sdot/udot) and FP16 arithmetic */
    EMBER_CPU_I8MM = 1 << 9,
};

int ember_cpu_features(void) {
    int f = 0;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    /* __builtin_cpu_supports checks the operating system saves the vector state (XCR0) too */
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi")
        && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c"))
        f |= EMBER_CPU_AVX2;
    if ((f & EMBER_CPU_AVX2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")
        && __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512vnni"))
        f |= EMBER_CPU_AVX512_VNNI;
    if ((f & EMBER_CPU_AVX512_VNNI) && __builtin_cpu_supports("amx-int8") && __builtin_cpu_supports("amx-tile"))
        f |= EMBER_CPU_AMX_INT8;
    if ((f & EMBER_CPU_AVX2) && __builtin_cpu_supports("avxvnni")) f |= EMBER_CPU_AVX_VNNI;
#elif defined(__aarch64__) && defined(__linux__)
    unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
    if ((hw & HWCAP_ASIMDDP) && (hw & HWCAP_ASIMDHP)) f |= EMBER_CPU_NEON_DOTPROD;
    if (hw2 & HWCAP2_I8MM) f |= EMBER_CPU_I8MM;
#elif defined(__aarch64__) && defined(__APPLE__)
    f |= EMBER_CPU_NEON_DOTPROD; /* every Apple Silicon core has dot product and FP16 */
#endif
    return f;
}
