"""Models without a checkpoint: a shape and random weights, as vLLM's ``--load-format dummy``.

``dummy:NAME`` loads a preset shape (``dummy:qwen3-0.6b``, ``dummy:llama3-8b``, ...),
``dummy:PATH/config.json`` the shape in a Hugging Face config, and ``dummy:PATH/model.gguf`` a
GGUF file's shape and tokenizer without reading its weights. Benchmarks use them to measure a
backend at a real model's size where the checkpoint can't be had (no network, no disk for 16 GB).

The weights are bfloat16 (``?dtype=float16|float32`` for others), each value ±[2^-10, 2^-9) with a
random sign and mantissa, norms one. Each tensor is made when a backend first reads it, the same for
the same seed, and lives as long as its DummyWeight: once a GPU backend has uploaded the weights
and the engine drops them, the host holds none.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q

from ember.config import ModelConfig
from ember.gguf import quants
from ember.gguf.loader import hf_weight_shapes

PREFIX = "dummy:"

# Llama-architecture models at published models' dimensions (their config.json files).
PRESETS: dict[str, ModelConfig] = {
    "qwen3-0.6b": ModelConfig(  # Qwen/Qwen3-0.6B without its q/k norms, as "Llama-architecture"
        architecture="llama", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, context_length=40960,
        rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True),
    "llama3-8b": ModelConfig(  # meta-llama/Meta-Llama-3-8B
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, context_length=8192,
        rms_norm_eps=1e-5, rope_theta=5e5),
    "llama3.2-1b": ModelConfig(  # meta-llama/Llama-3.2-1B, without its llama3 rope scaling
        architecture="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, context_length=131072,
        rms_norm_eps=1e-5, rope_theta=5e5, tie_word_embeddings=True),
    "tiny": ModelConfig(  # for tests: loads in milliseconds
        architecture="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, context_length=2048),
}

_WEIGHT_TYPES = {"bfloat16": Q.BF16, "float16": Q.F16, "float32": Q.F32}


class DummyModelError(ValueError):
    pass


def is_dummy(ref: str) -> bool:
    return isinstance(ref, str) and ref.startswith(PREFIX)


@dataclass(frozen=True)
class DummySpec:
    """What a ``dummy:`` reference names: a source (a preset, a config.json or a .gguf) and the
    weights' dtype."""

    source: str
    dtype: str = "bfloat16"

    @classmethod
    def parse(cls, ref: str) -> "DummySpec":
        if not is_dummy(ref):
            raise DummyModelError(f"not a dummy model reference: {ref!r} (they start with {PREFIX!r})")
        body = ref[len(PREFIX):]
        source, _, query = body.partition("?")
        dtype = "bfloat16"
        for item in filter(None, query.split("&")):
            key, _, value = item.partition("=")
            if key != "dtype":
                raise DummyModelError(f"{ref!r}: unknown option {key!r} (dummy models take dtype=)")
            if value not in _WEIGHT_TYPES:
                raise DummyModelError(f"{ref!r}: dtype must be one of {', '.join(_WEIGHT_TYPES)}, got {value!r}")
            dtype = value
        if not source:
            raise DummyModelError(f"{ref!r} names no shape: use one of {', '.join(PRESETS)}, "
                                  f"a config.json or a .gguf file")
        return cls(source, dtype)


def model_config(spec: DummySpec) -> tuple[ModelConfig, dict | None]:
    """The shape, and the GGUF metadata to take the tokenizer from when the source is a file."""
    if spec.source in PRESETS:
        return PRESETS[spec.source], None
    path = Path(os.path.expanduser(spec.source))
    if not path.is_file():
        raise DummyModelError(f"dummy model {spec.source!r} is neither a preset "
                              f"({', '.join(PRESETS)}) nor a file")
    if path.suffix.lower() == ".gguf":
        from ember.gguf.loader import model_config_from_gguf
        from ember.gguf.reader import GGUFFile

        with GGUFFile(path) as gf:
            return model_config_from_gguf(gf), dict(gf.metadata)
    from ember.hf.config import model_config_from_hf, read_json
    from ember.hf.safetensors import CheckpointError

    try:
        return model_config_from_hf(read_json(path, "config"), str(path)), None
    except CheckpointError as e:
        raise DummyModelError(str(e)) from None


