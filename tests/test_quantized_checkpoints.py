"""AWQ, GPTQ and compressed-tensors checkpoints written by the field's own tools (auto-round,
GPTQModel, llm-compressor: tests/fixtures/quantized, with how they were made), against what those
tools' own loaders give: their dequantized weights, the logits of fixed prompts and greedy tokens.
And cpu_gguf's kernels for these weights against the reference dequantize, on every ISA path."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ember.hf.safetensors import CheckpointError
from ember.llm import LLM
from ember.loading import load_model
from ember.quant.grouped import GroupedIntWeight, unpack_int32
from ember.sampling_params import SamplingParams
from ember_cpu_gguf import native
from ember_cpu_gguf.linear import QuantLinear

from quant_inputs import kernels

FIXTURES = Path(__file__).parent / "fixtures" / "quantized"
ALL_FIXTURES = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.safetensors").is_file())
# How far the tool's own loader is from the float32 model of its dequantized weights (dense_logits),
# by design: AWQ's kernel casts activations to float16; compressed-tensors' FP8 loader quantizes
# activations to FP8 (dynamically), which ember does not do (it multiplies float activations).
TOOL_TOLERANCE = {"awq": 3e-3, "gptq": 2e-3, "compressed-tensors": 1e-3}
FP8_TOOL_TOLERANCE = 0.12
# ... and ember from that dense model: GPTQModel and auto-round dequantize to float16, rounding the
# weights the dense model is built from (ember keeps them exact in float32); compressed-tensors'
# dequantization is exact.
DENSE_TOLERANCE = {"awq": 1e-3, "gptq": 1e-3, "compressed-tensors": 1e-5}
PROMPTS = [[1, 20, 30, 40, 50, 60, 70, 80], [300, 301, 302, 7, 9], list(range(100, 140))]
NEAR_TIE = 0.02  # logits; random weights make close calls common


def _reference(name):
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / name / "reference.safetensors"))


def test_the_fixtures_are_there():
    """Every format of the issue that the tools here can write (see fixtures/quantized/README.md)."""
    methods = {json.loads((FIXTURES / n / "config.json").read_text())["quantization_config"]["quant_method"]
               for n in ALL_FIXTURES}
    assert {"awq", "gptq", "compressed-tensors"} <= methods and len(ALL_FIXTURES) >= 10, ALL_FIXTURES


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_dequantize_equals_the_tools_own(name):
    m = load_model(FIXTURES / name)
    ref = _reference(name)
    for key, want in ref.items():
        if not key.startswith("dequant."):
            continue
        ours = m.weights[key[len("dequant."):] + ".weight"].dequantize()
        if m.quant_method in ("awq", "gptq"):
            # GPTQModel's and auto-round's kernels dequantize in float16: scale * (q - z) rounded once
            ours = ours.half().float()
        assert torch.equal(ours, want.float()), f"{key}: differs by {(ours - want).abs().max():.3g}"


def _is_fp8(name):
    cfg = json.loads((FIXTURES / name / "config.json").read_text())["quantization_config"]
    return cfg.get("format") == "float-quantized" or cfg.get("quant_method") == "fp8"


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_logits_and_greedy_tokens_match_the_tools_weights(name, exact):
    """Against the float32 model of the tool's own dequantized weights (dense_logits: the tight
    target), and against the tool's own loader (logits) within what its kernels round."""
    ref = _reference(name)
    llm = LLM(str(FIXTURES / name), device="cpu_gguf", exact=exact, max_model_len=256)
    if not exact:  # the quantized weights run on cpu_gguf's own kernels, in the native runner
        from ember_cpu_gguf.runner import NativeModelRunner

        assert isinstance(llm.engine.runner, NativeModelRunner)
    method = json.loads((FIXTURES / name / "config.json").read_text())["quantization_config"]["quant_method"]
    for i, ids in enumerate(PROMPTS):
        ours = torch.as_tensor(np.asarray(llm.prompt_logits(ids)))
        dense = ref[f"dense_logits.{i}"].float()
        rel = ((ours - dense).norm() / dense.norm()).item()
        # exact: float32 as the dense model; fast: integer weights against activations in two int8
        # terms (about 16-bit precision), FP8 weights against float32 ones, and a float16 KV cache
        bound = DENSE_TOLERANCE[method] + (0 if exact else 1e-3)  # fast: a float16 KV cache too
        assert rel < bound, f"prompt {i}: {rel:.2e} from the dense model"
        tool = ref[f"logits.{i}"].float()
        rel = ((ours - tool).norm() / tool.norm()).item()
        assert rel < (FP8_TOOL_TOLERANCE if _is_fp8(name) else TOOL_TOLERANCE[method]), f"prompt {i}: {rel:.2e} from the tool"
        tokens = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids
        theirs = ref[f"dense_greedy.{i}"].tolist()
        k = next((j for j, (a, b) in enumerate(zip(tokens, theirs)) if a != b), None)
        if k is not None:  # a divergence must be a near-tie of our own logits
            logits = np.asarray(llm.prompt_logits(ids + tokens[:k]))[-1]
            gap = abs(float(logits[tokens[k]]) - float(logits[theirs[k]]))
            assert gap < NEAR_TIE, f"prompt {i}: token {k} is {tokens[k]}, the dense model's {theirs[k]} (gap {gap:.3f})"


