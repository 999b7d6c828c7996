"""The tpu plugin: its JAX runner and kernels, run on JAX's CPU platform (JaxCpuBackend).

The conformance kit checks the torch-facing contract (attention against the float64 reference,
every GGUF type's linear, the KV allocator); the tests here cover what the kit does not: the
runner's model numerics on the variants SmolLM2 lacks (q/k/v biases, q/k norms, partial RoPE,
an untied head), mixed prefill+decode steps, prompt logits, the Pallas decode path (in Pallas's
TPU interpret mode) and its fallback, how many programs a generation compiles, and that the KV
pool is donated and updated in place rather than copied.
"""
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("jax")

from ember.backend import BackendOptions, KVCacheSpec  # noqa: E402
from ember.config import CacheConfig, ModelConfig  # noqa: E402
from ember.engine.scheduler import ScheduledSeq, SchedulerOutput  # noqa: E402
from ember.engine.sequence import Sequence  # noqa: E402
from ember.plugins.manager import PluginRegistry  # noqa: E402
from ember.sampling_params import SamplingParams  # noqa: E402
from ember.testing import ReferenceBackend, run_check  # noqa: E402

from ember_tpu import backend as tpu_backend  # noqa: E402
from ember_tpu.backend import JaxCpuBackend, TpuBackend  # noqa: E402


# ------------------------------------------------------------------------------- availability

def test_tpu_is_unavailable_here_with_a_reason_to_act_on(monkeypatch):
    avail = TpuBackend.availability()
    assert not avail.ok
    assert "libtpu is not installed" in avail.reason and "pip install 'ember[tpu]'" in avail.reason
    # with a TPU runtime installed but no TPU attached, JAX is asked and its devices named
    monkeypatch.setattr(tpu_backend, "_libtpu_present", lambda: True)
    reason = TpuBackend.availability().reason
    assert reason.startswith("no TPU: JAX sees only cpu devices (Backend 'tpu' failed to initialize"), reason
    # and without jax at all
    real = tpu_backend.importlib.util.find_spec
    monkeypatch.setattr(tpu_backend.importlib.util, "find_spec", lambda name: None if name == "jax" else real(name))
    assert TpuBackend.availability().reason == "jax is not installed (pip install 'ember[tpu]')"
    assert JaxCpuBackend.availability().reason == "jax is not installed (pip install jax)"


