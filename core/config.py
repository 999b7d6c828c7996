"""Configuration dataclasses: what a model is, and how the engine runs it."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as GGUF and HF configs describe it."""

    type: str = "none"  # ember.models.registry.ROPE_SCALING_TYPES
    factor: float = 1.0
    original_context_length: int = 0
    # llama3-style scaling
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # YaRN: the ramp between extrapolated and interpolated pairs (in rotations over the original
    # context), and the factor cos/sin are scaled by (0: the paper's 0.1 ln(factor) + 1)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a llama-family model (Llama 2/3, Mistral, Qwen2/3, Mixtral-style MoE)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    context_length: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_dim: int = 0  # 0: the whole head
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qwen2 has q/k/v biases
    qk_norm: bool = False  # qwen3 normalises q and k per head
    num_experts: int = 0
    num_experts_per_tok: int = 0
    # whether the chosen experts' router weights are renormalised to sum to one (Mixtral: yes;
    # Qwen3-MoE: its config's norm_topk_prob)
    expert_weights_norm: bool = True
    name: str = ""

    @property
    def rotary_dim(self) -> int:
        return self.rope_dim or self.head_dim


@dataclass
class CacheConfig:
    block_size: int = 16
    # Bytes for the KV cache; None: what the backend offers (available_kv_memory), else 512 MiB.
    kv_cache_memory: int | None = None
    num_blocks: int | None = None  # overrides kv_cache_memory when set (tests)
    enable_prefix_caching: bool = True


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # the per-step token budget
    max_model_len: int = 8192
    enable_chunked_prefill: bool = True


@dataclass
class EngineConfig:
    model: str
    device: str = "auto"
    threads: int | None = None
    exact: bool = False
    int8_activations: bool = False  # BackendOptions.int8_activations
    dtype: str | None = None  # compute dtype; None: the backend's default
    memory_utilization: float = 0.9  # --gpu-memory-utilization
    eager: bool = False  # no CUDA graphs
    seed: int = 0
    max_model_len: int | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
