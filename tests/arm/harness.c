/* A driver for cpu_gguf's C kernels, cross-compiled for aarch64 and run under qemu-aarch64 by
 * tests/test_cpu_arm_qemu.py (tests/arm/qemu_harness.py builds it and writes and reads these files).
 *
 *     harness IN OUT
 *
 * IN is a batch of calls, each naming a kernel, its integer and float arguments and its arrays;
 * the harness makes each call with exactly the arguments native.py's ctypes wrappers pass, and
 * writes the return code and the arrays the call wrote (outputs, and buffers updated in place) to
 * OUT. All numbers little-endian (aarch64 and x86-64 both are).
 *
 *   IN:  "EMBI" u32 ncalls; per call: char op[16] (NUL-padded), i32 nints, nfloats, narrays, nret;
 *        i64 ints[nints]; f64 floats[nfloats]; per array: i64 nbytes (-1: a NULL pointer), the bytes,
 *        zero-padded to a multiple of 8; i64 ret[nret] (indices of the arrays to send back).
 *   OUT: "EMBO" u32 ncalls; per call: i64 rc, i64 narrays; per array: i64 nbytes, the bytes padded
 *        to 8. The arrays are ret's, then any the op adds itself (qlinear: its repacked weights).
 *
 * Each csrc/<name>.c is compiled on its own, as native.py builds it into its own library (the files
 * share static helper names); a harness binary links one kernel library's object (and
 * cpu_features.c's) and calls only exported functions.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The kernels' exported functions, declared weak: each harness binary links one kernel library (so
 * a library that fails to build fails only its own tests), and an op whose library is not linked in
 * answers NOT_LINKED instead of calling a null pointer. */
#define WEAK __attribute__((weak))
#define NOT_LINKED (-1000)
/* quant_matmul.c */
WEAK int ember_qmm_supported(int t);
WEAK int ember_qmm_vectorized(void);
WEAK int ember_qmm_amx(void);
WEAK int64_t ember_repacked_size(int t, int64_t N, int64_t K);
WEAK int ember_repack(int t, const uint8_t *src, int64_t N, int64_t K, uint8_t *dst, int threads);
WEAK int ember_repack_grouped(int t, const uint8_t *u, const float *s, const float *m, int64_t N, int64_t K, uint8_t *dst,
                              int threads);
WEAK void *ember_qlinear_new(int nparts, const int *types, const void *const *data, const int64_t *ns, int64_t K,
                             const float *bias, int threads, int flags);
WEAK int ember_qlinear_run(const void *handle, const float *x, int64_t ldx, int64_t M, float *y);
WEAK void ember_qlinear_free(void *handle);
/* paged_attention.c */
#define ATTENTION_DECLS(SUFFIX, T)                                                                          \
    WEAK int ember_paged_decode##SUFFIX(const float *q, int64_t ldq, T *k_cache, T *v_cache,                  \
                                        const int64_t *block_tables, int64_t bt_stride, const int64_t *seq_lens, \
                                        float *out, int B, int H, int KVH, int D, int64_t NB, int BS, float scale, \
                                        int nthreads, const float *k_new, const float *v_new, int64_t ldkv,      \
                                        const int64_t *slots);                                                 \
    WEAK int ember_paged_prefill##SUFFIX(const float *q, int64_t ldq, const T *k_cache, const T *v_cache,        \
                                         const int64_t *block_tables, int64_t bt_stride,                        \
                                         const int64_t *query_start_loc, const int64_t *seq_lens, int num_seqs,  \
                                         float *out, int H, int KVH, int D, int64_t NB, int BS, float scale,     \
                                         int nthreads);                                                          \
    WEAK void ember_write_kv##SUFFIX(int64_t ntok, const float *k_new, const float *v_new, int64_t ldkv,        \
                                     const int64_t *slots, T *k_cache, T *v_cache, int KVH, int D, int64_t NB,  \
                                     int BS, int nthreads);
ATTENTION_DECLS(, float)
ATTENTION_DECLS(_f16, _Float16)
/* layer_ops.c */
WEAK void ember_rms_norm(const float *x, int64_t ldx, float *res, int64_t ldr, const float *w, float *out,
                         int64_t ldo, int64_t M, int64_t D, float eps, int threads);
WEAK void ember_rope(float *q, int64_t ldq, int hq, float *k, int64_t ldk, int hk, int64_t M, const int64_t *pos,
                     const float *cos_t, const float *sin_t, int64_t ldc, int D, int rot);