def test_the_plugin_lists_tpu_without_importing_jax():
    code = ("import sys; from ember.plugins.manager import PluginRegistry; "
            "b = PluginRegistry().backends['tpu']; "
            "print(b.usable, b.availability.reason, 'jax' in sys.modules, sep='|')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    usable, reason, jax_loaded = out.stdout.strip().splitlines()[-1].split("|")
    assert usable == "False" and "libtpu" in reason and jax_loaded == "False"


def test_jax_cpu_backend_is_available_and_not_registered():
    assert JaxCpuBackend.availability().ok
    assert "jax_cpu" not in PluginRegistry().backends
    assert PluginRegistry.of(JaxCpuBackend).select("jax_cpu").usable


# ------------------------------------------------------------------------------ the kit's checks

@pytest.mark.parametrize("check", ["attention", "linear", "kv_allocator"])
def test_conformance_kit(check):
    run_check(check, JaxCpuBackend)


def test_conformance_kit_in_bfloat16(monkeypatch):
    # the TPU's default compute and cache dtype; one grouped-query shape of the kit's four keeps
    # this quick (compiling, not running, is what takes the time)
    from ember.testing import conformance

    monkeypatch.setattr(conformance, "ATTENTION_SHAPES", [(8, 2, 64, 16)])
    for check in ("attention", "linear"):
        run_check(check, JaxCpuBackend, BackendOptions(dtype="bfloat16"))


# ------------------------------------------------------------- the runner against the torch model

def _config() -> ModelConfig:
    # Every variant SmolLM2 lacks, at once (the paths are independent): q/k/v biases (Qwen2), q/k
    # norms (Qwen3), RoPE over half of each head, an lm_head of its own; grouped-query heads.
    return ModelConfig("qwen3", vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, context_length=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                       rope_dim=8, attention_bias=True, qk_norm=True)


def _f32(name: str, values: np.ndarray):
    """A float32 GGUF tensor as the loader gives it (1-D tensors as one row of bytes)."""
    from gguf import GGMLQuantizationType

    from ember.gguf.loader import QuantWeight

    values = np.ascontiguousarray(values, dtype=np.float32)
    rows = values.shape[0] if values.ndim == 2 else 1
    return QuantWeight(name, GGMLQuantizationType.F32, values.shape, values.view(np.uint8).reshape(rows, -1))


def _weights(cfg: ModelConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}

    def mat(name, rows, cols):
        out[name] = _f32(name, rng.standard_normal((rows, cols)) * cols ** -0.5)

    def vec(name, n, around=0.0):
        out[name] = _f32(name, around + 0.2 * rng.standard_normal(n))

    h, kvh, d, H, inter = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    mat("model.embed_tokens.weight", cfg.vocab_size, H)
    vec("model.norm.weight", H, 1.0)
    if not cfg.tie_word_embeddings:
        mat("lm_head.weight", cfg.vocab_size, H)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for x, rows in (("q", h * d), ("k", kvh * d), ("v", kvh * d)):
            mat(p + f"self_attn.{x}_proj.weight", rows, H)
            if cfg.attention_bias:
                vec(p + f"self_attn.{x}_proj.bias", rows)
        mat(p + "self_attn.o_proj.weight", H, h * d)
        if cfg.qk_norm:
            vec(p + "self_attn.q_norm.weight", d, 1.0)
            vec(p + "self_attn.k_norm.weight", d, 1.0)
        vec(p + "input_layernorm.weight", H, 1.0)
        vec(p + "post_attention_layernorm.weight", H, 1.0)
        mat(p + "mlp.gate_proj.weight", inter, H)
        mat(p + "mlp.up_proj.weight", inter, H)
        mat(p + "mlp.down_proj.weight", H, inter)
    return out


def _drive(runner, prompts: list[list[int]]) -> tuple[list[int], np.ndarray]:
    """Three steps by hand: A's prompt in two chunks (its first beside all of B's prompt, its
    second beside B's first decode row), then a decode row for each. A wants prompt logits.
    Returns the greedy tokens sampled, in order, and A's prompt logits."""
    params = SamplingParams(temperature=0.0, max_tokens=4)
    a = Sequence("a", list(prompts[0]), params, want_prompt_logits=True, block_table=[3, 5])
    b = Sequence("b", list(prompts[1]), params, block_table=[1])
    na, nb, first = len(prompts[0]), len(prompts[1]), 13
    steps = [[ScheduledSeq(a, 0, first), ScheduledSeq(b, 0, nb)],
             [ScheduledSeq(a, first, na - first), ScheduledSeq(b, nb, 1)],
             [ScheduledSeq(a, na, 1), ScheduledSeq(b, nb + 1, 1)]]
    sampled = []
    for scheduled in steps:
        out = runner.execute(SchedulerOutput(scheduled))
        for s in scheduled:
            if s.samples:
                sampled.append(out[s.seq.seq_id].token_id)
                s.seq.output_token_ids.append(sampled[-1])
    assert len(sampled) == 5
    return sampled, np.asarray(a.prompt_logits, dtype=np.float64)


def test_runner_matches_the_torch_model():
    from ember.engine.torch_runner import TorchModelRunner
    from ember_tpu.runner import JaxModelRunner

    cfg = _config()
    weights = _weights(cfg)
    cache = CacheConfig(block_size=16, num_blocks=8)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, cfg.vocab_size, 21).tolist(), rng.integers(0, cfg.vocab_size, 7).tolist()]
    got_tokens, got_logits = _drive(JaxModelRunner(JaxCpuBackend(), cfg, weights, cache), prompts)
    want_tokens, want_logits = _drive(TorchModelRunner(ReferenceBackend(), cfg, weights, cache), prompts)
    assert got_logits.shape == (21, cfg.vocab_size)
    err = np.abs(got_logits - want_logits).max() / np.abs(want_logits).max()
    assert err < 1e-4, f"prompt logits differ from the torch model's by {err:.1e}"
    assert got_tokens == want_tokens


