// One scheduler step of a llama-family decoder, start to end, in one call.
//
// The kernels stay where they are (quant_matmul.c, layer_ops.c, paged_attention.c); this file only
// strings them together, through function pointers the Python side takes from those libraries. A
// decode step makes some 250 kernel calls, and from Python each costs microseconds of argument
// conversion: for one stream that glue was a fifth of a token's time.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int (*linear_fn)(const void *handle, const float *x, int64_t ldx, int64_t M, float *y);
typedef void (*rms_norm_fn)(const float *x, int64_t ldx, float *res, int64_t ldr, const float *w, float *out,
                            int64_t ldo, int64_t M, int64_t D, float eps, int threads);
typedef void (*rope_fn)(float *q, int64_t ldq, int hq, float *k, int64_t ldk, int hk, int64_t M, const int64_t *pos,
                        const float *cos_t, const float *sin_t, int64_t ldc, int D, int rot);
typedef void (*swiglu_fn)(const float *x, int64_t ldx, float *out, int64_t ldo, int64_t M, int64_t I, int threads);
typedef int (*decode_fn)(const float *q, int64_t ldq, void *k_cache, void *v_cache, const int64_t *block_tables,
                         int64_t bt_stride, const int64_t *seq_lens, float *out, int B, int H, int KVH, int D,
                         int64_t NB, int BS, float scale, int threads, const float *k_new, const float *v_new,
                         int64_t ldkv, const int64_t *slots);
typedef void (*write_kv_fn)(int64_t ntok, const float *k_new, const float *v_new, int64_t ldkv, const int64_t *slots,
                            void *k_cache, void *v_cache, int KVH, int D, int64_t NB, int BS, int threads);
typedef int (*prefill_fn)(const float *q, int64_t ldq, const void *k_cache, const void *v_cache,
                          const int64_t *block_tables, int64_t bt_stride, const int64_t *query_start_loc,
                          const int64_t *seq_lens, int num_seqs, float *out, int H, int KVH, int D, int64_t NB,
                          int BS, float scale, int threads);

// Mirrored field for field by runner.py's ctypes Structure.
typedef struct {
    linear_fn linear;
    rms_norm_fn rms_norm;
    rope_fn rope;
    swiglu_fn swiglu;
    decode_fn decode;
    write_kv_fn write_kv;
    prefill_fn prefill;
    int64_t n_layers, hidden, heads, kv_heads, head_dim, inter, rot, threads, num_blocks, block_size;
    float eps, scale;
    const float *cos, *sin;
    int64_t ld_rope;
    const float *final_norm;
    const void *const *qkv, *const *o, *const *gate_up, *const *down;  // quantized-linear handles, per layer
    const float *const *in_norm, *const *post_norm;
    const float *const *q_norm, *const *k_norm;  // per-head norms (Qwen3), or NULL
    void *const *k_cache, *const *v_cache;
    const void *lm_head;
} Llama;

