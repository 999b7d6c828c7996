"""cpu_gguf's native runner (one C call per step, no torch) against the torch runner driving the
same kernels through the backend contract: the same tokens and the same logprobs, bit for bit,
because every kernel is the same and runs in the same order. Plus the pieces it adds: the C
embedding lookup, the choice of runner, and a CLI-style run that never imports torch."""
import json
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants as gq

from ember.gguf.loader import QuantWeight
from ember.sampling_params import SamplingParams

from conftest import PROMPTS

native = pytest.importorskip("ember_cpu_gguf.native")
if native.layer_ops() is None:
    pytest.skip("no C compiler: the native runner is unavailable", allow_module_level=True)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0],
                         ids=lambda q: q.name)
def test_embedding_rows_are_the_reference_dequantization(qtype):
    rng = np.random.default_rng(int(qtype))
    table = (rng.standard_normal((40, 96)) * 2).astype(np.float32)
    data = gq.quantize(table, qtype) if qtype != Q.F32 else table
    w = QuantWeight("embed", qtype, (40, 96), np.ascontiguousarray(data).view(np.uint8).reshape(40, -1))
    want = w.dequantize().numpy()
    ids = np.array([3, 0, 39, 3, 17], dtype=np.int64)
    out = np.empty((len(ids), 96), np.float32)
    rc = native.layer_ops().dequant_rows(int(qtype), w.data.ctypes.data, w.data.strides[0], ids.ctypes.data,
                                         len(ids), out.ctypes.data, 96)
    assert rc == 0
    np.testing.assert_array_equal(out, want[ids])


def test_embedding_lookup_declines_k_quants():
    out = np.empty((1, 256), np.float32)
    ids = np.zeros(1, np.int64)
    blocks = np.zeros((1, 144), np.uint8)
    assert native.layer_ops().dequant_rows(int(Q.Q4_K), blocks.ctypes.data, 144, ids.ctypes.data, 1,
                                           out.ctypes.data, 256) == -2


def _llm(path, **kw):
    from ember.llm import LLM

    return LLM(str(path), max_model_len=1024, kv_cache_memory=128 * 1024**2, **kw)


def test_runner_choice(smollm2_gguf, tiny_gguf, tmp_path):
    import json

    from ember.engine.torch_runner import TorchModelRunner
    from ember_cpu_gguf.runner import NativeModelRunner

    assert isinstance(_llm(smollm2_gguf).engine.runner, NativeModelRunner)
    assert isinstance(_llm(smollm2_gguf, exact=True).engine.runner, TorchModelRunner)
    # float32 weights run on the float kernel (csrc/float_matmul.h), natively too
    assert isinstance(_llm(tiny_gguf).engine.runner, NativeModelRunner)
    # rows of 48 values fit no kernel (they take multiples of 32): the torch runner takes them
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "vocab_size": 300, "hidden_size": 48, "intermediate_size": 64,
                               "num_hidden_layers": 1, "num_attention_heads": 3, "num_key_value_heads": 1}))
    assert isinstance(_llm(f"dummy:{cfg}").engine.runner, TorchModelRunner)


