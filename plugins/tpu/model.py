"""The llama family (Llama 2/3, Mistral, Qwen2 with q/k/v biases, Qwen3 with q/k norms) as pure
JAX functions, with the numerics of ember.models.llama.

The layers' weights are stacked ([num_layers, ...]) and run with lax.scan: the step compiles one
layer, not thirty, which keeps compilation short. The KV pool is carried through the scan and
updated in place (see attention.py for its layout).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ember.config import ModelConfig
from ember.models.registry import ARCHITECTURES  # every dense one: the MoE ones are refused below
from ember.ops.rope import rope_tables
from ember_tpu import attention
from ember_tpu.attention import AttentionPlan, PagedInputs



def dequantize(weight) -> np.ndarray:
    """A weight as float32 numpy, without torch: a GGUF tensor through the gguf package's
    dequantizers, AWQ/GPTQ/compressed-tensors integers and FP8 through their own reference."""
    if hasattr(weight, "dequantize_numpy"):
        return weight.dequantize_numpy()
    from gguf.quants import dequantize as gguf_dequantize

    return np.asarray(gguf_dequantize(weight.data, weight.qtype), dtype=np.float32).reshape(weight.shape)


def unsupported(cfg: ModelConfig) -> str | None:
    if cfg.num_experts:
        return (f"mixture-of-experts models ({cfg.architecture}, {cfg.num_experts} experts) are not supported "
                f"by the JAX runner yet; use another backend (--device cpu_gguf or cuda)")
    if cfg.architecture not in ARCHITECTURES:
        return (f"architecture {cfg.architecture!r} is not supported by the JAX runner "
                f"(supported: {', '.join(ARCHITECTURES)})")
    return None


# --------------------------------------------------------------------------------- the weights

def load_params(cfg: ModelConfig, weights, dtype, device, max_positions: int) -> dict:
    """The model's weights as device arrays: matmul weights in the compute dtype, [out, in] as GGUF
    and torch hold them; norms and RoPE tables in float32 (the reference keeps them so)."""
    why = unsupported(cfg)
    if why:
        raise ValueError(why)
    L = cfg.num_layers

    def put(x, dt=dtype):
        return jax.device_put(np.asarray(x, dtype=dt), device)  # converted on the host, moved once

    def stacked(fn, dt=dtype):
        # one layer at a time into a host array of the final dtype: the float32 copy of one
        # layer's weights is the only transient
        first = fn(0)
        out = np.empty((L, *first.shape), dt)
        out[0] = first
        for i in range(1, L):
            out[i] = fn(i)
        return put(out, dt)

    def w(name):
        return dequantize(weights[name])

    def fused(i, parts):
        return np.concatenate([w(f"model.layers.{i}.{p}.weight") for p in parts], axis=0)

    def bias(i):
        names = [f"model.layers.{i}.self_attn.{x}_proj" for x in "qkv"]
        return np.concatenate([dequantize(weights[n + ".bias"]).reshape(-1) if n + ".bias" in weights
                               else np.zeros(weights[n + ".weight"].shape[0], np.float32) for n in names])

    def norm(i, name):
        return w(f"model.layers.{i}.{name}.weight").reshape(-1)

    layers = {
        "qkv": stacked(lambda i: fused(i, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])),
        "o": stacked(lambda i: fused(i, ["self_attn.o_proj"])),
        "gate_up": stacked(lambda i: fused(i, ["mlp.gate_proj", "mlp.up_proj"])),
        "down": stacked(lambda i: fused(i, ["mlp.down_proj"])),
        "in_norm": stacked(lambda i: norm(i, "input_layernorm"), jnp.float32),
        "post_norm": stacked(lambda i: norm(i, "post_attention_layernorm"), jnp.float32),
    }
    if cfg.attention_bias:
        layers["qkv_bias"] = stacked(bias, jnp.float32)
    if cfg.qk_norm:
        layers["q_norm"] = stacked(lambda i: norm(i, "self_attn.q_norm"), jnp.float32)
        layers["k_norm"] = stacked(lambda i: norm(i, "self_attn.k_norm"), jnp.float32)
    embed = put(w("model.embed_tokens.weight"))
    cos, sin = rope_tables(cfg, max_positions)
    return {
        "embed": embed,
        # tied embeddings: the same device buffer serves both
        "lm_head": put(w("lm_head.weight")) if "lm_head.weight" in weights else embed,
        "final_norm": put(w("model.norm.weight").reshape(-1), jnp.float32),
        "cos": put(cos, jnp.float32),
        "sin": put(sin, jnp.float32),
        "layers": layers,
    }


# ------------------------------------------------------------------------------------ the ops

def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """y = x @ w.T (+ b) for w [out, in], accumulated and returned in float32."""
    y = jax.lax.dot_general(x.astype(w.dtype), w, (((x.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return y if b is None else y + b


def embed(table: jax.Array, ids: jax.Array) -> jax.Array:
    return jnp.take(table, ids, axis=0)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return (weight * (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps))).astype(x.dtype)


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE of x [T, heads, head_dim] over the first cos.shape[-1] dims; cos, sin [T, rot]."""
    rot = cos.shape[-1]
    half = rot // 2
    r = x[..., :rot].astype(jnp.float32)
    c, s = cos[:, None, :], sin[:, None, :]
    rotated = jnp.concatenate([-r[..., half:], r[..., :half]], axis=-1)
    out = (r * c + rotated * s).astype(x.dtype)
    return jnp.concatenate([out, x[..., rot:]], axis=-1) if rot < x.shape[-1] else out


