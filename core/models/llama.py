"""The llama family (Llama 2/3, Mistral, Qwen2/3, Mixtral-style MoE) as one torch model.

The model owns no kernels: its linear layers, embedding and paged attention come from the backend,
so each device plugs its fast paths in from outside.
"""
from __future__ import annotations

import torch

from ember.backend import AttentionMetadata, Backend
from ember.config import ModelConfig
from ember.ops.rope import rope_tables


def _norm_weight(weights, name: str, device: torch.device) -> torch.Tensor:
    return weights[name].dequantize().reshape(-1).to(device)


class LlamaLayer:
    def __init__(self, cfg: ModelConfig, weights, i: int, backend: Backend):
        p = f"model.layers.{i}."
        self.cfg = cfg
        dev = torch.device(backend.device)
        self.input_norm = _norm_weight(weights, p + "input_layernorm.weight", dev)
        self.post_norm = _norm_weight(weights, p + "post_attention_layernorm.weight", dev)
        names = [p + f"self_attn.{x}_proj" for x in "qkv"]
        biases = [weights.get(n + ".bias") for n in names] if cfg.attention_bias else None
        self.qkv = backend.create_linear([weights[n + ".weight"] for n in names], biases)
        self.o = backend.create_linear([weights[p + "self_attn.o_proj.weight"]])
        self.q_norm = _norm_weight(weights, p + "self_attn.q_norm.weight", dev) if cfg.qk_norm else None
        self.k_norm = _norm_weight(weights, p + "self_attn.k_norm.weight", dev) if cfg.qk_norm else None
        if cfg.num_experts:
            self.router = backend.create_linear([weights[p + "mlp.gate.weight"]])
            self.experts = [
                (backend.create_linear([weights[p + f"mlp.experts.{j}.gate_proj.weight"],
                                        weights[p + f"mlp.experts.{j}.up_proj.weight"]]),
                 backend.create_linear([weights[p + f"mlp.experts.{j}.down_proj.weight"]]))
                for j in range(cfg.num_experts)
            ]
        else:
            self.gate_up = backend.create_linear([weights[p + "mlp.gate_proj.weight"],
                                                  weights[p + "mlp.up_proj.weight"]])
            self.down = backend.create_linear([weights[p + "mlp.down_proj.weight"]])

    def mlp(self, x: torch.Tensor, ops) -> torch.Tensor:
        if not self.cfg.num_experts:
            return self.down(ops.swiglu(self.gate_up(x)))
        # Mixtral-style routing: softmax over experts, keep the top k, renormalise (unless the
        # model says not to, as Qwen3-MoE's norm_topk_prob may).
        probs = self.router(x).softmax(-1)
        weight, chosen = probs.topk(self.cfg.num_experts_per_tok, dim=-1)
        if self.cfg.expert_weights_norm:
            weight = weight / weight.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for j in chosen.unique().tolist():
            rows, slot = (chosen == j).nonzero(as_tuple=True)
            gate_up, down = self.experts[j]
            out.index_add_(0, rows, down(ops.swiglu(gate_up(x[rows]))) * weight[rows, slot, None])
        return out


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights, backend: Backend, max_positions: int | None = None):
        self.cfg = cfg
        self.embed = backend.create_embedding(weights["model.embed_tokens.weight"])
        self.layers = [LlamaLayer(cfg, weights, i, backend) for i in range(cfg.num_layers)]
        dev = torch.device(backend.device)
        self.norm = _norm_weight(weights, "model.norm.weight", dev)
        head = weights.get("lm_head.weight") or weights["model.embed_tokens.weight"]
        self.lm_head = backend.create_linear([head])
        cos, sin = rope_tables(cfg, max_positions or cfg.context_length)
        self.cos, self.sin = torch.from_numpy(cos).to(dev), torch.from_numpy(sin).to(dev)
        self.attn = backend.attention()
        self.ops = backend.layer_ops()
        self.scale = cfg.head_dim ** -0.5

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata) -> torch.Tensor:
        cfg, ops, eps = self.cfg, self.ops, self.cfg.rms_norm_eps
        h, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        x, residual = self.embed(input_ids), None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            # residual carries the stream x_l; x is what the last block adds to it
            y, residual = ops.rms_norm(x, layer.input_norm, eps, residual)
            q, k, v = layer.qkv(y).split([h * d, kvh * d, kvh * d], dim=-1)
            q, k, v = q.view(-1, h, d), k.view(-1, kvh, d), v.view(-1, kvh, d)
            if layer.q_norm is not None:
                q, _ = ops.rms_norm(q, layer.q_norm, eps)
                k, _ = ops.rms_norm(k, layer.k_norm, eps)
            q, k = ops.rope(q, k, positions, self.cos, self.sin)
            a = self.attn.forward(q, k, v, k_cache, v_cache, meta, self.scale)
            y, residual = ops.rms_norm(layer.o(a.reshape(-1, h * d)), layer.post_norm, eps, residual)
            x = layer.mlp(y, ops)
        return ops.rms_norm(x, self.norm, eps, residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
