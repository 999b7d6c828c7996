"""compressed-tensors checkpoints (what llm-compressor writes), integer weights.

quantization_config: {"quant_method": "compressed-tensors", "format": ..., "config_groups":
{name: {"targets": [...], "weights": {"num_bits", "type", "symmetric", "strategy", "group_size"},
"format"?: ...}}, "ignore": [...]}. The formats read here:
- ``pack-quantized``: ``weight_packed`` int32 [out, in / (32 / bits)], the integers packed along
  the input dimension, lowest bits first, each stored as q + 2^(bits-1) (q signed); ``weight_scale``
  [out, groups]; asymmetric: ``weight_zero_point`` int32 [out / (32 / bits), groups], packed the
  same way along the output dimension; ``weight_shape`` [2]; act order: ``weight_g_idx`` [in];
- ``int-quantized``: ``weight`` int8 [out, in], ``weight_scale``, asymmetric ``weight_zero_point``
  int8.
w = scale * (q - zero_point), by group of the input columns ("group"), or one group per row
("channel"). Modules the config's ``ignore`` names keep their float weight, which the loader reads
as such. The float formats (FP8) are another method's.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from ember.hf.safetensors import CheckpointError
from ember.quant import QuantMethod
from ember.quant.grouped import (SCALE_DTYPES, GroupedIntWeight, GroupedMethod, act_order, checkpoint_array,
                                 release_views, unpack_int32)

INT_FORMATS = ("pack-quantized", "int-quantized")
FLOAT_FORMAT = "float-quantized"


def _matches(target: str, prefix: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], prefix) is not None
    return target in ("Linear", prefix) or prefix.endswith("." + target)


def scheme_for(quant_config: Mapping[str, Any], prefix: str) -> tuple[dict, str] | None:
    """(the weights' quantization args, the format) of the config group targeting this module;
    None when it is ignored or no group targets it."""
    if any(_matches(t, prefix) for t in quant_config.get("ignore") or []):
        return None
    for group in (quant_config.get("config_groups") or {}).values():
        if isinstance(group, Mapping) and any(_matches(t, prefix) for t in group.get("targets") or []):
            weights = group.get("weights")
            if isinstance(weights, Mapping):
                return dict(weights), group.get("format") or quant_config.get("format") or ""
    return None


class CompressedTensorsMethod(GroupedMethod, QuantMethod):
    name = "compressed-tensors"
    description = ("compressed-tensors: int4/int8 weights by group or channel (pack-quantized, int-quantized), "
                   "FP8 by tensor, channel or block (float-quantized)")

    def recognises(self, quant_config):
        if not (isinstance(quant_config, Mapping) and quant_config.get("quant_method") == "compressed-tensors"):
            return False
        formats = {quant_config.get("format")} | {g.get("format") for g in (quant_config.get("config_groups") or {}).values()
                                                  if isinstance(g, Mapping)}
        formats.discard(None)
        return bool(formats) and formats <= set(INT_FORMATS) | {FLOAT_FORMAT, "dense"}

    def linear_tensors(self, prefix):
        return [prefix + ".weight_scale"]  # with weight_packed (pack-quantized) or weight (int-quantized)

    def load_linear(self, ckpt, prefix, shape, quant_config):
        where = ckpt.directory
        scheme = scheme_for(quant_config, prefix)
        if scheme is None:
            raise CheckpointError(f"{where}: {prefix} has a weight_scale, yet no config group targets it")
        args, fmt = scheme
        bits, kind, strategy = args.get("num_bits"), args.get("type", "int"), args.get("strategy")
        if fmt == FLOAT_FORMAT and kind == "float" and bits == 8:
            return self._float8(ckpt, prefix, shape, args)
        if kind != "int" or bits not in (4, 8) or fmt not in INT_FORMATS:
            raise CheckpointError(f"{where}: compressed-tensors {fmt!r} with {bits}-bit {kind} weights is not "
                                  f"supported here (int4/int8, {', '.join(INT_FORMATS)})")
        out, cols = shape
        if strategy == "channel":
            group = cols
        elif strategy == "group" and isinstance(args.get("group_size"), int) and args["group_size"] > 0:
            group = args["group_size"]
        else:
            raise CheckpointError(f"{where}: compressed-tensors strategy {strategy!r} is not supported (group, channel)")
        if cols % group:
            raise CheckpointError(f"{where}: group size {group} does not divide {prefix}'s {cols} input columns")
        groups, sym, offset = cols // group, bool(args.get("symmetric", True)), 1 << (bits - 1)
        names = [prefix + ".weight_scale"]
        scales = checkpoint_array(ckpt, names[0], SCALE_DTYPES, (out, groups))
        if fmt == "pack-quantized":
            per = 32 // bits
            names.append(prefix + ".weight_packed")
            packed = checkpoint_array(ckpt, names[1], ("I32",), (out, cols // per))
            zp_packed = None
            if not sym:
                names.append(prefix + ".weight_zero_point")
                zp_packed = checkpoint_array(ckpt, names[-1], ("I32",), (-(-out // per), groups))
        else:
            names.append(prefix + ".weight")
            qint = checkpoint_array(ckpt, names[1], ("I8",), (out, cols))
            zp = None
            if not sym:
                names.append(prefix + ".weight_zero_point")
                zp = checkpoint_array(ckpt, names[-1], ("I8", "I32"), (out, groups))
        if prefix + ".weight_shape" in ckpt:  # the unpacked shape, as the compressor recorded it
            recorded = checkpoint_array(ckpt, prefix + ".weight_shape", ("I64", "I32"), (2,))
            if tuple(int(v) for v in recorded) != tuple(shape):
                raise CheckpointError(f"{where}: {prefix}.weight_shape is {recorded.tolist()}, expected {list(shape)}")
            names.append(prefix + ".weight_shape")
        perm = act_order(ckpt, prefix + ".weight_g_idx", cols, group, names)

        def make():
            if fmt == "pack-quantized":
                u = unpack_int32(packed, bits, axis=1)  # q + offset, [out, in]
                # zero points are stored with the same offset: z_u = zp + offset
                z = (unpack_int32(zp_packed, bits, axis=0)[:out] if zp_packed is not None
                     else np.full((out, groups), offset, np.uint8)).astype(np.float32)
            else:
                u = (qint.astype(np.int16) + 128).astype(np.uint8)
                z = (zp.astype(np.float32) + 128) if zp is not None else np.full((out, groups), 128, np.float32)
            if perm is not None:
                u = u[:, perm]
            s = scales.astype(np.float32)
            return u, s, -(s * z)

        return GroupedIntWeight(prefix + ".weight", shape, bits, group, make, perm, self.name, names[-1],
                                release_views(ckpt, names), tuple(names))

    def _float8(self, ckpt, prefix, shape, args):
        from ember.quant.fp8 import load_float8

        strategy = args.get("strategy")
        if strategy in ("tensor", "channel"):
            return load_float8(ckpt, prefix, shape, "weight_scale", None)
        if strategy == "block":
            block = args.get("block_structure")
            if not (isinstance(block, list) and len(block) == 2):
                raise CheckpointError(f"{ckpt.directory}: FP8 block strategy without a [rows, columns] block_structure")
            return load_float8(ckpt, prefix, shape, "weight_scale", tuple(block))
        raise CheckpointError(f"{ckpt.directory}: compressed-tensors FP8 strategy {strategy!r} is not supported "
                              f"(tensor, channel, block)")

    def can_fuse(self, weights):
        if any(getattr(w, "format", None) == "fp8" for w in weights):
            return len({(w.format, getattr(w, "block", None)) for w in weights}) == 1
        return super().can_fuse(weights)

    def split_output(self, weight, start, stop):
        if getattr(weight, "format", None) == "fp8":
            from ember.quant.fp8 import FP8Method

            return FP8Method().split_output(weight, start, stop)
        return weight.rows(start, stop)

    def split_input(self, weight, start, stop):
        if getattr(weight, "format", None) == "fp8":
            from ember.quant.fp8 import FP8Method

            return FP8Method().split_input(weight, start, stop)
        return weight.columns(start, stop)