class DummyWeight:
    """A weight made on demand, in the loader's QuantWeight form (name, qtype, shape, data as
    [rows, row_nbytes] uint8, dequantize()), so backends take it through their usual paths."""

    def __init__(self, name: str, qtype: Q, shape: tuple[int, ...], seed: int, ones: bool = False):
        self.name, self.qtype, self.shape, self.gguf_name = name, qtype, tuple(shape), name
        self._seed, self._ones = seed, ones
        self._data: np.ndarray | None = None

    @property
    def data(self) -> np.ndarray:
        # kept once made, as a file's mapped pages are: a backend may read a table every step
        if self._data is None:
            rows = self.shape[0] if len(self.shape) > 1 else 1
            n = int(np.prod(self.shape))
            values = _ones(n, self.qtype) if self._ones else _random(n, self.qtype, self._seed)
            self._data = values.view(np.uint8).reshape(rows, -1)
            self._data.flags.writeable = False
        return self._data

    def dequantize(self):
        return quants.dequantize(self.data, self.qtype, self.shape)

    def __repr__(self) -> str:
        return f"DummyWeight({self.name!r}, {self.qtype.name}, {self.shape})"


def _random(n: int, qtype: Q, seed: int) -> np.ndarray:
    # Random bits with the exponent pinned: one pass over the bytes, ~20x faster than drawing
    # floats, which matters at 8 billion values.
    bits = np.random.default_rng(seed).integers(0, 1 << 16, size=n, dtype=np.uint16)
    if qtype == Q.BF16:  # sign, 8-bit exponent (bias 127), 7-bit mantissa
        return (bits & 0x807F) | np.uint16(117 << 7)
    if qtype == Q.F16:  # sign, 5-bit exponent (bias 15), 10-bit mantissa
        return (bits & 0x83FF) | np.uint16(5 << 10)
    return (bits.astype(np.float32) / 32768.0 - 1.0) * np.float32(2 ** -9)


def _ones(n: int, qtype: Q) -> np.ndarray:
    if qtype == Q.BF16:
        return np.full(n, 0x3F80, np.uint16)
    return np.ones(n, np.float16 if qtype == Q.F16 else np.float32)


def dummy_weights(cfg: ModelConfig, dtype: str = "bfloat16", seed: int = 0) -> dict[str, DummyWeight]:
    qtype = _WEIGHT_TYPES[dtype]
    out = {}
    for name, shape in hf_weight_shapes(cfg).items():
        # norms (1-D weights other than biases) start at one, as a fresh model's do
        ones = len(shape) == 1 and not name.endswith(".bias")
        out[name] = DummyWeight(name, qtype, shape, zlib.crc32(f"{seed}:{name}".encode()), ones)
    return out


def dummy_tokenizer(vocab_size: int):
    """A byte-level BPE filling the vocabulary: 256 byte tokens, ChatML's three special tokens,
    a space before each letter, then fillers spelled ``<dummyN>`` (what a random model mostly says)."""
    from ember.tokenizer import CONTROL, NORMAL, UNUSED, Tokenizer, _byte_alphabet

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if vocab_size < 256 + len(specials):
        raise DummyModelError(f"a dummy model needs a vocabulary of at least {256 + len(specials)}, "
                              f"got {vocab_size}")
    alphabet = _byte_alphabet()
    # a few merges (a space and a letter), so it is a BPE and not just bytes
    space = alphabet[ord(" ")]
    merges = [f"{space} {c}" for c in "abcdefghijklmnopqrstuvwxyz"][:max(0, vocab_size - 259)]
    tokens = [alphabet[b] for b in range(256)] + specials + [m.replace(" ", "") for m in merges]
    types = [NORMAL] * 256 + [CONTROL] * len(specials) + [NORMAL] * len(merges)
    types += [UNUSED] * (vocab_size - len(tokens))
    tokens += [f"<dummy{i}>" for i in range(len(tokens), vocab_size)]
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return Tokenizer.from_gguf_metadata({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": 256, "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": template,
    })


def load_dummy(ref: str, seed: int = 0):
    """(config, tokenizer, weights) for a ``dummy:`` reference."""
    from ember.tokenizer import Tokenizer

    spec = DummySpec.parse(ref)
    cfg, metadata = model_config(spec)
    if metadata is not None:
        tokenizer = Tokenizer.from_gguf_metadata(metadata)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise DummyModelError(f"{spec.source}: the tokenizer has {tokenizer.vocab_size} tokens "
                                  f"but the model only {cfg.vocab_size}")
    else:
        tokenizer = dummy_tokenizer(cfg.vocab_size)
    cfg = replace(cfg, name=PREFIX + spec.source)
    return cfg, tokenizer, dummy_weights(cfg, spec.dtype, seed)
