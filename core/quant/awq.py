"""AWQ checkpoints in AutoAWQ's GEMM layout (AutoAWQ, auto-round's auto_awq format), as vLLM reads them.

quantization_config: {"quant_method": "awq", "bits": 4, "group_size": G, "zero_point": true,
"version": "gemm", "modules_to_not_convert": [...]}. A linear ``prefix`` holds
- ``qweight`` int32 [in, out / 8]: eight 4-bit integers per word along the output dimension, in
  AutoAWQ's interleaved order: the word's field i (bits 4i .. 4i+3) is output column
  8c + (0, 2, 4, 6, 1, 3, 5, 7)[i];
- ``qzeros`` int32 [in / G, out / 8], packed the same way;
- ``scales`` float16 [in / G, out].
w[n, k] = scales[k // G, n] * (q[k, n] - z[k // G, n]). Modules in modules_to_not_convert keep their
float weight, which the loader reads as such.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ember.hf.safetensors import CheckpointError
from ember.quant import QuantMethod
from ember.quant.grouped import SCALE_DTYPES, GroupedIntWeight, GroupedMethod, checkpoint_array, release_views, unpack_int32

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


class AWQMethod(GroupedMethod, QuantMethod):
    name = "awq"
    description = "AWQ 4-bit, AutoAWQ's GEMM packing, any group size"

    def recognises(self, quant_config):
        return isinstance(quant_config, Mapping) and quant_config.get("quant_method") == "awq"

    def linear_tensors(self, prefix):
        return [prefix + ".qweight", prefix + ".qzeros", prefix + ".scales"]

    def load_linear(self, ckpt, prefix, shape, quant_config):
        where = ckpt.directory
        bits = quant_config.get("bits", quant_config.get("w_bit", 4))
        version = str(quant_config.get("version", "gemm")).lower()
        if bits != 4 or version != "gemm":
            raise CheckpointError(f"{where}: AWQ {bits}-bit {version!r} checkpoints are not supported "
                                  f"(4-bit, version gemm)")
        if quant_config.get("zero_point", True) is not True:
            raise CheckpointError(f"{where}: AWQ without zero points is not supported")
        out, cols = shape
        group = quant_config.get("group_size", quant_config.get("q_group_size", 128))
        group = cols if group in (-1, None) else group
        if not isinstance(group, int) or group <= 0 or cols % group or out % 8:
            raise CheckpointError(f"{where}: AWQ group_size {group!r} and {prefix}'s shape {list(shape)} "
                                  f"do not fit (the group must divide {cols} columns, 8 the {out} rows)")
        groups = cols // group
        names = self.linear_tensors(prefix)
        qweight = checkpoint_array(ckpt, names[0], ("I32",), (cols, out // 8))
        qzeros = checkpoint_array(ckpt, names[1], ("I32",), (groups, out // 8))
        scales = checkpoint_array(ckpt, names[2], SCALE_DTYPES, (groups, out))

        def make():
            u = unpack_int32(qweight, 4, axis=1, order=AWQ_ORDER).T  # [out, in]
            z = unpack_int32(qzeros, 4, axis=1, order=AWQ_ORDER).T.astype(np.float32)  # [out, groups]
            s = scales.T.astype(np.float32)
            return u, s, -(s * z)

        return GroupedIntWeight(prefix + ".weight", shape, 4, group, make, None, self.name, names[0],
                                release_views(ckpt, names), tuple(names))
