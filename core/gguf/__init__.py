"""GGUF support: a strict parser, reference dequantization and the llama-family weight loader."""
from ember.gguf.loader import (
    SUPPORTED_ARCHITECTURES,
    QuantWeight,
    load_gguf_weights,
    model_config_from_gguf,
)
from ember.gguf.quants import SUPPORTED_QTYPES, dequantize, row_nbytes
from ember.gguf.reader import GGUFError, GGUFFile, TensorInfo

__all__ = [
    "GGUFError", "GGUFFile", "TensorInfo",
    "SUPPORTED_QTYPES", "dequantize", "row_nbytes",
    "SUPPORTED_ARCHITECTURES", "QuantWeight", "load_gguf_weights", "model_config_from_gguf",
]
