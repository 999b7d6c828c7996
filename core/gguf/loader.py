"""GGUF -> ModelConfig and HF-named quantized weights for the llama family.

Weights stay quantized: each is a [rows, row_nbytes] uint8 array, a view of the file's mmap unless
rows had to be reordered. GGML quantizes every row on its own, so reordering whole rows (llama's
q/k un-permutation) or slicing them (one expert out of a 3-D tensor) never touches the numerics.
"""
from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ember.config import ModelConfig, RopeScaling
from ember.models.registry import ARCHITECTURES, ROPE_SCALING_TYPES

from . import quants
from .reader import GGUFError, GGUFFile

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


@dataclass
class QuantWeight:
    name: str  # HF-style name
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order
    data: np.ndarray  # uint8 [rows, row_nbytes]; 1-D tensors as [1, nbytes]
    gguf_name: str = ""
    # Lets the file's pages under this tensor go from the resident set once a backend holds its own
    # copy (repacked or dequantized), so a load peaks at one copy of the weights; None: nothing to do.
    release: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def dequantize(self) -> "torch.Tensor":
        return quants.dequantize(self.data, self.qtype, self.shape)


# ---------------------------------------------------------------------------------- config

_MISSING = object()


def _meta(gf: GGUFFile, key: str, kind: type, default: Any = _MISSING) -> Any:
    if key not in gf.metadata:
        if default is _MISSING:
            raise GGUFError(f"{gf.path}: missing required metadata key {key!r}")
        return default
    v = gf.metadata[key]
    if isinstance(v, list) and v and kind is not list:
        # some converters write per-layer values; we only support uniform layers
        if any(x != v[0] for x in v):
            raise GGUFError(f"{gf.path}: {key!r} varies per layer ({v[:8]}...), not supported")
        v = v[0]
    accepted = (int, float) if kind is float else kind
    if not isinstance(v, accepted) or (isinstance(v, bool) and kind is not bool):
        raise GGUFError(f"{gf.path}: metadata key {key!r} should be {kind.__name__}, got {v!r}")
    return float(v) if kind is float else v


def _positive(gf: GGUFFile, key: str, default: Any = _MISSING) -> int:
    v = _meta(gf, key, int, default)
    if v <= 0:
        raise GGUFError(f"{gf.path}: metadata key {key!r} must be positive, got {v}")
    return v


def _rope_scaling(gf: GGUFFile, arch: str) -> RopeScaling:
    kind = _meta(gf, f"{arch}.rope.scaling.type", str, "none")
    factor = _meta(gf, f"{arch}.rope.scaling.factor", float, 1.0)
    if kind == "none" and f"{arch}.rope.scale_linear" in gf.metadata:  # older converters
        kind, factor = "linear", _meta(gf, f"{arch}.rope.scale_linear", float)
    if kind not in ROPE_SCALING_TYPES:
        raise GGUFError(f"{gf.path}: unsupported rope scaling type {kind!r} "
                        f"(supported: {', '.join(ROPE_SCALING_TYPES)})")
    if kind == "none" or (kind == "linear" and factor == 1.0):
        return RopeScaling()
    orig = _meta(gf, f"{arch}.rope.scaling.original_context_length", int, 0)
    if kind == "yarn":
        if orig <= 0:
            raise GGUFError(f"{gf.path}: yarn rope scaling needs {arch}.rope.scaling.original_context_length")
        return RopeScaling(type=kind, factor=factor, original_context_length=orig,
                           beta_fast=_meta(gf, f"{arch}.rope.scaling.yarn_beta_fast", float, 32.0),
                           beta_slow=_meta(gf, f"{arch}.rope.scaling.yarn_beta_slow", float, 1.0))
    return RopeScaling(type=kind, factor=factor, original_context_length=orig)


