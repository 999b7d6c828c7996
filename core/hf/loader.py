"""A Hugging Face model directory -> ModelConfig, tokenizer and the weights ember's layers load.

The directory holds config.json, one or more safetensors files (model.safetensors.index.json
lists the shards), tokenizer.json with tokenizer_config.json, and optionally
generation_config.json. config.json's quantization_config (or its absence) picks the quant
method (ember.quant) that turns each linear layer's tensors into its weight; everything else
(norms, biases, the embedding) is a float tensor. Nothing is copied: weights are views of the
mapped files until a backend repacks or uploads them.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ember.config import ModelConfig
from ember.gguf.loader import QuantWeight, hf_weight_shapes
from ember.hf.config import CONFIG_FILE, generation_defaults, model_config_from_hf, read_json
from ember.hf.safetensors import Checkpoint, CheckpointError
from ember.models.registry import hf_model_type
from ember.quant import QuantMethod, QuantMethodError, method_for_checkpoint

log = logging.getLogger(__name__)


def is_model_directory(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG_FILE).is_file()


@dataclass
class HFModel:
    directory: Path
    config: ModelConfig
    tokenizer: Any  # ember.tokenizer.Tokenizer
    weights: dict[str, QuantWeight]
    checkpoint: Checkpoint
    quant_method: QuantMethod
    generation: dict[str, Any] = field(default_factory=dict)  # generation_config.json's defaults

    def release_pages(self) -> None:
        self.checkpoint.release_pages()


def load_hf_directory(directory: str | os.PathLike, quant_methods=None) -> HFModel:
    """Open a model directory. quant_methods: name -> QuantMethod (default: the installed ones)."""
    from ember.tokenizer import Tokenizer

    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory")
    hf = read_json(d / CONFIG_FILE, "model config")
    cfg = model_config_from_hf(hf, str(d / CONFIG_FILE))
    quant_config = hf.get("quantization_config")
    if quant_config is not None and not isinstance(quant_config, dict):
        raise CheckpointError(f"{d / CONFIG_FILE}: quantization_config must be an object")
    if quant_methods is None:
        from ember.plugins.manager import get_registry

        quant_methods = get_registry().quant_methods
    try:
        method = method_for_checkpoint(quant_methods, quant_config, str(d / CONFIG_FILE))
    except QuantMethodError as e:
        raise CheckpointError(str(e)) from None
    generation = generation_defaults(d)
    tokenizer = Tokenizer.from_hf_directory(d, extra_stop_ids=generation.get("eos_token_ids", ()))
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{d}: tokenizer.json has {tokenizer.vocab_size} tokens, config.json's "
                              f"vocab_size is {cfg.vocab_size}")
    checkpoint = Checkpoint(d, hf_model_type(hf["model_type"]).renames)
    try:
        weights = _weights(checkpoint, cfg, method, quant_config)
    except BaseException:
        checkpoint.close()
        raise
    if not cfg.name:
        cfg = replace(cfg, name=d.name)
    return HFModel(d, cfg, tokenizer, weights, checkpoint, method, generation)


def _weights(ckpt: Checkpoint, cfg: ModelConfig, method: QuantMethod, quant_config) -> dict[str, QuantWeight]:
    from ember.quant.builtin import float_weight

    shapes = hf_weight_shapes(cfg)
    out: dict[str, QuantWeight] = {}
    used: set[str] = set()
    for name, shape in shapes.items():
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix is not None and len(shape) == 2 and name != "model.embed_tokens.weight":
            owned = method.linear_tensors(prefix)
            if all(t in ckpt for t in owned):
                w = out[name] = method.load_linear(ckpt, prefix, shape, quant_config)
                used.update(getattr(w, "source_names", ()) or owned)
                continue
            if prefix + ".weight" not in ckpt and owned != [name]:
                missing = [t for t in owned if t not in ckpt]
                raise CheckpointError(f"{ckpt.directory}: linear {prefix!r} has neither its "
                                      f"{method.name} tensors ({', '.join(missing)} missing) nor a "
                                      f"float weight")
        # float: norms, biases, the embedding, and linears the quantizer left alone
        out[name] = float_weight(ckpt, name, shape)
        used.add(name)
    if cfg.tie_word_embeddings:
        used.add("lm_head.weight")  # some converters write the tied head anyway
    unknown = [ckpt.original_name(n) for n in ckpt if n not in used]
    if unknown:
        log.warning("%s: ignoring %d tensors ember's layers do not use: %s", ckpt.directory, len(unknown),
                    ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else ""))
    return out
