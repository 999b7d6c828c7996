"""GPTQ checkpoints (AutoGPTQ, GPTQModel, auto-round's auto_gptq format), as vLLM reads them.

quantization_config: {"quant_method": "gptq", "bits": 4 or 8, "group_size": G (-1: one group per
row), "sym": bool, "desc_act": bool, "checkpoint_format": "gptq" (v1) or "gptq_v2", "dynamic":
{...}}. A linear ``prefix`` holds
- ``qweight`` int32 [in / (32 / bits), out]: the integers packed along the input dimension, the
  lowest bits first;
- ``qzeros`` int32 [in / G, out / (32 / bits)]: the zero points packed along the output dimension;
  v1 stores each zero point minus one (AutoGPTQ's convention), v2 the zero point itself;
- ``scales`` float16 [in / G, out];
- ``g_idx`` int32 [in], optional: each input column's group, a permutation of the plain
  j // G with act order (desc_act).
w[n, k] = scales[g, n] * (q[k, n] - z[g, n]) with g = g_idx[k].

``dynamic`` overrides bits / group_size / sym for the modules whose names match a regex
(``"+:regex"`` or a bare regex), and ``"-:regex"`` leaves matching modules unquantized (their
float weight is in the checkpoint, which the loader reads as such).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from ember.hf.safetensors import CheckpointError
from ember.quant import QuantMethod
from ember.quant.grouped import (SCALE_DTYPES, GroupedIntWeight, GroupedMethod, act_order, checkpoint_array,
                                 release_views, unpack_int32)


def module_config(quant_config: Mapping[str, Any], prefix: str) -> dict | None:
    """The config that applies to one module (None: the module is left unquantized)."""
    cfg = dict(quant_config)
    for pattern, override in (quant_config.get("dynamic") or {}).items():
        if not isinstance(pattern, str):
            continue
        negative, body = pattern.startswith("-:"), pattern.split(":", 1)[1] if pattern[:2] in ("-:", "+:") else pattern
        if re.match(body, prefix) or re.match(body, prefix.removeprefix("model.")):
            if negative:
                return None
            if isinstance(override, Mapping):
                cfg.update(override)
    return cfg


class GPTQMethod(GroupedMethod, QuantMethod):
    name = "gptq"
    description = "GPTQ 4- and 8-bit (v1 and v2 zero points, act order with g_idx, dynamic overrides)"

    def recognises(self, quant_config):
        return isinstance(quant_config, Mapping) and quant_config.get("quant_method") == "gptq"

    def linear_tensors(self, prefix):
        return [prefix + ".qweight", prefix + ".qzeros", prefix + ".scales"]

    def load_linear(self, ckpt, prefix, shape, quant_config):
        cfg = module_config(quant_config, prefix)
        if cfg is None:
            raise CheckpointError(f"{ckpt.directory}: {prefix} is left unquantized by the config's dynamic "
                                  f"rules, yet its qweight is in the checkpoint")
        bits, out, cols = cfg.get("bits"), shape[0], shape[1]
        if bits not in (4, 8):
            raise CheckpointError(f"{ckpt.directory}: GPTQ with {bits!r}-bit weights is not supported (4 or 8)")
        group = cfg.get("group_size", 128)
        group = cols if group in (-1, None) else group
        if not isinstance(group, int) or group <= 0 or cols % group:
            raise CheckpointError(f"{ckpt.directory}: GPTQ group_size {cfg.get('group_size')!r} does not "
                                  f"divide {prefix}'s {cols} input columns")
        fmt = cfg.get("checkpoint_format") or "gptq"
        if fmt not in ("gptq", "gptq_v2"):
            raise CheckpointError(f"{ckpt.directory}: GPTQ checkpoint_format {fmt!r} is not supported "
                                  f"(gptq, gptq_v2)")
        per, groups = 32 // bits, cols // group
        if cols % per or out % per:
            raise CheckpointError(f"{ckpt.directory}: {prefix}'s shape {list(shape)} does not pack in "
                                  f"words of {per} {bits}-bit values")
        names = self.linear_tensors(prefix)
        qweight = checkpoint_array(ckpt, names[0], ("I32",), (cols // per, out))
        qzeros = checkpoint_array(ckpt, names[1], ("I32",), (groups, out // per))
        scales = checkpoint_array(ckpt, names[2], SCALE_DTYPES, (groups, out))
        perm = act_order(ckpt, prefix + ".g_idx", cols, group, names)
        mask = (1 << bits) - 1

        def make():
            u = unpack_int32(qweight, bits, axis=0).T  # [out, in]
            if perm is not None:
                u = u[:, perm]
            z = unpack_int32(qzeros, bits, axis=1).astype(np.int32)  # [groups, out]
            if fmt == "gptq":  # v1: each zero point is stored minus one
                z = (z + 1) & mask
            s = scales.T.astype(np.float32)
            return u, s, -(s * z.T.astype(np.float32))

        return GroupedIntWeight(prefix + ".weight", shape, bits, group, make, perm, self.name, names[0],
                                release_views(ckpt, names), tuple(names))
