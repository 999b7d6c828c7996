"""Quantization methods: how a checkpoint's tensors become the weights of a linear layer.

A quant method is registered through the ``ember_register_quant_methods`` hook, as a backend is
through ``ember_register_backends``; ember's own (GGUF's tensor types, and the plain float
weights of a Hugging Face checkpoint) are registered through it too (``ember.quant.builtin``).

A method:

- recognises a checkpoint: a Hugging Face ``quantization_config`` (None for an unquantized
  one), or, for GGUF, the file's tensor types;
- names the checkpoint tensors a linear layer owns (``weight``; AWQ's ``qweight``, ``qzeros`` and
  ``scales``...) and turns them into the layer's weight;
- says how weights fuse (q/k/v and gate/up, concatenated along the output dimension) and how a
  weight splits into tensor-parallel shards (along its output rows or its input columns);
- gives the reference dequantize every backend's kernels are tested against.

Backends name the weight formats they have kernels for in ``Backend.quant_formats``; the engine
refuses a model whose formats its backend lacks, naming both.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ember.gguf.loader import QuantWeight
    from ember.hf.safetensors import Checkpoint

# Bumped on any incompatible change to QuantMethod; a method declares the version it was written for.
QUANT_API_VERSION = 1


class QuantMethod(ABC):
    """Subclass this and register an instance through ``ember_register_quant_methods``."""

    name: ClassVar[str]
    api_version: ClassVar[int] = QUANT_API_VERSION
    description: ClassVar[str] = ""

    # --- recognising a checkpoint -------------------------------------------------------------
    def recognises(self, quant_config: Mapping[str, Any] | None) -> bool:
        """Whether this method reads a Hugging Face checkpoint with this ``quantization_config``
        (None: the checkpoint has none). The default: it reads no Hugging Face checkpoint."""
        return False

    # --- the tensors of a linear layer --------------------------------------------------------
    def linear_tensors(self, prefix: str) -> list[str]:
        """The checkpoint names of the tensors the linear layer ``prefix`` (e.g.
        ``model.layers.0.self_attn.q_proj``) owns."""
        return [prefix + ".weight"]

    @abstractmethod
    def load_linear(self, checkpoint: "Checkpoint", prefix: str, shape: tuple[int, int],
                    quant_config: Mapping[str, Any] | None) -> "QuantWeight":
        """The weight of the linear layer ``prefix``, whose torch-order shape is ``shape``
        (out_features, in_features), from its tensors in the checkpoint. Tensor bytes stay views
        of the file where the format allows. Raises CheckpointError naming the file and tensor
        when a tensor is missing or has the wrong dtype or shape."""

    # --- reference, fusion, tensor parallelism ------------------------------------------------
    @abstractmethod
    def dequantize(self, weight: "QuantWeight") -> "torch.Tensor":
        """The weight as float32 [out_features, in_features] (1-D weights as [n]): the reference
        every kernel for this method is tested against."""

    def can_fuse(self, weights: Sequence["QuantWeight"]) -> bool:
        """Whether these weights of one input (q, k and v; gate and up) can run as one linear
        whose output is their outputs concatenated. The default: they share one format."""
        return len({w.qtype for w in weights}) == 1

    @abstractmethod
    def split_output(self, weight: "QuantWeight", start: int, stop: int) -> "QuantWeight":
        """Output rows [start, stop) of the weight: a column-parallel shard."""

    @abstractmethod
    def split_input(self, weight: "QuantWeight", start: int, stop: int) -> "QuantWeight":
        """Input columns [start, stop) of the weight: a row-parallel shard. Raises ValueError
        when the format cannot split there (inside a quantization block or group)."""


class QuantMethodError(ValueError):
    pass


def method_for_checkpoint(methods: Mapping[str, QuantMethod], quant_config: Mapping[str, Any] | None,
                          where: str) -> QuantMethod:
    """The one registered method that reads a checkpoint with this quantization_config."""
    found = [m for m in methods.values() if m.recognises(quant_config)]
    if len(found) == 1:
        return found[0]
    if found:
        raise QuantMethodError(f"{where}: quant methods {', '.join(m.name for m in found)} all claim "
                               f"this checkpoint's quantization_config; uninstall one")
    if quant_config is None:
        raise QuantMethodError(f"{where}: no installed quant method reads unquantized checkpoints")
    named = quant_config.get("quant_method") if isinstance(quant_config, Mapping) else None
    raise QuantMethodError(f"{where}: no installed quant method reads this checkpoint's "
                           f"quantization_config (quant_method {named!r}; installed: "
                           f"{', '.join(sorted(methods)) or 'none'})")