def model_config_from_gguf(gf: GGUFFile) -> ModelConfig:
    arch = _meta(gf, "general.architecture", str)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{gf.path}: unsupported architecture {arch!r} "
                        f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    hidden = _positive(gf, f"{arch}.embedding_length")
    heads = _positive(gf, f"{arch}.attention.head_count")
    kv_heads = _positive(gf, f"{arch}.attention.head_count_kv", heads)
    if heads % kv_heads:
        raise GGUFError(f"{gf.path}: head_count {heads} is not a multiple of "
                        f"head_count_kv {kv_heads}")
    if f"{arch}.attention.key_length" in gf.metadata:
        head_dim = _positive(gf, f"{arch}.attention.key_length")
        v_dim = _positive(gf, f"{arch}.attention.value_length", head_dim)
        if v_dim != head_dim:
            raise GGUFError(f"{gf.path}: key_length {head_dim} != value_length {v_dim}, "
                            f"not supported")
    elif hidden % heads:
        raise GGUFError(f"{gf.path}: embedding_length {hidden} is not a multiple of head_count "
                        f"{heads} and {arch}.attention.key_length is missing")
    else:
        head_dim = hidden // heads
    rope_dim = _meta(gf, f"{arch}.rope.dimension_count", int, 0)
    if head_dim % 2 or rope_dim % 2 or rope_dim > head_dim:
        raise GGUFError(f"{gf.path}: head_dim {head_dim} and rope.dimension_count {rope_dim} "
                        f"must be even, with the rotary part inside the head")
    n_experts = _meta(gf, f"{arch}.expert_count", int, 0)
    if n_experts and not ARCHITECTURES[arch].experts:
        raise GGUFError(f"{gf.path}: {arch} with experts ({arch}.expert_count {n_experts}) is not supported")
    n_used = _positive(gf, f"{arch}.expert_used_count") if n_experts else 0
    if n_used > n_experts:
        raise GGUFError(f"{gf.path}: expert_used_count {n_used} > expert_count {n_experts}")
    if n_experts and f"{arch}.expert_feed_forward_length" in gf.metadata:
        ffn = _positive(gf, f"{arch}.expert_feed_forward_length")
    else:
        ffn = _positive(gf, f"{arch}.feed_forward_length")
    if "rope_freqs.weight" in gf.tensors:
        logger.warning("%s: rope_freqs.weight (per-dimension RoPE frequency factors, llama3-style "
                       "scaling) is not represented in ModelConfig and is ignored", gf.path)
    return ModelConfig(
        architecture=arch,
        vocab_size=_vocab_size(gf, arch),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_layers=_positive(gf, f"{arch}.block_count"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        context_length=_positive(gf, f"{arch}.context_length"),
        rms_norm_eps=_meta(gf, f"{arch}.attention.layer_norm_rms_epsilon", float),
        rope_theta=_meta(gf, f"{arch}.rope.freq_base", float, 10000.0),
        rope_dim=rope_dim,
        rope_scaling=_rope_scaling(gf, arch),
        tie_word_embeddings="output.weight" not in gf.tensors,
        attention_bias="blk.0.attn_q.bias" in gf.tensors,
        qk_norm=ARCHITECTURES[arch].qk_norm,
        num_experts=n_experts,
        num_experts_per_tok=n_used,
        expert_weights_norm=_meta(gf, f"{arch}.expert_weights_norm", bool, True),
        name=_meta(gf, "general.name", str, ""),
    )


def _vocab_size(gf: GGUFFile, arch: str) -> int:
    if f"{arch}.vocab_size" in gf.metadata:
        return _positive(gf, f"{arch}.vocab_size")
    tokens = gf.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and tokens:
        return len(tokens)
    raise GGUFError(f"{gf.path}: cannot tell the vocabulary size: neither {arch}.vocab_size "
                    f"nor tokenizer.ggml.tokens is present")


# ---------------------------------------------------------------------------------- weights

_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
}
_EXPERT_NAMES = {"ffn_gate_exps.weight": "gate_proj", "ffn_up_exps.weight": "up_proj",
                 "ffn_down_exps.weight": "down_proj"}


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Torch-order shapes of the per-layer tensors this config needs (keys: GGUF suffixes)."""
    h, hd, ff, e = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.num_experts
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shapes = {"attn_norm.weight": (h,), "attn_q.weight": (q, h), "attn_k.weight": (kv, h),
              "attn_v.weight": (kv, h), "attn_output.weight": (h, q), "ffn_norm.weight": (h,)}
    if cfg.attention_bias:
        shapes.update({"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)})
    if cfg.qk_norm:
        shapes.update({"attn_q_norm.weight": (hd,), "attn_k_norm.weight": (hd,)})
    if e:
        shapes.update({"ffn_gate_inp.weight": (e, h), "ffn_gate_exps.weight": (e, ff, h),
                       "ffn_up_exps.weight": (e, ff, h), "ffn_down_exps.weight": (e, h, ff)})
    else:
        shapes.update({"ffn_gate.weight": (ff, h), "ffn_up.weight": (ff, h),
                       "ffn_down.weight": (h, ff)})
    return shapes


def _layout(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF name -> (HF-style name, torch-order shape) of every tensor this config needs; a 3-D
    expert tensor's HF name is the prefix its experts' names extend (see _split_experts)."""
    layout = {"token_embd.weight": ("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size)),
              "output_norm.weight": ("model.norm.weight", (cfg.hidden_size,))}
    if not cfg.tie_word_embeddings:
        layout["output.weight"] = ("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))
    for i in range(cfg.num_layers):
        for suffix, shape in _expected_shapes(cfg).items():
            hf = "mlp.experts" if suffix in _EXPERT_NAMES else _LAYER_NAMES[suffix]
            layout[f"blk.{i}.{suffix}"] = (f"model.layers.{i}.{hf}", shape)
    return layout


def hf_weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight a model of this config has, by the HF-style name load_gguf_weights gives it
    (experts one by one), with its torch-order shape: what a checkpoint-free load must make."""
    out = {}
    for gname, (name, shape) in _layout(cfg).items():
        suffix = gname.split(".", 2)[-1]
        if suffix in _EXPERT_NAMES:
            for j in range(shape[0]):
                out[f"{name}.{j}.{_EXPERT_NAMES[suffix]}.weight"] = shape[1:]
        else:
            out[name] = shape
    return out


def _rows(gf: GGUFFile, name: str) -> np.ndarray:
    """The tensor's bytes as [rows, row_nbytes] (1-D: [1, nbytes])."""
    t = gf.tensors[name]
    raw = gf.raw(name)
    if len(t.shape) == 1:
        return raw.reshape(1, -1)
    block, type_size = GGML_QUANT_SIZES[t.qtype]
    return raw.reshape(-1, t.shape[-1] // block * type_size)


def _unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: within each head, GGUF row (i, j) for i < head_dim/2,
    j in {0, 1} is HF row (j, i) (interleaved RoPE pairs back to rotate_half halves)."""
    n = rows.shape[0]
    perm = np.arange(n).reshape(n_head, n // n_head // 2, 2).transpose(0, 2, 1).reshape(-1)
    return rows[perm]


def _unpermuted(gf: GGUFFile, name: str, n_head: int) -> np.ndarray:
    t = gf.tensors[name]
    if len(t.shape) == 2:
        return _unpermute_rows(_rows(gf, name), n_head)
    if t.qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16,
                       GGMLQuantizationType.BF16):
        raise GGUFError(f"{gf.path}: cannot permute quantized 1-D tensor {name!r} ({t.qtype.name})")
    itemsize = GGML_QUANT_SIZES[t.qtype][1]
    return _unpermute_rows(gf.raw(name).reshape(-1, itemsize), n_head).reshape(1, -1)


def load_gguf_weights(gf: GGUFFile, cfg: ModelConfig) -> dict[str, QuantWeight]:
    """Map the file's tensors to HF-style names; weights stay quantized (see QuantWeight)."""
    layout = _layout(cfg)
    shapes = {g: shape for g, (_, shape) in layout.items()}
    names = {g: name for g, (name, _) in layout.items()}

    missing = [n for n in shapes if n not in gf.tensors]
    if missing:
        raise GGUFError(f"{gf.path}: missing required tensors: {', '.join(missing[:10])}"
                        + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    unknown = [n for n in gf.tensors if n not in shapes]
    if unknown:
        logger.warning("%s: ignoring %d unknown tensors: %s", gf.path, len(unknown),
                       ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else ""))

    permute = ARCHITECTURES[cfg.architecture].gguf_permuted_qk
    out: dict[str, QuantWeight] = {}
    for gname, shape in shapes.items():
        t = gf.tensors[gname]
        if t.shape != shape:
            raise GGUFError(f"{gf.path}: tensor {gname!r} has shape {list(t.shape)}, "
                            f"expected {list(shape)} from the model config")
        if t.qtype not in quants.SUPPORTED_QTYPES:
            raise GGUFError(f"{gf.path}: tensor {gname!r} has type {t.qtype.name}, which ember "
                            f"cannot dequantize")
        suffix = _LAYER_RE.fullmatch(gname).group(2) if gname.startswith("blk.") else gname
        if suffix in _EXPERT_NAMES:
            _split_experts(gf, gname, names[gname], suffix, out)
            continue
        if permute and suffix.startswith("attn_q."):
            data = _unpermuted(gf, gname, cfg.num_heads)
        elif permute and suffix.startswith("attn_k."):
            data = _unpermuted(gf, gname, cfg.num_kv_heads)
        else:
            data = _rows(gf, gname)
        out[names[gname]] = QuantWeight(names[gname], t.qtype, t.shape, data, gname,
                                        functools.partial(gf.release_view, gf.raw(gname)))
    return out


def _split_experts(gf: GGUFFile, gname: str, prefix: str, suffix: str,
                   out: dict[str, QuantWeight]) -> None:
    """A 3-D [experts, rows, cols] tensor -> one 2-D weight per expert (row-slice views)."""
    t = gf.tensors[gname]
    n_experts, per_expert = t.shape[0], t.shape[1]
    rows = _rows(gf, gname)
    for j in range(n_experts):
        name = f"{prefix}.{j}.{_EXPERT_NAMES[suffix]}.weight"
        part = rows[j * per_expert:(j + 1) * per_expert]
        out[name] = QuantWeight(name, t.qtype, t.shape[1:], part, gname, functools.partial(gf.release_view, part))
