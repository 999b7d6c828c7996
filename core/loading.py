"""Open a model from disk, whatever its format: a GGUF file or a Hugging Face directory.

Both give the same things: a ModelConfig, a tokenizer, and weights under the names ember's layers
use (QuantWeight views of the mapped file), and a way to let the file's pages go once a backend
holds its own copy.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ember.config import ModelConfig


@dataclass
class LoadedModel:
    path: Path
    format: str  # "gguf" | "safetensors"
    config: ModelConfig
    tokenizer: Any  # ember.tokenizer.Tokenizer
    weights: dict
    quant_method: str  # the ember.quant method that read the weights
    release_pages: Callable[[], None] = lambda: None
    generation: dict[str, Any] = field(default_factory=dict)  # generation_config.json's defaults


def load_model(path: str | os.PathLike, quant_methods=None) -> LoadedModel:
    """A .gguf file or a model directory (config.json, safetensors, tokenizer.json)."""
    from ember.hf.loader import is_model_directory, load_hf_directory

    p = Path(path)
    if p.is_dir():
        if not is_model_directory(p):
            from ember.hf.safetensors import CheckpointError

            raise CheckpointError(f"{p}: a model directory needs a config.json")
        m = load_hf_directory(p, quant_methods)
        return LoadedModel(p, "safetensors", m.config, m.tokenizer, m.weights, m.quant_method.name,
                           m.release_pages, m.generation)
    from ember.gguf.loader import load_gguf_weights, model_config_from_gguf
    from ember.gguf.reader import GGUFFile
    from ember.tokenizer import Tokenizer

    gf = GGUFFile(p)
    try:
        cfg = model_config_from_gguf(gf)
        tokenizer = Tokenizer.from_gguf_metadata(gf.metadata)
        weights = load_gguf_weights(gf, cfg)
    except BaseException:
        gf.close()
        raise
    return LoadedModel(p, "gguf", cfg, tokenizer, weights, "gguf", gf.release_pages)