WEAK void ember_swiglu(const float *x, int64_t ldx, float *out, int64_t ldo, int64_t M, int64_t I, int threads);
WEAK int ember_dequant_rows(int type, const uint8_t *table, int64_t row_bytes, const int64_t *ids, int64_t n,
                            float *out, int64_t dim);
/* cpu_features.c, where the tree has it */
WEAK int ember_cpu_features(void);

#define MAX_ARRAYS 80
#define MAX_PARTS 64

typedef struct {
    char op[17];
    int nints, nfloats, narrays, nret;
    int64_t ints[32];
    double floats[8];
    void *arr[MAX_ARRAYS];
    int64_t len[MAX_ARRAYS];
    int64_t ret[MAX_ARRAYS];
    /* arrays the op adds to its reply */
    int nextra;
    void *extra[MAX_PARTS + 1];
    int64_t extra_len[MAX_PARTS + 1];
} Call;

static void die(const char *what) {
    fprintf(stderr, "harness: %s\n", what);
    exit(2);
}

static const uint8_t *cur, *end;

static void take(void *dst, size_t n) {
    if ((size_t)(end - cur) < n) die("input file truncated");
    memcpy(dst, cur, n);
    cur += n;
}

static int64_t i64(void) {
    int64_t v;
    take(&v, 8);
    return v;
}

static int32_t i32(void) {
    int32_t v;
    take(&v, 4);
    return v;
}

static void *alloc(int64_t n) {
    /* 64-byte aligned, as numpy's and torch's big buffers are; never size 0 */
    void *p = aligned_alloc(64, (size_t)((n + 63) / 64 * 64 + 64));
    if (!p) die("out of memory");
    return p;
}

static void read_call(Call *c) {
    memset(c, 0, sizeof *c);
    take(c->op, 16);
    c->nints = i32(), c->nfloats = i32(), c->narrays = i32(), c->nret = i32();
    if (c->nints > 32 || c->nfloats > 8 || c->narrays > MAX_ARRAYS || c->nret > MAX_ARRAYS || c->nints < 0
        || c->nfloats < 0 || c->narrays < 0 || c->nret < 0)
        die("bad call header");
    for (int i = 0; i < c->nints; i++) c->ints[i] = i64();
    for (int i = 0; i < c->nfloats; i++) take(&c->floats[i], 8);
    for (int i = 0; i < c->narrays; i++) {
        int64_t n = i64();
        c->len[i] = n;
        if (n < 0) continue; /* NULL */
        c->arr[i] = alloc(n);
        take(c->arr[i], (size_t)n);
        cur += (8 - n % 8) % 8;
        if (cur > end) die("input file truncated");
    }
    for (int i = 0; i < c->nret; i++) {
        c->ret[i] = i64();
        if (c->ret[i] < 0 || c->ret[i] >= c->narrays) die("bad returned-array index");
    }
}

#define I(n) (c->ints[n])
#define F(n) ((float)c->floats[n])
#define A(n) (c->arr[n])

static void need(const Call *c, int nints, int nfloats, int narrays) {
    if (c->nints != nints || c->nfloats != nfloats || c->narrays != narrays) {
        fprintf(stderr, "harness: %s takes %d ints, %d floats, %d arrays (got %d, %d, %d)\n", c->op, nints, nfloats,
                narrays, c->nints, c->nfloats, c->narrays);
        exit(2);
    }
}