def test_act_order_and_v1_zero_points_are_read():
    m = load_model(FIXTURES / "gptq-gptqmodel-w4g64-descact")
    w = m.weights["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(w, GroupedIntWeight) and w.perm is not None and sorted(w.perm) == list(range(w.shape[1]))
    u, s, mins = w.arrays
    assert u.max() <= 15 and s.shape == (w.shape[0], w.shape[1] // 64)
    assert m.weights["lm_head.weight"].qtype.name == "BF16"  # left unquantized by the tool


def test_quantized_weights_stay_near_their_packed_size():
    m = load_model(FIXTURES / "gptq-gptqmodel-w4g64-descact")
    w = m.weights["model.layers.0.mlp.down_proj.weight"]
    lin = QuantLinear([w], threads=1)
    # 4-bit integers plus a float32 scale and minimum per 32: 6 bits a weight (the file: about 4.3)
    assert lin.nbytes == w.shape[0] * w.shape[1] * 6 // 8
    f8 = load_model(FIXTURES / "ct-fp8-dynamic").weights["model.layers.0.mlp.down_proj.weight"]
    assert QuantLinear([f8], threads=1).nbytes == f8.shape[0] * f8.shape[1] + f8.shape[0] * 4  # a byte a weight


# ------------------------------------------------------------------- kernels on every ISA path


def _grouped(bits, out, cols, group, seed, act_order=False):
    rng = np.random.default_rng(seed)
    u = rng.integers(0, 1 << bits, (out, cols), dtype=np.uint8)
    s = (rng.random((out, cols // group)) * 0.02 + 0.001).astype(np.float16).astype(np.float32)
    z = rng.integers(0, 1 << bits, (out, cols // group)).astype(np.float32)
    perm = rng.permutation(cols) if act_order else None
    return GroupedIntWeight(f"w{seed}", (out, cols), bits, group, lambda: (u, s, -(s * z)), perm)




@pytest.mark.parametrize("variant", native.VARIANTS)
@pytest.mark.parametrize("bits,group,act_order", [(4, 64, False), (4, 128, True), (8, 32, False), (4, 256, False)])
def test_grouped_kernels_match_the_reference_dequantize(variant, bits, group, act_order):
    ks = kernels(variant)
    w = _grouped(bits, 48, 256, group, bits + group, act_order)
    lin = QuantLinear([w], threads=2, kernels=ks)
    wf = w.dequantize().double()
    for m in (1, 2, 5, 37):
        x = torch.randn(m, 256)
        y = lin(x).double()
        want = x.double() @ wf.T
        # two int8 activation terms are about 16-bit precision
        assert (y - want).norm() / want.norm() < 1e-4, m
        assert torch.equal(lin(x[:1].clone()), lin(x)[:1])  # batch invariance


@pytest.mark.skipif(len([v for v in native.VARIANTS if native.runnable(v)[0]]) < 2,
                    reason="this CPU runs only one ISA build: nothing to compare")
def test_grouped_kernels_give_the_same_bits_on_every_isa():
    runnable = [v for v in native.VARIANTS if native.runnable(v)[0]]
    x = torch.randn(37, 256)
    for bits in (4, 8):
        w = _grouped(bits, 40, 256, 64, 7, act_order=True)
        outs = {v: QuantLinear([w], threads=2, kernels=native.quant_matmul(v))(x) for v in runnable}
        for v, y in outs.items():
            assert torch.equal(y, outs[runnable[-1]]), v


def test_fused_grouped_parts_share_one_input_order():
    ks = native.quant_matmul()
    a, b = _grouped(4, 32, 256, 64, 1, act_order=True), _grouped(4, 32, 256, 64, 2, act_order=True)
    assert not QuantLinear.accepts([a, b], ks)  # two act orders cannot share one input
    b.perm = a.perm
    assert QuantLinear.accepts([a, b], ks)


def test_unpacking_agrees_with_the_packers_convention():
    words = np.array([[0x76543210, 0xFEDCBA98]], dtype=np.uint32).view(np.int32)
    assert unpack_int32(words, 4, axis=1).tolist() == [list(range(16))]
    assert unpack_int32(words.T.copy(), 4, axis=0)[:, 0].tolist() == list(range(16))
    awq = unpack_int32(np.array([[0x75316420]], dtype=np.uint32).view(np.int32), 4, axis=1,
                       order=(0, 2, 4, 6, 1, 3, 5, 7))
    assert awq.tolist() == [list(range(8))]


# ------------------------------------------------------------------- refusals


def _copy(name, tmp_path):
    import shutil

    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d)
    (d / "reference.safetensors").unlink()
    return d


def _set_quant(d, **change):
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("name,change,message", [
    ("gptq-gptqmodel-w8g64", {"bits": 3}, "GPTQ with 3-bit weights is not supported"),
    ("gptq-gptqmodel-w8g64", {"group_size": 96}, "group_size 96 does not divide"),
    ("gptq-gptqmodel-w8g64", {"checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported"),
    ("awq-autoround-w4g64", {"version": "gemv"}, "AWQ 4-bit 'gemv' checkpoints are not supported"),
    ("gptq-gptqmodel-w8g64", {"group_size": 128}, "qzeros. has shape \\[2, \\d+\\], expected \\[1, \\d+\\]"),
])
def test_inconsistent_quantization_configs_are_refused(tmp_path, name, change, message):
    d = _copy(name, tmp_path)
    _set_quant(d, **change)
    with pytest.raises(CheckpointError, match=message):
        load_model(d)


def test_a_backend_without_the_kernel_is_named():
    """A backend that declares no grouped-integer kernel (the conformance kit's reference backend
    runs GGUF types only): the error names the backend and the method."""
    from ember.plugins.manager import BackendUnavailable, PluginRegistry
    from ember.testing.conformance import ReferenceBackend

    with pytest.raises(BackendUnavailable, match="backend 'reference' has no kernel for the gptq checkpoint's "
                                                 "weight formats int4"):
        LLM(str(FIXTURES / "gptq-gptqmodel-w4g64-descact"), device="reference",
            registry=PluginRegistry.of(ReferenceBackend))


def test_the_fp8_method_reads_deepseek_style_blocks(tmp_path):
    """vLLM's `fp8` checkpoints (DeepSeek's block layout: weight_scale_inv per 128x128 block) hold
    what compressed-tensors' FP8 block format does under other names: the same tool's weights
    rewritten that way give the same logits, bit for bit."""
    from safetensors.torch import load_file, save_file

    d = _copy("ct-fp8-block", tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    save_file({k.replace(".weight_scale", ".weight_scale_inv"): v for k, v in tensors.items()},
              str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (d / "config.json").write_text(json.dumps(cfg))
    m = load_model(d)
    assert m.quant_method == "fp8" and m.weights["model.layers.1.mlp.up_proj.weight"].format == "fp8"
    want = LLM(str(FIXTURES / "ct-fp8-block"), device="cpu_gguf", max_model_len=128).prompt_logits(PROMPTS[2])
    got = LLM(str(d), device="cpu_gguf", max_model_len=128).prompt_logits(PROMPTS[2])
    assert np.array_equal(np.asarray(want), np.asarray(got))


@pytest.mark.parametrize("backend", ["tpu", "xpu"])
@pytest.mark.parametrize("name", ["gptq-gptqmodel-w4g64-descact", "awq-autoround-w4g64", "ct-fp8-block"])
def test_accelerator_backends_dequantize_at_load(backend, name):
    """xpu and tpu dequantize these weights at load to their compute dtype (float32 on their CPU
    paths here), through each format's reference: the dense model's logits."""
    from ember.plugins.manager import PluginRegistry

    if backend == "tpu":
        pytest.importorskip("jax")
        from ember_tpu.backend import JaxCpuBackend as cls
    else:
        from ember_xpu.backend import PortableXpuBackend as cls
    ref = _reference(name)
    llm = LLM(str(FIXTURES / name), device=cls.name, dtype="float32", max_model_len=128,
              registry=PluginRegistry.of(cls))
    logits = llm.prompt_logits(PROMPTS[0])  # a torch tensor from the torch runner, numpy from the JAX one
    ours = (logits.detach().clone() if isinstance(logits, torch.Tensor) else torch.from_numpy(np.array(logits))).float()
    dense = ref["dense_logits.0"].float()
    method = json.loads((FIXTURES / name / "config.json").read_text())["quantization_config"]["quant_method"]
    assert ((ours - dense).norm() / dense.norm()).item() < DENSE_TOLERANCE[method] + 1e-5