@pytest.mark.slow
def test_native_runner_matches_torch_runner(smollm2_gguf, monkeypatch):
    from ember_cpu_gguf import runner

    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    # greedy with logprobs, and seeded sampling: the same draws need the same logits and RNG
    params = [SamplingParams(temperature=0.0, max_tokens=16, logprobs=3),
              SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=7, max_tokens=16, logprobs=1)]

    def run(llm):
        prompts = [llm.tokenizer.encode_chat(c) for c in chats]
        outs = [llm.generate(prompts, p) for p in params]
        logits = np.asarray(llm.prompt_logits(prompts[0]))
        return [[(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in out] for out in outs], logits

    fast = _llm(smollm2_gguf)
    assert isinstance(fast.engine.runner, runner.NativeModelRunner)
    got, got_logits = run(fast)
    del fast
    monkeypatch.setattr(runner, "unsupported", lambda *a: "the test wants the torch runner")
    ref = _llm(smollm2_gguf)
    assert not isinstance(ref.engine.runner, runner.NativeModelRunner)
    want, want_logits = run(ref)
    assert got == want
    np.testing.assert_array_equal(got_logits, want_logits)


def test_cli_passes_int8_activations_to_the_engine(smollm2_gguf):
    """`--int8-activations` on run, serve and bench reaches the backend's options (and so the
    kernels' flag); without it the default numerics run."""
    from ember import cli

    for command in (["run", "m"], ["serve", "m"], ["bench", "throughput", "--model", "m"]):
        for flag in ([], ["--int8-activations"]):
            args = cli.build_parser().parse_args(command + flag)
            assert args.int8_activations is bool(flag)
    args = cli.build_parser().parse_args(["run", "m", "--int8-activations", "--kv-cache-memory", "64M"])
    llm = cli._make_llm(args, smollm2_gguf)
    assert llm.engine.backend.options.int8_activations
    assert llm.engine.runner.lm_head.one_term


@pytest.mark.slow
def test_int8_activations_run_the_same_on_both_runners(smollm2_gguf, monkeypatch):
    """--int8-activations reaches every quantized linear on both runners (the same prompt logits,
    bit for bit), and is a different numerics from the default's."""
    from ember_cpu_gguf import runner

    def logits(**kw):
        llm = _llm(smollm2_gguf, **kw)
        out = np.asarray(llm.prompt_logits(llm.tokenizer.encode("The capital of France is")))
        return out, isinstance(llm.engine.runner, runner.NativeModelRunner)

    (fast, native_ran), (default, _) = logits(int8_activations=True), logits()
    assert native_ran
    monkeypatch.setattr(runner, "unsupported", lambda *a: "the test wants the torch runner")
    torch_logits, native_ran = logits(int8_activations=True)
    assert not native_ran
    np.testing.assert_array_equal(fast, torch_logits)
    assert not np.array_equal(fast, default)
    assert fast.argmax(-1)[-1] == default.argmax(-1)[-1]


@pytest.mark.slow
def test_every_isa_gives_the_same_logits_and_tokens(smollm2_gguf, monkeypatch):
    """The kernels' bit-for-bit agreement across ISA builds, end to end: the whole model on each
    path this CPU runs (the scalar one included) gives the same prompt logits and greedy tokens."""
    runnable = [v for v in native.VARIANTS if native.runnable(v)[0]]
    if len(runnable) < 2:
        pytest.skip("this CPU runs only one ISA build")
    results = {}
    try:
        for variant in runnable:
            monkeypatch.setenv("EMBER_MAX_CPU_ISA", variant)
            native.reset()
            assert native.selected()[0] == variant
            llm = _llm(smollm2_gguf, threads=2)
            prompt = llm.tokenizer.encode("The capital of France is")
            logits = np.asarray(llm.prompt_logits(prompt))
            tokens = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=3))[0].outputs[0].token_ids
            results[variant] = (logits, tokens)
            del llm
    finally:
        monkeypatch.delenv("EMBER_MAX_CPU_ISA")
        native.reset()
    first = runnable[0]
    for variant in runnable[1:]:
        np.testing.assert_array_equal(results[variant][0], results[first][0], err_msg=f"{variant} vs {first}")
        assert results[variant][1] == results[first][1]


def test_cli_run_never_imports_torch(smollm2_gguf):
    """`ember run` on the native runner: the first token no longer waits for `import torch`."""
    code = (
        "import sys, json\n"
        "from ember.cli import main\n"
        f"rc = main(['run', {str(smollm2_gguf)!r}, 'Name the capital of France.', '--no-server',\n"
        "            '--temperature', '0', '--max-tokens', '8'])\n"
        "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert report == {"rc": 0, "torch": False}
    assert "Paris" in "\n".join(lines[:-1])
