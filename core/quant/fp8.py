"""FP8 (e4m3) weights: the ``fp8`` method's checkpoints, and compressed-tensors' float-quantized.

quantization_config of ``fp8`` (vLLM's, and DeepSeek's block-wise form): {"quant_method": "fp8",
"activation_scheme": "dynamic" | "static", "weight_block_size": [128, 128] (optional)}. A linear
holds ``weight`` float8_e4m3fn [out, in] and either ``weight_scale`` (one float32 for the tensor,
or one per output row) or, block-wise, ``weight_scale_inv`` [ceil(out / 128), ceil(in / 128)]
(multiplied, despite the name). w = float(weight) * scale of its block. Activation scales
(``input_scale``, static) are for FP8 activation kernels; ember multiplies float activations, which
needs none.

The weight stays as the file has it, one byte a value; Float8Weight carries its scales spread to
[out, in / block] (block: the whole row, or 128 columns) so a kernel reads a row's scales in order.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ember.hf.safetensors import CheckpointError
from ember.quant import QuantMethod
from ember.quant.grouped import SCALE_DTYPES, checkpoint_array, release_views


class Float8Weight:
    format = "fp8"

    def __init__(self, name: str, shape: tuple[int, int], data: np.ndarray, scales: np.ndarray, source: str = "",
                 release=None, source_names: tuple[str, ...] = ()):
        out, cols = shape
        if data.shape != (out, cols) or scales.ndim != 2 or scales.shape[0] != out or cols % scales.shape[1]:
            raise ValueError(f"{name}: FP8 data {data.shape} and scales {scales.shape} do not fit {shape}")
        self.name, self.shape, self.data = name, tuple(shape), data
        self.scales = np.ascontiguousarray(scales, np.float32)
        self.block = cols // scales.shape[1]  # the columns each scale covers
        self.gguf_name, self.source_names, self._release = source, tuple(source_names), release

    def release(self) -> None:
        if self._release is not None:
            self._release()

    def dequantize_numpy(self) -> np.ndarray:
        """float32 [out, in]: e4m3 values times their block's scale. An e4m3 byte is a float16 with
        its exponent and mantissa shifted in, times 2^8 (exact, subnormals included: the kernels
        convert it the same way)."""
        b = self.data.astype(np.uint16)
        w = (((b & 0x80) << 8) | ((b & 0x7F) << 7)).astype(np.uint16).view(np.float16).astype(np.float32) * 256.0
        return w * np.repeat(self.scales, self.block, axis=1)

    def dequantize(self):
        """dequantize_numpy() as a torch tensor."""
        import torch

        return torch.from_numpy(self.dequantize_numpy())

    def __repr__(self) -> str:
        return f"Float8Weight({self.name!r}, {self.shape}, scale per {self.block} columns)"


def load_float8(ckpt, prefix: str, shape: tuple[int, int], scale_name: str, block: tuple[int, int] | None) -> Float8Weight:
    """An e4m3 weight and its scale tensor: per tensor ([] or [1]), per row ([out] or [out, 1]), or by
    blocks of block = (rows, columns) ([ceil(out / rows), ceil(in / columns)])."""
    out, cols = shape
    wname, sname = prefix + ".weight", prefix + "." + scale_name
    if wname not in ckpt or sname not in ckpt:
        raise CheckpointError(f"{ckpt.directory}: {prefix} needs {wname!r} and {sname!r}")
    entry = ckpt.entry(wname)
    if entry.dtype != "F8_E4M3" or entry.shape != (out, cols):
        raise CheckpointError(f"{ckpt.file_of(wname).path}: tensor {ckpt.original_name(wname)!r} is {entry.dtype} "
                              f"{list(entry.shape)}, expected F8_E4M3 {[out, cols]}")
    data = ckpt.raw(wname).reshape(out, cols)
    sshape = ckpt.entry(sname).shape
    if block is not None:
        br, bc = block
        grid = (-(-out // br), -(-cols // bc))
        s = checkpoint_array(ckpt, sname, SCALE_DTYPES, grid).astype(np.float32)
        if bc != 128 or cols % 128:
            raise CheckpointError(f"{ckpt.directory}: {prefix}: FP8 blocks of {bc} columns over {cols} are not "
                                  f"supported (128 columns, dividing the row)")
        scales = np.repeat(s, br, axis=0)[:out]  # each row takes its block row's scales
    else:
        n = int(np.prod(sshape)) if sshape else 1
        if n == 1:
            scales = np.full((out, 1), float(checkpoint_array(ckpt, sname, SCALE_DTYPES, sshape).reshape(-1)[0]), np.float32)
        elif n == out and sshape in ((out,), (out, 1)):
            scales = checkpoint_array(ckpt, sname, SCALE_DTYPES, sshape).astype(np.float32).reshape(out, 1)
        else:
            raise CheckpointError(f"{ckpt.file_of(sname).path}: tensor {ckpt.original_name(sname)!r} has shape "
                                  f"{list(sshape)}: not a per-tensor or per-row scale of {prefix}")
    names = (wname, sname)
    return Float8Weight(wname, shape, data, scales, ckpt.original_name(wname), release_views(ckpt, list(names)), names)


class FP8Method(QuantMethod):
    name = "fp8"
    description = "FP8 e4m3 weights, per-tensor, per-row or 128x128-block scales (vLLM's fp8, DeepSeek's)"

    def recognises(self, quant_config):
        return isinstance(quant_config, Mapping) and quant_config.get("quant_method") == "fp8"

    def linear_tensors(self, prefix):
        return [prefix + ".weight"]

    def load_linear(self, ckpt, prefix, shape, quant_config):
        if ckpt.entry(prefix + ".weight").dtype != "F8_E4M3":  # a module the quantizer left in float
            from ember.quant.builtin import float_weight

            return float_weight(ckpt, prefix + ".weight", shape)
        block = quant_config.get("weight_block_size")
        if block is not None:
            if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
                raise CheckpointError(f"{ckpt.directory}: weight_block_size {block!r} is not [rows, columns]")
            return load_float8(ckpt, prefix, shape, "weight_scale_inv", tuple(block))
        return load_float8(ckpt, prefix, shape, "weight_scale", None)

    def dequantize(self, weight):
        return weight.dequantize()

    def can_fuse(self, weights):
        return len({(type(w), getattr(w, "block", None)) for w in weights}) == 1

    def split_output(self, weight, start, stop):
        if not 0 <= start < stop <= weight.shape[0]:
            raise ValueError(f"{weight.name}: rows [{start}, {stop}) are not inside its {weight.shape[0]} rows")
        return Float8Weight(weight.name, (stop - start, weight.shape[1]), weight.data[start:stop],
                            weight.scales[start:stop], weight.gguf_name)

    def split_input(self, weight, start, stop):
        b = weight.block
        if not 0 <= start < stop <= weight.shape[1] or start % b or stop % b:
            raise ValueError(f"{weight.name}: columns split only at multiples of {b}, not [{start}, {stop})")
        return Float8Weight(weight.name, (weight.shape[0], stop - start), weight.data[:, start:stop],
                            weight.scales[:, start // b:stop // b], weight.gguf_name)
