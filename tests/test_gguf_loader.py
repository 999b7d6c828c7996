"""GGUF -> ModelConfig and HF-named quantized weights (with llama's q/k un-permutation)."""
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import gguf
from gguf import GGMLQuantizationType as Q

from ember.gguf import GGUFError, GGUFFile, load_gguf_weights, model_config_from_gguf

SMOL = os.environ.get("EMBER_SMOLLM2_GGUF")
needs_smol = pytest.mark.skipif(not SMOL, reason="EMBER_SMOLLM2_GGUF is not set")

H, HEADS, KV_HEADS, FF, VOCAB = 64, 4, 2, 96, 40


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to llama q/k rows (and biases)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def q8(w: np.ndarray) -> np.ndarray:
    return gguf.quants.quantize(w, Q.Q8_0)


def dq8(q: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(q, Q.Q8_0).copy())


class Synth:
    """A tiny random model written to GGUF; keeps the HF-layout weights it wrote."""

    def __init__(self, path: Path, arch="llama", layers=2, head_dim=H // HEADS, bias=False,
                 qk_norm=False, experts=0, tied=True, extra=(), skip=(), meta=None):
        rng = np.random.default_rng(0)
        self.hf: dict[str, np.ndarray] = {}
        w = gguf.GGUFWriter(str(path), arch)
        w.add_context_length(256)
        w.add_embedding_length(H)
        w.add_feed_forward_length(FF)
        w.add_block_count(layers)
        w.add_head_count(HEADS)
        w.add_head_count_kv(KV_HEADS)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_rope_freq_base(1e6)
        if head_dim != H // HEADS:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        if experts:
            w.add_expert_count(experts)
            w.add_expert_used_count(2)
        w.add_token_list([f"t{i}" for i in range(VOCAB)])
        for k, v in (meta or {}).items():
            adder = {str: w.add_string, float: w.add_float32, int: w.add_uint32}[type(v)]
            adder(k, v)
        permute = arch == "llama"

        def add(name, shape, quant=False, n_head=0):
            if name in skip:
                return
            x = (rng.standard_normal(shape) * 0.1).astype(np.float32)
            self.hf[name] = x
            stored = llamacpp_permute(x, n_head) if permute and n_head else x
            if quant:
                w.add_tensor(name, q8(stored), raw_dtype=Q.Q8_0)
            else:
                w.add_tensor(name, stored)

        q, kv = HEADS * head_dim, KV_HEADS * head_dim
        add("token_embd.weight", (VOCAB, H), quant=True)
        add("output_norm.weight", (H,))
        if not tied:
            add("output.weight", (VOCAB, H), quant=True)
        for i in range(layers):
            b = f"blk.{i}."
            add(b + "attn_norm.weight", (H,))
            add(b + "attn_q.weight", (q, H), quant=True, n_head=HEADS)
            add(b + "attn_k.weight", (kv, H), n_head=KV_HEADS)  # F32: un-permuted exactly
            add(b + "attn_v.weight", (kv, H), quant=True)
            add(b + "attn_output.weight", (H, q), quant=True)
            if bias:
                add(b + "attn_q.bias", (q,), n_head=HEADS)
                add(b + "attn_k.bias", (kv,), n_head=KV_HEADS)
                add(b + "attn_v.bias", (kv,))
            if qk_norm:
                add(b + "attn_q_norm.weight", (head_dim,))
                add(b + "attn_k_norm.weight", (head_dim,))
            add(b + "ffn_norm.weight", (H,))
            if experts:
                add(b + "ffn_gate_inp.weight", (experts, H))
                add(b + "ffn_gate_exps.weight", (experts, FF, H), quant=True)
                add(b + "ffn_up_exps.weight", (experts, FF, H), quant=True)
                add(b + "ffn_down_exps.weight", (experts, H, FF))
            else:
                add(b + "ffn_gate.weight", (FF, H), quant=True)
                add(b + "ffn_up.weight", (FF, H), quant=True)
                add(b + "ffn_down.weight", (H, FF), quant=True)
        for name in extra:
            add(name, (8,))
        finish(w)


def finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def load(path):
    gf = GGUFFile(path)
    cfg = model_config_from_gguf(gf)
    return gf, cfg, load_gguf_weights(gf, cfg)