def swiglu(gate_up: jax.Array) -> jax.Array:
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return jax.nn.silu(gate) * up


# ---------------------------------------------------------------------------------- the step

def forward(params: dict, k_pool: jax.Array, v_pool: jax.Array, token_ids: jax.Array, inputs: PagedInputs,
            *, cfg: ModelConfig, num_blocks: int, plan: AttentionPlan, dtype):
    """Every layer over the step's tokens. Returns the final-normed hidden states [T, hidden] and
    the updated pools."""
    h, kvh, d, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    T = token_ids.shape[0]
    scale = d ** -0.5
    cos, sin = params["cos"][inputs.positions], params["sin"][inputs.positions]
    x = embed(params["embed"], token_ids).astype(dtype)

    def layer(carry, lp):
        x, k_pool, v_pool = carry
        y = rms_norm(x, lp["in_norm"], eps)
        qkv = linear(y, lp["qkv"], lp.get("qkv_bias")).astype(dtype)
        q, k, v = jnp.split(qkv, [h * d, (h + kvh) * d], axis=-1)
        q, k, v = q.reshape(T, h, d), k.reshape(T, kvh, d), v.reshape(T, kvh, d)
        if cfg.qk_norm:
            q, k = rms_norm(q, lp["q_norm"], eps), rms_norm(k, lp["k_norm"], eps)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        a, k_pool, v_pool = attention.attend(plan, q, k, v, k_pool, v_pool, inputs, scale,
                                             page_offset=lp["index"] * num_blocks)
        x = x + linear(a.reshape(T, h * d), lp["o"]).astype(dtype)
        y = rms_norm(x, lp["post_norm"], eps)
        x = x + linear(swiglu(linear(y, lp["gate_up"])).astype(dtype), lp["down"]).astype(dtype)
        return (x, k_pool, v_pool), None

    xs = dict(params["layers"], index=jnp.arange(cfg.num_layers, dtype=jnp.int32))
    (x, k_pool, v_pool), _ = jax.lax.scan(layer, (x, k_pool, v_pool), xs)
    return rms_norm(x, params["final_norm"], eps), k_pool, v_pool


def step(params: dict, k_pool: jax.Array, v_pool: jax.Array, token_ids: jax.Array, inputs: PagedInputs,
         sample_rows: jax.Array, *, cfg: ModelConfig, num_blocks: int, plan: AttentionPlan, dtype):
    """One scheduler step: returns (logits of sample_rows [R, vocab] float32, hidden [T, hidden],
    k_pool, v_pool)."""
    hidden, k_pool, v_pool = forward(params, k_pool, v_pool, token_ids, inputs, cfg=cfg, num_blocks=num_blocks,
                                     plan=plan, dtype=dtype)
    return linear(hidden[sample_rows], params["lm_head"]), hidden, k_pool, v_pool


@jax.jit
def logits_at(lm_head: jax.Array, hidden: jax.Array, rows: jax.Array) -> jax.Array:
    """Logits of some rows of a step's hidden states (prompt logits)."""
    return linear(hidden[rows], lm_head)
