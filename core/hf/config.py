"""A Hugging Face config.json (and generation_config.json) as ember's ModelConfig.

The architectures are ember.models.registry's; transformers 4 and 5 spell RoPE differently
(`rope_theta` + `rope_scaling`, or one `rope_parameters` object) and both are read.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ember.config import ModelConfig, RopeScaling
from ember.hf.safetensors import CheckpointError
from ember.models.registry import ROPE_SCALING_TYPES, UnsupportedArchitecture, architecture, hf_model_type

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


def read_json(path: Path, what: str) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON {what}: {e}") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: a {what} is a JSON object")
    return doc


def model_config_from_hf(hf: dict, where: str = "config") -> ModelConfig:
    """A config.json (llama, mistral, mixtral, qwen2, qwen3, qwen3_moe) as a ModelConfig."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{where}: a config is a JSON object")
    try:
        mt = hf_model_type(hf.get("model_type"))
    except UnsupportedArchitecture as e:
        raise CheckpointError(f"{where}: {e}") from None
    arch = architecture(mt.architecture)
    for key, default in mt.unsupported.items():
        if hf.get(key) not in (default, None):
            raise CheckpointError(f"{where}: {key} = {hf[key]!r} is not supported (only {default!r})")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (the llama family's is 'silu')")

    def need(key: str, default: Any = None) -> int:
        v = hf.get(key, default)
        if not _int(v) or v <= 0:
            raise CheckpointError(f"{where}: {key} must be a positive integer, got {v!r}")
        return v

    def number(key: str, default: float) -> float:
        v = hf.get(key, default)
        if v is None:
            return default
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise CheckpointError(f"{where}: {key} must be a positive number, got {v!r}")
        return float(v)

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    kv_heads = need("num_key_value_heads", heads)
    if heads % kv_heads:
        raise CheckpointError(f"{where}: num_attention_heads {heads} is not a multiple of "
                              f"num_key_value_heads {kv_heads}")
    if hf.get("head_dim") is not None:
        head_dim = need("head_dim")
    elif hidden % heads == 0:
        head_dim = hidden // heads
    else:
        raise CheckpointError(f"{where}: hidden_size {hidden} is not a multiple of "
                              f"num_attention_heads {heads} and head_dim is missing")
    rope = _rope_parameters(hf, where)
    partial = rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if not isinstance(partial, (int, float)) or not 0 < partial <= 1:
        raise CheckpointError(f"{where}: partial_rotary_factor must be in (0, 1], got {partial!r}")
    rope_dim = int(head_dim * partial)
    if head_dim % 2 or rope_dim % 2:
        raise CheckpointError(f"{where}: head_dim {head_dim} (rotary part {rope_dim}) must be even")

    experts = hf.get("num_local_experts") or hf.get("num_experts") or 0
    if experts and not arch.experts:
        raise CheckpointError(f"{where}: {hf['model_type']} with experts is not supported")
    if experts and not _int(experts):
        raise CheckpointError(f"{where}: the expert count must be an integer, got {experts!r}")
    ffn = need("moe_intermediate_size") if experts and "moe_intermediate_size" in hf else need("intermediate_size")
    used = need("num_experts_per_tok") if experts else 0
    if used > experts:
        raise CheckpointError(f"{where}: num_experts_per_tok {used} > {experts} experts")
    if hf.get("shared_expert_intermediate_size"):
        raise CheckpointError(f"{where}: shared experts are not supported")

    context = need("max_position_embeddings", 4096)
    window = _sliding_window(hf, where)
    if window and window < context:
        log.info("%s: sliding window of %d tokens; serving that much context, where attention over "
                 "the window and over the whole context agree", where, window)
        context = window
    return ModelConfig(
        architecture=arch.name,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_layers=need("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        context_length=context,
        rms_norm_eps=number("rms_norm_eps", 1e-6 if arch.name.startswith("qwen") else 1e-5),
        rope_theta=float(rope.pop("rope_theta")),
        rope_dim=rope_dim if rope_dim != head_dim else 0,
        rope_scaling=_rope_scaling(rope, where),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=arch.attention_bias or bool(hf.get("attention_bias", False)),
        qk_norm=arch.qk_norm,
        num_experts=int(experts),
        num_experts_per_tok=used,
        expert_weights_norm=bool(hf.get("norm_topk_prob", hf["model_type"] != "qwen3_moe")) if experts else True,
        name=str(hf.get("_name_or_path") or ""),
    )


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _rope_parameters(hf: dict, where: str) -> dict:
    """RoPE's settings as one dict (rope_theta, rope_type and the scaling's own keys)."""
    params = hf.get("rope_parameters")
    if params is not None:  # transformers 5
        if not isinstance(params, dict):
            raise CheckpointError(f"{where}: rope_parameters must be an object")
        if "full_attention" in params or "sliding_attention" in params:
            raise CheckpointError(f"{where}: per-layer-type rope_parameters are not supported")
        params = dict(params)
    else:
        scaling = hf.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, dict):
            raise CheckpointError(f"{where}: rope_scaling must be an object or null")
        params = dict(scaling or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta > 1:
        raise CheckpointError(f"{where}: rope_theta must be a number above 1, got {theta!r}")
    params["rope_theta"] = theta
    return params


def _rope_scaling(params: dict, where: str) -> RopeScaling:
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return RopeScaling()
    if kind not in ROPE_SCALING_TYPES:
        raise CheckpointError(f"{where}: rope_scaling type {kind!r} is not supported "
                              f"(supported: {', '.join(t for t in ROPE_SCALING_TYPES if t != 'none')})")
    fields = {"factor": float, "original_max_position_embeddings": int, "low_freq_factor": float,
              "high_freq_factor": float, "beta_fast": float, "beta_slow": float, "attention_factor": float}
    got = {}
    for key, kind_of in fields.items():
        v = params.get(key)
        if v is None:
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise CheckpointError(f"{where}: rope scaling {key} must be a positive number, got {v!r}")
        got[key] = kind_of(v)
    if "factor" not in got:
        raise CheckpointError(f"{where}: {kind} rope scaling needs a factor")
    if kind in ("llama3", "yarn") and "original_max_position_embeddings" not in got:
        raise CheckpointError(f"{where}: {kind} rope scaling needs original_max_position_embeddings")
    if kind == "yarn" and (params.get("mscale") or params.get("mscale_all_dim")):
        raise CheckpointError(f"{where}: YaRN's mscale / mscale_all_dim (DeepSeek's) are not supported")
    return RopeScaling(type=kind, factor=got["factor"],
                       original_context_length=got.get("original_max_position_embeddings", 0),
                       low_freq_factor=got.get("low_freq_factor", 1.0),
                       high_freq_factor=got.get("high_freq_factor", 4.0),
                       beta_fast=got.get("beta_fast", 32.0), beta_slow=got.get("beta_slow", 1.0),
                       attention_factor=got.get("attention_factor", 0.0))


def _sliding_window(hf: dict, where: str) -> int:
    """The attention window, or 0 for none: Mistral's sliding_window; Qwen's when use_sliding_window."""
    if hf.get("model_type", "").startswith("qwen") and not hf.get("use_sliding_window"):
        return 0
    window = hf.get("sliding_window")
    if window is None:
        return 0
    if not _int(window) or window <= 0:
        raise CheckpointError(f"{where}: sliding_window must be a positive integer or null, got {window!r}")
    return window


def generation_defaults(directory: Path) -> dict[str, Any]:
    """generation_config.json's EOS ids and sampling defaults (only the keys ember knows, with
    the types they must have); {} when the file is absent."""
    path = directory / GENERATION_CONFIG_FILE
    if not path.is_file():
        return {}
    doc = read_json(path, "generation config")
    out: dict[str, Any] = {}
    eos = doc.get("eos_token_id")
    if eos is not None:
        ids = eos if isinstance(eos, list) else [eos]
        if not all(_int(i) and i >= 0 for i in ids):
            raise CheckpointError(f"{path}: eos_token_id must be a token id or a list of them, got {eos!r}")
        out["eos_token_ids"] = list(ids)
    for key, kinds in (("temperature", (int, float)), ("top_p", (int, float)), ("top_k", (int,)),
                       ("min_p", (int, float)), ("repetition_penalty", (int, float))):
        v = doc.get(key)
        if v is not None and isinstance(v, kinds) and not isinstance(v, bool):
            out[key] = v
    if doc.get("do_sample") is False:
        out["temperature"] = 0.0  # greedy, whatever temperature the file also names
    return out