def test_llama_unpermutes_q_and_k(tmp_path):
    path = tmp_path / "llama.gguf"
    m = Synth(path, bias=True)
    gf, cfg, w = load(path)
    assert cfg.attention_bias and cfg.tie_word_embeddings and "lm_head.weight" not in w
    for i in range(2):
        p, b = f"model.layers.{i}.self_attn.", f"blk.{i}."
        q = w[p + "q_proj.weight"]
        assert q.qtype == Q.Q8_0 and q.shape == (HEADS * 16, H) and q.data.shape == (64, 2 * 34)
        # rows were reordered as whole quantized rows: same as quantizing the HF weight
        assert torch.equal(q.dequantize(), dq8(q8(m.hf[b + "attn_q.weight"])))
        for ours, theirs in [("k_proj.weight", "attn_k.weight"), ("q_proj.bias", "attn_q.bias"),
                             ("k_proj.bias", "attn_k.bias"), ("v_proj.bias", "attn_v.bias")]:
            assert torch.equal(w[p + ours].dequantize(), torch.from_numpy(m.hf[b + theirs]))
        assert w[p + "q_proj.bias"].data.shape == (1, HEADS * 16 * 4)
    # and the permutation really was there to undo
    as_stored = torch.from_numpy(gguf.quants.dequantize(gf.raw("blk.0.attn_q.weight"), Q.Q8_0))
    assert not torch.equal(as_stored, dq8(q8(m.hf["blk.0.attn_q.weight"])))
    gf.close()


def test_names_views_and_values(tmp_path):
    path = tmp_path / "llama.gguf"
    m = Synth(path, layers=1, tied=False)
    gf, cfg, w = load(path)
    assert not cfg.tie_word_embeddings
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
        f"model.layers.0.{n}.weight" for n in [
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
            "mlp.down_proj"]}
    assert set(w) == expected
    v = w["model.layers.0.self_attn.v_proj.weight"]
    assert np.shares_memory(v.data, gf.raw("blk.0.attn_v.weight"))  # zero-copy
    assert v.gguf_name == "blk.0.attn_v.weight"
    assert v.name == "model.layers.0.self_attn.v_proj.weight"
    assert torch.equal(v.dequantize(), dq8(q8(m.hf["blk.0.attn_v.weight"])))
    norm = w["model.norm.weight"].dequantize()
    assert torch.equal(norm, torch.from_numpy(m.hf["output_norm.weight"]))
    assert w["model.norm.weight"].data.shape == (1, H * 4)
    assert w["model.layers.0.mlp.down_proj.weight"].shape == (H, FF)
    gf.close()


def test_moe_experts_are_split(tmp_path):
    path = tmp_path / "moe.gguf"
    m = Synth(path, layers=1, experts=4)
    gf, cfg, w = load(path)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.intermediate_size) == (4, 2, FF)
    assert w["model.layers.0.mlp.gate.weight"].shape == (4, H)
    for j in range(4):
        e = f"model.layers.0.mlp.experts.{j}."
        gate, down = w[e + "gate_proj.weight"], w[e + "down_proj.weight"]
        assert gate.shape == (FF, H) and down.shape == (H, FF)
        assert np.shares_memory(gate.data, gf.raw("blk.0.ffn_gate_exps.weight"))
        assert torch.equal(gate.dequantize(), dq8(q8(m.hf["blk.0.ffn_gate_exps.weight"][j])))
        assert torch.equal(w[e + "up_proj.weight"].dequantize(),
                           dq8(q8(m.hf["blk.0.ffn_up_exps.weight"][j])))
        down_ref = torch.from_numpy(m.hf["blk.0.ffn_down_exps.weight"][j])
        assert torch.equal(down.dequantize(), down_ref)
    assert "model.layers.0.mlp.gate_proj.weight" not in w
    gf.close()


def test_qwen2_config_and_no_permutation(tmp_path):
    path = tmp_path / "qwen2.gguf"
    m = Synth(path, arch="qwen2", layers=1, bias=True, tied=False, meta={
        "qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0,
        "qwen2.rope.scaling.original_context_length": 32768})
    gf, cfg, w = load(path)
    assert cfg.architecture == "qwen2"
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (1, H, FF)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (HEADS, KV_HEADS, 16)
    assert cfg.vocab_size == VOCAB  # from the token list: no qwen2.vocab_size key
    assert cfg.context_length == 256 and cfg.rope_theta == 1e6
    assert cfg.rms_norm_eps == pytest.approx(1e-6)
    assert cfg.attention_bias and not cfg.tie_word_embeddings and not cfg.qk_norm
    assert (cfg.rope_scaling.type, cfg.rope_scaling.factor,
            cfg.rope_scaling.original_context_length) == ("yarn", 4.0, 32768)
    q = w["model.layers.0.self_attn.q_proj.weight"]
    assert np.shares_memory(q.data, gf.raw("blk.0.attn_q.weight"))
    assert torch.equal(q.dequantize(), dq8(q8(m.hf["blk.0.attn_q.weight"])))
    assert torch.equal(w["model.layers.0.self_attn.k_proj.bias"].dequantize(),
                       torch.from_numpy(m.hf["blk.0.attn_k.bias"]))
    gf.close()


