"""A tiny random-weight llama GGUF with SmolLM2's real tokenizer: a whole model that loads in
milliseconds, for tests that need an engine but not good answers."""
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, GGUFValueType

from ember.gguf.reader import GGUFFile

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128


def write_tiny_llama(path: Path, tokenizer_source: Path, seed: int = 0, context: int = 1024) -> Path:
    src = GGUFFile(tokenizer_source)
    meta = src.metadata
    vocab = len(meta["tokenizer.ggml.tokens"])
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(context)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    for key, value in meta.items():
        if not key.startswith("tokenizer."):
            continue
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            w.add_array(key, value)
        elif key == "tokenizer.ggml.token_type":
            w.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
    src.close()
    rng = np.random.default_rng(seed)

    def t(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    head_dim = HIDDEN // HEADS
    w.add_tensor("token_embd.weight", t(vocab, HIDDEN))
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    for i in range(LAYERS):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(HIDDEN, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(HIDDEN, np.float32))
        w.add_tensor(p + "attn_q.weight", t(HEADS * head_dim, HIDDEN))
        w.add_tensor(p + "attn_k.weight", t(KV_HEADS * head_dim, HIDDEN))
        w.add_tensor(p + "attn_v.weight", t(KV_HEADS * head_dim, HIDDEN))
        w.add_tensor(p + "attn_output.weight", t(HIDDEN, HEADS * head_dim))
        w.add_tensor(p + "ffn_gate.weight", t(FFN, HIDDEN))
        w.add_tensor(p + "ffn_up.weight", t(FFN, HIDDEN))
        w.add_tensor(p + "ffn_down.weight", t(HIDDEN, FFN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
