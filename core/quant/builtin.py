"""ember's own quant methods, registered through the same hook a third party's are.

- ``gguf``: GGUF's tensor types (ember.gguf.quants); llama.cpp quantizes each row on its own in
  blocks of 32 or 256 columns, so output rows split anywhere and input columns at block edges.
- ``unquantized``: the bf16, fp16 and fp32 weights of a Hugging Face checkpoint with no
  quantization_config. Their bytes are those of GGUF's BF16, F16 and F32 types, so they are
  QuantWeights of those types, views of the safetensors file, and every backend runs them as it
  runs a GGUF file's float tensors.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Mapping

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from ember.gguf import quants
from ember.gguf.loader import QuantWeight
from ember.hf.safetensors import CheckpointError
from ember.plugins.hookspecs import hookimpl
from ember.quant import QuantMethod

if TYPE_CHECKING:  # pragma: no cover
    from ember.hf.safetensors import Checkpoint

# safetensors dtype -> the GGUF type with the same bytes
FLOAT_DTYPES = {"BF16": Q.BF16, "F16": Q.F16, "F32": Q.F32}


class GGUFMethod(QuantMethod):
    name = "gguf"
    description = "GGUF tensor types (llama.cpp's Q4_0 ... Q8_0, K-quants, F16, BF16, F32)"

    def load_linear(self, checkpoint, prefix, shape, quant_config):
        raise CheckpointError(f"{prefix}: GGUF weights come from a .gguf file (ember.gguf.loader), "
                              f"not from a Hugging Face checkpoint")

    def dequantize(self, weight: QuantWeight):
        return quants.dequantize(weight.data, weight.qtype, weight.shape)

    def split_output(self, weight: QuantWeight, start: int, stop: int) -> QuantWeight:
        rows = weight.shape[0]
        if not 0 <= start < stop <= rows:
            raise ValueError(f"{weight.name}: rows [{start}, {stop}) are not inside its {rows} rows")
        return dataclasses.replace(weight, shape=(stop - start, *weight.shape[1:]),
                                   data=weight.data[start:stop], release=None)

    def split_input(self, weight: QuantWeight, start: int, stop: int) -> QuantWeight:
        cols = weight.shape[-1]
        block, type_size = GGML_QUANT_SIZES[weight.qtype]
        if not 0 <= start < stop <= cols:
            raise ValueError(f"{weight.name}: columns [{start}, {stop}) are not inside its {cols} columns")
        if start % block or stop % block:
            raise ValueError(f"{weight.name}: {weight.qtype.name} splits its columns only at multiples of "
                             f"{block}, not [{start}, {stop})")
        data = weight.data[:, start // block * type_size:stop // block * type_size]
        return dataclasses.replace(weight, shape=(*weight.shape[:-1], stop - start), data=data, release=None)


class UnquantizedMethod(GGUFMethod):
    name = "unquantized"
    description = "bf16, fp16 and fp32 weights of a checkpoint with no quantization_config"

    def recognises(self, quant_config: Mapping[str, Any] | None) -> bool:
        return quant_config is None

    def load_linear(self, checkpoint, prefix, shape, quant_config):
        return float_weight(checkpoint, prefix + ".weight", shape)


def float_weight(checkpoint: "Checkpoint", name: str, shape: tuple[int, ...]) -> QuantWeight:
    """A float tensor of the checkpoint (a weight, a norm, a bias, the embedding) as a QuantWeight
    of the GGUF type with the same bytes: a view of the file, [rows, row_nbytes]."""
    if name not in checkpoint:
        raise CheckpointError(f"{checkpoint.directory}: tensor {name!r} is missing")
    entry, f, original = checkpoint.entry(name), checkpoint.file_of(name), checkpoint.original_name(name)
    if entry.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{f.path}: tensor {original!r} is {entry.dtype}; a float weight is one of "
                              f"{', '.join(FLOAT_DTYPES)}")
    if entry.shape != tuple(shape):
        raise CheckpointError(f"{f.path}: tensor {original!r} has shape {list(entry.shape)}, expected "
                              f"{list(shape)} from config.json")
    raw = checkpoint.raw(name)
    rows = shape[0] if len(shape) > 1 else 1
    data = raw.reshape(rows, -1) if raw.size else raw.reshape(rows, 0)
    return QuantWeight(name, FLOAT_DTYPES[entry.dtype], tuple(shape), data, original,
                       functools.partial(f.release_view, raw))


@hookimpl
def ember_register_quant_methods(register):
    from ember.quant.awq import AWQMethod
    from ember.quant.compressed_tensors import CompressedTensorsMethod
    from ember.quant.fp8 import FP8Method
    from ember.quant.gptq import GPTQMethod

    for method in (GGUFMethod(), UnquantizedMethod(), AWQMethod(), GPTQMethod(), CompressedTensorsMethod(),
                   FP8Method()):
        register(method)