def test_qwen3_head_dim_and_qk_norm(tmp_path):
    path = tmp_path / "qwen3.gguf"
    Synth(path, arch="qwen3", layers=1, head_dim=32, qk_norm=True)
    gf, cfg, w = load(path)
    assert cfg.qk_norm and cfg.head_dim == 32 and not cfg.attention_bias
    assert w["model.layers.0.self_attn.q_proj.weight"].shape == (HEADS * 32, H)
    assert w["model.layers.0.self_attn.q_norm.weight"].shape == (32,)
    assert w["model.layers.0.self_attn.k_norm.weight"].shape == (32,)
    gf.close()


def test_errors(tmp_path, caplog):
    Synth(tmp_path / "gpt2.gguf", arch="gpt2", layers=1)
    with GGUFFile(tmp_path / "gpt2.gguf") as gf, \
            pytest.raises(GGUFError, match="unsupported architecture 'gpt2'.*llama, qwen2"):
        model_config_from_gguf(gf)

    Synth(tmp_path / "missing.gguf", layers=1, skip={"blk.0.ffn_up.weight"})
    with GGUFFile(tmp_path / "missing.gguf") as gf, \
            pytest.raises(GGUFError, match="blk.0.ffn_up.weight"):
        load_gguf_weights(gf, model_config_from_gguf(gf))

    Synth(tmp_path / "extra.gguf", layers=1, extra=["rope_freqs.weight", "blk.0.mystery.weight"])
    with GGUFFile(tmp_path / "extra.gguf") as gf, caplog.at_level(logging.WARNING):
        w = load_gguf_weights(gf, model_config_from_gguf(gf))
    assert "blk.0.mystery.weight" in caplog.text and "rope_freqs" in caplog.text
    assert not any("mystery" in n for n in w)

    path = tmp_path / "nokey.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_embedding_length(H)
    finish(w)
    with GGUFFile(path) as gf, pytest.raises(GGUFError, match="llama.attention.head_count"):
        model_config_from_gguf(gf)

    with GGUFFile(tmp_path / "extra.gguf") as gf, pytest.raises(GGUFError, match="shape"):
        load_gguf_weights(gf, replace(model_config_from_gguf(gf), intermediate_size=FF * 2))


# ------------------------------------------------------------------------- the real file

@needs_smol
def test_smollm2_config_and_weights():
    with GGUFFile(SMOL) as gf:
        cfg = model_config_from_gguf(gf)
        assert cfg.architecture == "llama"
        assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
        assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (9, 3, 64)
        assert cfg.vocab_size == 49152 and cfg.context_length == 8192
        assert cfg.tie_word_embeddings and not cfg.attention_bias and not cfg.qk_norm
        assert cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == pytest.approx(1e-5)
        assert cfg.rotary_dim == 64 and cfg.rope_scaling.type == "none" and cfg.num_experts == 0
        w = load_gguf_weights(gf, cfg)
        assert len(w) == 2 + 30 * 9
        q = w["model.layers.0.self_attn.q_proj.weight"]
        assert q.qtype == Q.Q4_1 and q.shape == (576, 576) and q.data.shape == (576, 18 * 20)
        assert w["model.embed_tokens.weight"].qtype == Q.Q8_0


@needs_smol
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smollm2_matches_transformers():
    """transformers un-permutes q/k itself while dequantizing: every weight must agree exactly."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(Path(SMOL).parent), gguf_file=Path(SMOL).name, dtype=torch.float32)
    ref = model.state_dict()
    with GGUFFile(SMOL) as gf:
        ours = load_gguf_weights(gf, model_config_from_gguf(gf))
        for name, qw in ours.items():
            assert torch.equal(qw.dequantize(), ref[name]), name
    assert {n for n in ref if n != "lm_head.weight"} == set(ours)