static int64_t run_call(Call *c) {
    const char *op = c->op;
    if (!strcmp(op, "info")) {
        if (!ember_qmm_supported) return NOT_LINKED;
        /* [0]: int32 ember_qmm_supported(t) for t in 0..63; then vectorized, amx, cpu features */
        need(c, 0, 0, 1);
        if (c->len[0] != 4 * 67) die("info: wants a 67-int32 array");
        int32_t *o = A(0);
        for (int t = 0; t < 64; t++) o[t] = ember_qmm_supported(t);
        o[64] = ember_qmm_vectorized();
        o[65] = ember_qmm_amx();
        o[66] = ember_cpu_features ? ember_cpu_features() : -1;
        return 0;
    }
    if (!strcmp(op, "qlinear")) {
        /* ints: nparts, K, M, ldx, threads, flags; arrays: types (i32[nparts]), ns (i64[nparts]), x, bias or
         * NULL, then each part's GGUF blocks (grouped types 260 and 264: u [N][K] bytes, then s and m
         * float32 [N][K/32]). Repacks each part (ember_repack or ember_repack_grouped, as packed.py does),
         * then ember_qlinear_new + ember_qlinear_run into y [M, N], which is the reply's first extra
         * array, followed by the repacked parts. rc: the first failing repack's code, or run's. */
        if (!ember_qlinear_run) return NOT_LINKED;
        const int nparts = (int)I(0);
        if (nparts < 1 || nparts > MAX_PARTS) die("qlinear: bad part count");
        need(c, 6, 0, 4 + nparts);
        const int64_t K = I(1), M = I(2), ldx = I(3);
        const int threads = (int)I(4), flags = (int)I(5);
        const int32_t *types = A(0);
        const int64_t *ns = A(1);
        int64_t N = 0;
        for (int p = 0; p < nparts; p++) N += ns[p];
        float *y = alloc(4 * (M * N > 0 ? M * N : 1));
        for (int64_t i = 0; i < M * N; i++) y[i] = __builtin_nanf("");
        c->extra[0] = y;
        c->extra_len[0] = 4 * M * N;
        c->nextra = 1 + nparts;
        const void *data[MAX_PARTS];
        int64_t rc = 0;
        for (int p = 0; p < nparts; p++) {
            int64_t size = ember_repacked_size(types[p], ns[p], K);
            uint8_t *buf = alloc(size > 0 ? size : 1);
            memset(buf, 0, (size_t)(size > 0 ? size : 1));
            c->extra[1 + p] = buf;
            c->extra_len[1 + p] = size > 0 ? size : 0;
            int r = -2;
            if (size > 0 && (types[p] == 260 || types[p] == 264)) {
                const uint8_t *u = A(4 + p);
                const float *sc = (const float *)(const void *)(u + ns[p] * K);
                r = ember_repack_grouped(types[p], u, sc, sc + ns[p] * (K / 32), ns[p], K, buf, threads);
            } else if (size > 0) {
                r = ember_repack(types[p], A(4 + p), ns[p], K, buf, threads);
            }
            if (r && !rc) rc = r;
            data[p] = buf;
        }
        if (rc) return rc;
        void *h = ember_qlinear_new(nparts, types, data, ns, K, A(3), threads, flags);
        if (!h) return -100;
        rc = ember_qlinear_run(h, A(2), ldx, M, y);
        ember_qlinear_free(h);
        return rc;
    }
    if (!strcmp(op, "decode") || !strcmp(op, "decode_f16")) {
        /* ints: ldq, bt_stride, B, H, KVH, D, NB, BS, threads, ldkv; floats: scale; arrays: q,
         * k_cache, v_cache, block_tables, seq_lens, out, k_new, v_new, slots (the last three may
         * be NULL) */
        need(c, 10, 1, 9);
        if (!ember_paged_decode || !ember_paged_decode_f16) return NOT_LINKED;
#define DECODE(FN) \
    FN(A(0), I(0), A(1), A(2), A(3), I(1), A(4), A(5), (int)I(2), (int)I(3), (int)I(4), (int)I(5), I(6), (int)I(7), \
       F(0), (int)I(8), A(6), A(7), I(9), A(8))
        return op[6] ? DECODE(ember_paged_decode_f16) : DECODE(ember_paged_decode);
    }
    if (!strcmp(op, "prefill") || !strcmp(op, "prefill_f16")) {
        /* ints: ldq, bt_stride, num_seqs, H, KVH, D, NB, BS, threads; floats: scale; arrays: q,
         * k_cache, v_cache, block_tables, query_start_loc, seq_lens, out */
        need(c, 9, 1, 7);
        if (!ember_paged_prefill || !ember_paged_prefill_f16) return NOT_LINKED;
#define PREFILL(FN) FN(A(0), I(0), A(1), A(2), A(3), I(1), A(4), A(5), (int)I(2), A(6), (int)I(3), (int)I(4), \
                        (int)I(5), I(6), (int)I(7), F(0), (int)I(8))
        return op[7] ? PREFILL(ember_paged_prefill_f16) : PREFILL(ember_paged_prefill);
    }
    if (!strcmp(op, "write_kv") || !strcmp(op, "write_kv_f16")) {
        /* ints: ntok, ldkv, KVH, D, NB, BS, threads; arrays: k_new, v_new, slots, k_cache, v_cache */
        need(c, 7, 0, 5);
        if (!ember_write_kv || !ember_write_kv_f16) return NOT_LINKED;
#define WRITE_KV(FN) FN(I(0), A(0), A(1), I(1), A(2), A(3), A(4), (int)I(2), (int)I(3), I(4), (int)I(5), (int)I(6))
        if (op[8]) WRITE_KV(ember_write_kv_f16);
        else WRITE_KV(ember_write_kv);
        return 0;
    }
    if (!strcmp(op, "rms_norm")) {
        /* ints: ldx, ldr, ldo, M, D, threads; floats: eps; arrays: x, res or NULL, w, out */
        need(c, 6, 1, 4);
        if (!ember_rms_norm) return NOT_LINKED;
        ember_rms_norm(A(0), I(0), A(1), I(1), A(2), A(3), I(2), I(3), I(4), F(0), (int)I(5));
        return 0;
    }
    if (!strcmp(op, "rope")) {
        /* ints: ldq, hq, ldk, hk, M, ldc, D, rot; arrays: q, k (rotated in place), pos, cos, sin */
        need(c, 8, 0, 5);
        if (!ember_rope) return NOT_LINKED;
        ember_rope(A(0), I(0), (int)I(1), A(1), I(2), (int)I(3), I(4), A(2), A(3), A(4), I(5), (int)I(6), (int)I(7));
        return 0;
    }
    if (!strcmp(op, "swiglu")) {
        /* ints: ldx, ldo, M, I, threads; arrays: x, out */
        need(c, 5, 0, 2);
        if (!ember_swiglu) return NOT_LINKED;
        ember_swiglu(A(0), I(0), A(1), I(1), I(2), I(3), (int)I(4));
        return 0;
    }
    if (!strcmp(op, "dequant_rows")) {
        /* ints: type, row_bytes, n, dim; arrays: table, ids, out */
        need(c, 4, 0, 3);
        if (!ember_dequant_rows) return NOT_LINKED;
        return ember_dequant_rows((int)I(0), A(0), I(1), A(1), I(2), A(2), I(3));
    }
    fprintf(stderr, "harness: unknown op '%s'\n", op);
    exit(2);
}