def test_mixture_of_experts_is_refused_at_load():
    from ember_tpu.runner import JaxModelRunner

    cfg = ModelConfig("qwen3moe", 96, 64, 96, 2, 4, 2, 16, 128, num_experts=8, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="mixture-of-experts models .* not supported by the JAX runner"):
        JaxModelRunner(JaxCpuBackend(), cfg, {}, CacheConfig(num_blocks=8))


# ------------------------------------------------------------------------- the Pallas decode path

def _runner_with_pallas(cfg, weights):
    from ember_tpu.runner import JaxModelRunner

    runner = JaxModelRunner(JaxCpuBackend(), cfg, weights, CacheConfig(block_size=16, num_blocks=8))
    runner.use_pallas = True  # as on a TPU: decode-only steps go to the kernel
    return runner


def test_decode_steps_through_the_pallas_kernel_match(monkeypatch, request):
    """The TPU kernel cannot compile here, but Pallas can interpret it on CPU (TPU semantics: DMAs,
    semaphores, the page tables): enough to check what this plugin feeds it, inside the runner's
    scanned step (page offsets per layer, the softmax scale, padded sequences)."""
    from dataclasses import replace

    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention_kernel as kernel_module

    if not hasattr(pltpu, "InterpretParams"):
        pytest.skip("this jax has no TPU interpret mode")
    launched = []
    pallas_call = kernel_module.pl.pallas_call

    def interpreted(*args, **kwargs):
        launched.append(1)
        kwargs.pop("compiler_params", None)
        return pallas_call(*args, **kwargs, interpret=pltpu.InterpretParams())

    monkeypatch.setattr(kernel_module.pl, "pallas_call", interpreted)
    # the kernel's jit would keep the interpreted trace for later tests of the same shapes
    request.addfinalizer(kernel_module.paged_attention.clear_cache)
    cfg = replace(_config(), head_dim=128)  # the kernel's lane width
    weights = _weights(cfg)
    prompts = [list(range(5, 26)), list(range(40, 47))]
    runner = _runner_with_pallas(cfg, weights)
    got = _drive(runner, prompts)[0]
    assert launched and runner.use_pallas
    from ember_tpu.runner import JaxModelRunner

    assert got == _drive(JaxModelRunner(JaxCpuBackend(), cfg, weights, CacheConfig(block_size=16, num_blocks=8)),
                         prompts)[0]


def test_a_kernel_that_fails_to_compile_falls_back_to_jax_numpy(caplog):
    from dataclasses import replace

    cfg = replace(_config(), head_dim=128)
    weights = _weights(cfg)
    prompts = [list(range(5, 26)), list(range(40, 47))]
    runner = _runner_with_pallas(cfg, weights)  # on CPU, Mosaic refuses to compile it
    got = _drive(runner, prompts)[0]
    assert not runner.use_pallas
    assert "the Pallas paged-attention kernel failed to compile" in caplog.text
    runner = _runner_with_pallas(cfg, weights)
    runner.use_pallas = False
    assert got == _drive(runner, prompts)[0]


# ------------------------------------------------------------------ compilation and the KV pool

@pytest.fixture(scope="module")
def tiny_llm(tiny_gguf):
    from ember.llm import LLM

    return LLM(str(tiny_gguf), device="jax_cpu", max_model_len=512, kv_cache_memory=8 * 1024**2,
               registry=PluginRegistry.of(JaxCpuBackend))


