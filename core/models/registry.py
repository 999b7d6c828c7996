"""The one list of architectures ember runs: read by both loaders, the model and every runner.

An architecture is named as GGUF's ``general.architecture`` names it (``ModelConfig.architecture``
holds that name whichever file the model came from). Hugging Face ``model_type`` values map onto
them: Mistral is a llama, and Mixtral a llama with experts, as llama.cpp's converter writes them.
Nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class Architecture:
    name: str  # GGUF's general.architecture, and ModelConfig.architecture
    qk_norm: bool = False  # q and k RMS-normalised per head (Qwen3)
    attention_bias: bool = False  # q/k/v biases when config.json does not say (Qwen2)
    experts: bool = False  # may route each token to experts (Mixtral-style MoE)
    # llama.cpp's converter interleaves the two rotary halves of each q/k head for these
    gguf_permuted_qk: bool = False


@dataclass(frozen=True)
class HFModelType:
    """A config.json ``model_type``: the architecture it is, and how its tensor names differ from
    the names ember's layers use (a regex -> replacement list, applied in order)."""

    architecture: str
    renames: tuple[tuple[str, str], ...] = ()
    # config.json keys whose non-default value changes the model in a way ember does not run (a
    # sliding window is not among them: the loader caps the context at the window instead)
    unsupported: Mapping[str, object] = field(default_factory=dict)


ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType({a.name: a for a in (
    Architecture("llama", experts=True, gguf_permuted_qk=True),
    Architecture("qwen2", attention_bias=True),
    Architecture("qwen3", qk_norm=True),
    Architecture("qwen3moe", qk_norm=True, experts=True),
)})

_MIXTRAL_RENAMES = (
    (r"\.block_sparse_moe\.gate\.", ".mlp.gate."),
    (r"\.block_sparse_moe\.experts\.(\d+)\.w1\.", r".mlp.experts.\1.gate_proj."),
    (r"\.block_sparse_moe\.experts\.(\d+)\.w2\.", r".mlp.experts.\1.down_proj."),
    (r"\.block_sparse_moe\.experts\.(\d+)\.w3\.", r".mlp.experts.\1.up_proj."),
)

HF_MODEL_TYPES: Mapping[str, HFModelType] = MappingProxyType({
    "llama": HFModelType("llama", unsupported={"mlp_bias": False, "pretraining_tp": 1}),
    "mistral": HFModelType("llama"),
    "mixtral": HFModelType("llama", _MIXTRAL_RENAMES),
    "qwen2": HFModelType("qwen2"),
    "qwen3": HFModelType("qwen3"),
    "qwen3_moe": HFModelType("qwen3moe", unsupported={"mlp_only_layers": [], "decoder_sparse_step": 1}),
})

# RoPE context scalings ember.ops.rope computes: what both loaders accept.
ROPE_SCALING_TYPES = ("none", "linear", "llama3", "yarn")


class UnsupportedArchitecture(ValueError):
    pass


def architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UnsupportedArchitecture(f"unsupported architecture {name!r} "
                                      f"(supported: {', '.join(ARCHITECTURES)})") from None


def hf_model_type(model_type: object) -> HFModelType:
    if not isinstance(model_type, str) or model_type not in HF_MODEL_TYPES:
        raise UnsupportedArchitecture(f"model_type {model_type!r} is not supported "
                                      f"(supported: {', '.join(HF_MODEL_TYPES)})")
    return HF_MODEL_TYPES[model_type]


def model_class(name: str):
    """The torch model that runs this architecture (every one is the llama family's LlamaModel)."""
    architecture(name)
    from ember.models.llama import LlamaModel

    return LlamaModel