// x: [T, hidden] embeddings of the step's tokens; it is overwritten. For each of n_out rows
// (indices into the T tokens), hidden_out gets the final normed hidden state and, when logits is
// not NULL, logits its output-head row. Returns 0, or the first failing kernel's code (negative);
// -1 is out of memory.
int ember_llama_step(const Llama *m, int64_t T, float *x, const int64_t *positions, const int64_t *slots,
                     int n_seqs, const int64_t *query_start_loc, const int64_t *seq_lens,
                     const int64_t *block_tables, int64_t bt_stride, int decode_only, int64_t n_out,
                     const int64_t *out_rows, float *hidden_out, float *logits) {
    const int64_t H = m->heads, KVH = m->kv_heads, D = m->head_dim, E = m->hidden, I = m->inter;
    const int64_t ldqkv = (H + 2 * KVH) * D;
    const int th = (int)m->threads;
    int rc = 0;
    float *res = malloc(sizeof(float) * T * E), *y = malloc(sizeof(float) * T * E);
    float *qkv = malloc(sizeof(float) * T * ldqkv), *att = malloc(sizeof(float) * T * H * D);
    float *gu = malloc(sizeof(float) * T * 2 * I), *act = malloc(sizeof(float) * T * I);
    float *lx = malloc(sizeof(float) * (n_out ? n_out : 1) * E), *lr = malloc(sizeof(float) * (n_out ? n_out : 1) * E);
    if (!res || !y || !qkv || !att || !gu || !act || !lx || !lr) {
        rc = -1;
        goto done;
    }
    // The residual stream starts as the embeddings; each block's output (x) is added into it by
    // the next norm, as in vLLM, so no separate add pass runs.
    memcpy(res, x, sizeof(float) * T * E);
    for (int64_t l = 0; l < m->n_layers; l++) {
        if (l == 0)
            m->rms_norm(res, E, NULL, 0, m->in_norm[l], y, E, T, E, m->eps, th);
        else
            m->rms_norm(x, E, res, E, m->in_norm[l], y, E, T, E, m->eps, th);
        if ((rc = m->linear(m->qkv[l], y, E, T, qkv))) goto done;
        float *q = qkv, *k = qkv + H * D, *v = qkv + (H + KVH) * D;
        if (m->q_norm) {  // per head, in place, before RoPE
            for (int64_t t = 0; t < T; t++) {
                m->rms_norm(q + t * ldqkv, D, NULL, 0, m->q_norm[l], q + t * ldqkv, D, H, D, m->eps, 1);
                m->rms_norm(k + t * ldqkv, D, NULL, 0, m->k_norm[l], k + t * ldqkv, D, KVH, D, m->eps, 1);
            }
        }
        m->rope(q, ldqkv, (int)H, k, ldqkv, (int)KVH, T, positions, m->cos, m->sin, m->ld_rope, (int)D, (int)m->rot);
        if (decode_only) {  // one row per sequence: the kernel writes the new K/V itself
            rc = m->decode(q, ldqkv, m->k_cache[l], m->v_cache[l], block_tables, bt_stride, seq_lens, att, n_seqs,
                           (int)H, (int)KVH, (int)D, m->num_blocks, (int)m->block_size, m->scale, th, k, v, ldqkv,
                           slots);
        } else {
            m->write_kv(T, k, v, ldqkv, slots, m->k_cache[l], m->v_cache[l], (int)KVH, (int)D, m->num_blocks,
                        (int)m->block_size, th);
            rc = m->prefill(q, ldqkv, m->k_cache[l], m->v_cache[l], block_tables, bt_stride, query_start_loc,
                            seq_lens, n_seqs, att, (int)H, (int)KVH, (int)D, m->num_blocks, (int)m->block_size,
                            m->scale, th);
        }
        if (rc) goto done;
        if ((rc = m->linear(m->o[l], att, H * D, T, x))) goto done;
        m->rms_norm(x, E, res, E, m->post_norm[l], y, E, T, E, m->eps, th);
        if ((rc = m->linear(m->gate_up[l], y, E, T, gu))) goto done;
        m->swiglu(gu, 2 * I, act, I, T, I, th);
        if ((rc = m->linear(m->down[l], act, I, T, x))) goto done;
    }
    // Only the rows someone reads go through the last norm and the output head.
    for (int64_t r = 0; r < n_out; r++) {
        memcpy(lx + r * E, x + out_rows[r] * E, sizeof(float) * E);
        memcpy(lr + r * E, res + out_rows[r] * E, sizeof(float) * E);
    }
    m->rms_norm(lx, E, lr, E, m->final_norm, hidden_out, E, n_out, E, m->eps, th);
    if (logits && n_out) rc = m->linear(m->lm_head, hidden_out, E, n_out, logits);
done:
    free(res); free(y); free(qkv); free(att); free(gu); free(act); free(lx); free(lr);
    return rc;
}