def test_a_long_generation_compiles_a_handful_of_programs(tiny_llm):
    runner, engine = tiny_llm.engine.runner, tiny_llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    before, steps = runner.traces, engine.stats["steps"]
    # 60 prompt tokens and 40 more: the block table grows from 4 blocks to 7 on the way
    out = tiny_llm.generate([list(range(100, 160))], params)[0]
    assert len(out.outputs[0].token_ids) == 40 and engine.stats["steps"] - steps == 40
    # the prefill, then the decode steps of the 4-block table bucket and of the 8-block one
    compiled = runner.traces - before
    assert compiled <= 3, f"{compiled} programs compiled for one 40-step generation"
    # a second request of other lengths within the same buckets compiles nothing
    tiny_llm.generate([list(range(200, 250))], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    assert runner.traces - before == compiled


def test_the_kv_pool_is_donated_and_updated_in_place(tiny_llm):
    runner = tiny_llm.engine.runner
    k, v = runner.k_pool, runner.v_pool
    tiny_llm.generate(["hi"], SamplingParams(max_tokens=2))
    # each step took the pool and handed back its successor: the old arrays are gone
    assert k.is_deleted() and v.is_deleted()
    assert not runner.k_pool.is_deleted()

    # What XLA made of a one-sequence decode step: the pool's buffers alias the step's outputs, and
    # nothing inside copies a pool-sized buffer (a one-row scatter once became a select over the
    # whole pool, copied twice a layer: 15x slower).
    from ember_tpu.attention import PagedInputs, plan_for
    from ember_tpu.batching import pad_batch

    batch = pad_batch([0, 1], [40], [2 * 16 + 7], np.array([[1, 2, 3]]), [5], runner.buckets)
    inputs = PagedInputs(batch.slots, batch.positions, batch.token_seq, batch.tables, batch.seq_lens)
    plan = plan_for(True, batch.shape[0], batch.shape[2], runner.block_size, runner.cfg.num_kv_heads,
                    runner.cfg.head_dim, False)
    rows = np.zeros(batch.shape[1], np.int32)
    hlo = runner._step.lower(runner.params, runner.k_pool, runner.v_pool, batch.token_ids, inputs, rows,
                             plan=plan).compile().as_text()
    header = hlo.split("\n", 1)[0]
    # outputs 2 and 3 (the pools) alias two of the inputs
    assert re.search(r"input_output_alias=\{ \{2\}: \(\d+, \{\}, may-alias\), "
                     r"\{3\}: \(\d+, \{\}, may-alias\) \}", header), header[:300]
    kvh, pages, bs, d = runner.k_pool.shape
    pool_shapes = {f"[{kvh},{pages},{bs},{d}]", f"[{kvh},{pages * bs},{d}]"}
    copies = [line.strip()[:160] for line in hlo.splitlines()
              if " copy(" in line and any(s in line.split("copy(")[0] for s in pool_shapes)]
    assert not copies, "the step copies the KV pool:\n" + "\n".join(copies)


def test_kv_pool_larger_than_memory_is_refused():
    backend = JaxCpuBackend()
    free = tpu_backend.host_memory_available()
    spec = KVCacheSpec(1, free // KVCacheSpec(1, 1, 16, 2, 64).bytes_per_block() + 1, 16, 2, 64)
    with pytest.raises(MemoryError, match="does not fit in the .* GiB free on"):
        backend.allocate_kv_pool(spec)


# -------------------------------------------------------------------------------- the real model

@pytest.mark.slow
def test_greedy_tokens_match_cpu_gguf_on_smollm2(smollm2_gguf):
    from ember.testing.conformance import greedy_tokens
    from ember_cpu_gguf.backend import CpuGgufBackend

    got = greedy_tokens(JaxCpuBackend, str(smollm2_gguf))
    want = greedy_tokens(CpuGgufBackend, str(smollm2_gguf), BackendOptions(threads=2))
    assert got == want
    assert got[-1] == got[0]  # the repeat, served from the prefix cache


@pytest.mark.slow
def test_end_to_end_conformance_on_smollm2(smollm2_gguf):
    run_check("end_to_end", JaxCpuBackend, model=str(smollm2_gguf))
