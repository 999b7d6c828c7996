"""The quant-method interface: registration through the hook, recognition of checkpoints, and the
shard splits every method gives (each shard's dequantize is the matching slice of the whole's)."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from ember.plugins.manager import PluginRegistry, get_registry
from ember.quant import QuantMethod, QuantMethodError, method_for_checkpoint
from ember.quant.builtin import GGUFMethod, UnquantizedMethod
from ember.quant.fp8 import FP8Method, Float8Weight
from ember.quant.gptq import GPTQMethod, module_config
from ember.quant.grouped import GroupedIntWeight

from quant_inputs import weight


def test_builtin_methods_are_registered_through_the_hook():
    methods = get_registry().quant_methods
    assert {"gguf", "unquantized", "awq", "gptq", "compressed-tensors", "fp8"} <= set(methods)
    assert all(isinstance(m, QuantMethod) for m in methods.values())


@pytest.mark.parametrize("config,name", [
    (None, "unquantized"), ({"quant_method": "awq", "version": "gemm"}, "awq"),
    ({"quant_method": "gptq", "bits": 4}, "gptq"), ({"quant_method": "fp8"}, "fp8"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "compressed-tensors"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized"}, "compressed-tensors"),
])
def test_one_method_recognises_each_checkpoint(config, name):
    assert method_for_checkpoint(get_registry().quant_methods, config, "x").name == name


def test_unknown_and_ambiguous_checkpoints_are_refused():
    methods = get_registry().quant_methods
    with pytest.raises(QuantMethodError, match="quant_method 'bitsandbytes'; installed: .*gptq"):
        method_for_checkpoint(methods, {"quant_method": "bitsandbytes"}, "x")
    with pytest.raises(QuantMethodError, match="compressed-tensors"):  # a sparse format it cannot read
        method_for_checkpoint(methods, {"quant_method": "compressed-tensors", "format": "sparse-24"}, "x")
    twice = {"a": UnquantizedMethod(), "b": UnquantizedMethod()}
    with pytest.raises(QuantMethodError, match="all claim"):
        method_for_checkpoint(twice, None, "x")


class _Broken(QuantMethod):
    name = "broken"
    api_version = 99

    def load_linear(self, *a):
        raise AssertionError

    def dequantize(self, w):
        raise AssertionError

    def split_output(self, *a):
        raise AssertionError

    def split_input(self, *a):
        raise AssertionError


class third_party:  # a plugin module's namespace, as an entry point loads it
    from ember.plugins import hookimpl

    @staticmethod
    @hookimpl
    def ember_register_quant_methods(register):
        register(_Broken())
        register("not a method")


def test_a_third_partys_bad_methods_are_reported_not_fatal(monkeypatch):
    import sys
    import types
    from importlib.metadata import EntryPoint

    mod = types.ModuleType("ember_bad_quant")
    mod.ember_register_quant_methods = third_party.ember_register_quant_methods
    monkeypatch.setitem(sys.modules, "ember_bad_quant", mod)
    reg = PluginRegistry(entry_points=[EntryPoint("badq", "ember_bad_quant", "ember.backends")])
    errors = {f.name: f.error for f in reg.failed_quant_methods}
    assert "quant API version 99" in errors["broken"] and "not an instance" in errors[repr("not a method")]
    assert "gptq" in reg.quant_methods  # the built-in ones are unaffected


def test_gptq_dynamic_rules():
    cfg = {"quant_method": "gptq", "bits": 4, "group_size": 128,
           "dynamic": {r"-:.*\.mlp\.down_proj": {}, r"+:.*layers\.0\..*": {"bits": 8, "group_size": 64}}}
    assert module_config(cfg, "model.layers.3.mlp.down_proj") is None
    assert module_config(cfg, "model.layers.0.self_attn.q_proj")["bits"] == 8
    assert module_config(cfg, "model.layers.5.self_attn.q_proj")["bits"] == 4


# ------------------------------------------------------------------------ shards


def _check_splits(method, w, row_cut, col_cut):
    full = method.dequantize(w)
    top, bottom = method.split_output(w, 0, row_cut), method.split_output(w, row_cut, w.shape[0])
    assert torch.equal(torch.cat([method.dequantize(top), method.dequantize(bottom)]), full)
    left, right = method.split_input(w, 0, col_cut), method.split_input(w, col_cut, w.shape[1])
    assert torch.equal(torch.cat([method.dequantize(left), method.dequantize(right)], dim=1), full)


def test_gguf_weights_split_by_rows_and_by_blocks_of_columns():
    w = weight(Q.Q4_K, 24, 512, 3)
    _check_splits(GGUFMethod(), w, 9, 256)
    with pytest.raises(ValueError, match="multiples of 256"):
        GGUFMethod().split_input(w, 0, 128)


def test_grouped_weights_split_by_rows_and_by_groups():
    rng = np.random.default_rng(0)
    u = rng.integers(0, 16, (12, 256), dtype=np.uint8)
    s = rng.random((12, 4), dtype=np.float32)
    m = -s * 8
    w = GroupedIntWeight("w", (12, 256), 4, 64, lambda: (u, s, m))
    _check_splits(GPTQMethod(), w, 5, 128)
    with pytest.raises(ValueError, match="group size 64"):
        w.columns(0, 96)
    ordered = GroupedIntWeight("w", (12, 256), 4, 64, lambda: (u, s, m), rng.permutation(256))
    assert torch.equal(GPTQMethod().dequantize(ordered.rows(2, 7)), ordered.dequantize()[2:7])
    with pytest.raises(ValueError, match="act-order"):
        ordered.columns(0, 128)


def test_fp8_weights_split_by_rows_and_by_blocks():
    raw = (torch.randn(10, 256) * 20).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    w = Float8Weight("w", (10, 256), raw, np.random.default_rng(1).random((10, 2), dtype=np.float32))
    _check_splits(FP8Method(), w, 3, 128)