static void put(FILE *f, const void *p, size_t n) {
    if (n && fwrite(p, 1, n, f) != n) die("cannot write the output file");
}

static void put_array(FILE *f, const void *p, int64_t n) {
    static const uint8_t zeros[8] = {0};
    put(f, &n, 8);
    put(f, p, (size_t)n);
    put(f, zeros, (size_t)((8 - n % 8) % 8));
}

int main(int argc, char **argv) {
    if (argc != 3) die("usage: harness IN OUT");
    FILE *in = fopen(argv[1], "rb");
    if (!in) die("cannot open the input file");
    fseek(in, 0, SEEK_END);
    long size = ftell(in);
    fseek(in, 0, SEEK_SET);
    uint8_t *buf = malloc((size_t)size + 1);
    if (!buf || fread(buf, 1, (size_t)size, in) != (size_t)size) die("cannot read the input file");
    fclose(in);
    cur = buf, end = buf + size;
    char magic[4];
    take(magic, 4);
    if (memcmp(magic, "EMBI", 4)) die("not a harness input file");
    const uint32_t ncalls = (uint32_t)i32();
    FILE *out = fopen(argv[2], "wb");
    if (!out) die("cannot open the output file");
    put(out, "EMBO", 4);
    put(out, &ncalls, 4);
    Call *c = malloc(sizeof *c);
    if (!c) die("out of memory");
    for (uint32_t k = 0; k < ncalls; k++) {
        read_call(c);
        const int64_t rc = run_call(c), n = c->nret + c->nextra;
        put(out, &rc, 8);
        put(out, &n, 8);
        for (int i = 0; i < c->nret; i++) {
            const int64_t j = c->ret[i];
            put_array(out, c->arr[j], c->len[j] < 0 ? 0 : c->len[j]);
        }
        for (int i = 0; i < c->nextra; i++) put_array(out, c->extra[i], c->extra_len[i]);
        for (int i = 0; i < c->narrays; i++) free(c->arr[i]);
        for (int i = 0; i < c->nextra; i++) free(c->extra[i]);
    }
    if (cur != end) die("trailing bytes after the last call");
    if (fclose(out)) die("cannot write the output file");
    free(c);
    free(buf);
    return 0;
}
