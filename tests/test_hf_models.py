"""Hugging Face model directories: ember against transformers on checkpoints transformers wrote.

Each model type of the llama family is a small random-weight model that transformers builds and
saves (config.json, safetensors, generation_config.json, tokenizer.json); transformers loading the
same directory is the reference for the logits, and the `safetensors` library for the bytes.
"""
import json
import shutil

import numpy as np
import pytest
import torch

from ember.hf.config import model_config_from_hf
from ember.hf.safetensors import Checkpoint, CheckpointError, SafetensorsFile
from ember.llm import LLM
from ember.loading import load_model
from ember.sampling_params import SamplingParams

from hf_models import MODEL_TYPES, write_model

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

PROMPTS = [[5, 70, 71, 72, 73, 74, 75, 76, 77, 9], [100, 3, 250, 251, 7], list(range(40, 73))]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """model type -> (directory, transformers model reloaded from it in float32)."""
    out = {}
    for model_type in MODEL_TYPES:
        d = tmp_path_factory.mktemp(model_type)
        write_model(d, model_type)
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
        out[model_type] = (d, ref)
    return out


def _ref_logits(ref, ids):
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize("model_type", list(MODEL_TYPES))
def test_logits_match_transformers(models, model_type, exact):
    d, ref = models[model_type]
    llm = LLM(str(d), device="cpu_gguf", exact=exact, max_model_len=256)
    for ids in PROMPTS:
        ours = torch.as_tensor(np.asarray(llm.prompt_logits(ids)), dtype=torch.float32)
        want = _ref_logits(ref, ids)
        assert ours.shape == want.shape
        rel = ((ours - want).norm() / want.norm()).item()
        # exact: float32 throughout, as transformers; fast: the backend's kernels (bf16 weights
        # are exact either way, activations may round)
        assert rel < (1e-4 if exact else 2e-2), f"{model_type} {ids[:4]}: relative error {rel:.2e}"


def test_greedy_tokens_match_transformers(models):
    d, ref = models["qwen3"]
    llm = LLM(str(d), device="cpu_gguf", exact=True, max_model_len=256)
    for ids in PROMPTS:
        ours = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0].outputs[0].token_ids
        with torch.no_grad():
            want = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
        assert ours == want[0, len(ids):].tolist()


def test_config_weights_and_tokenizer_are_read(models):
    d, _ = models["qwen3_moe"]
    m = load_model(d)
    cfg = m.config
    assert (m.format, m.quant_method) == ("safetensors", "unquantized")
    assert (cfg.architecture, cfg.num_experts, cfg.num_experts_per_tok) == ("qwen3moe", 4, 2)
    assert cfg.qk_norm and not cfg.expert_weights_norm  # norm_topk_prob false, as written
    assert m.weights["model.layers.1.mlp.experts.3.down_proj.weight"].shape == (64, 32)
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    for text in ["the cat sat on the mat", "héllo wörld 123", "<|im_start|>user\nhi<|im_end|>"]:
        assert m.tokenizer.encode(text) == tok.encode(text)
    msgs = [{"role": "user", "content": "hi there"}]
    assert m.tokenizer.encode_chat(msgs) == tok.apply_chat_template(msgs, add_generation_prompt=True,
                                                                    tokenize=True, return_dict=False)
    assert tok.convert_tokens_to_ids("<|im_end|>") in m.tokenizer.stop_token_ids


def test_mixtral_names_map_onto_the_experts(models):
    d, ref = models["mixtral"]
    m = load_model(d)
    w = m.weights["model.layers.0.mlp.experts.2.up_proj.weight"]
    assert w.gguf_name == "model.layers.0.block_sparse_moe.experts.2.w3.weight"
    sd = {k: v.float() for k, v in ref.state_dict().items()}
    hf_name = [k for k in sd if k.endswith("layers.0.mlp.experts.up_proj") or k.endswith("experts.2.w3.weight")]
    if hf_name and hf_name[0].endswith("w3.weight"):
        assert torch.equal(w.dequantize(), sd[hf_name[0]])


def test_weights_are_views_of_the_file_and_equal_the_safetensors_library(models):
    d, _ = models["qwen2"]
    m = load_model(d)
    ckpt_file = d / "model.safetensors"
    with safetensors.safe_open(str(ckpt_file), "pt") as f:
        for name, w in m.weights.items():
            want = f.get_tensor(w.gguf_name).float()
            assert torch.equal(w.dequantize().reshape(want.shape), want), name
    w = m.weights["model.layers.0.self_attn.q_proj.weight"]
    assert not w.data.flags.owndata and not w.data.flags.writeable  # a view of the mmap


def test_sharded_checkpoints_load_as_one(models, tmp_path):
    d, ref = models["llama"]
    sharded = tmp_path / "sharded"
    ref.to(torch.bfloat16).save_pretrained(sharded, max_shard_size="60KB")
    for f in d.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, sharded)
    ref.float()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    a, b = load_model(d), load_model(sharded)
    assert a.weights.keys() == b.weights.keys()
    for name in a.weights:
        assert np.array_equal(a.weights[name].data, b.weights[name].data), name


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_float16_and_float32_checkpoints(tmp_path, dtype):
    ref = write_model(tmp_path, "llama", dtype=dtype)
    llm = LLM(str(tmp_path), device="cpu_gguf", exact=True, max_model_len=128)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ours = torch.as_tensor(np.asarray(llm.prompt_logits(PROMPTS[0])))
    want = _ref_logits(ref, PROMPTS[0])
    assert ((ours - want).norm() / want.norm()).item() < 1e-4


def test_rope_parameters_of_both_transformers_generations():
    base = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    v4 = model_config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0}})
    v5 = model_config_from_hf({**base, "rope_parameters": {
        "rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0}})
    assert v4 == v5 and v4.rope_theta == 5e5 and v4.rope_scaling.type == "llama3"
    window = model_config_from_hf({**base, "model_type": "mistral", "sliding_window": 256,
                                   "max_position_embeddings": 4096})
    assert window.context_length == 256  # attention within the window is all of it


def test_yarn_matches_transformers():
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from ember.ops.rope import rope_attention_factor, rope_inv_freq

    params = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6}
    hf = AutoConfig.for_model("qwen2", hidden_size=256, num_attention_heads=4, max_position_embeddings=131072,
                              rope_parameters=params)
    want, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    cfg = model_config_from_hf({"model_type": "qwen2", "vocab_size": 100, "hidden_size": 256,
                                "intermediate_size": 512, "num_hidden_layers": 1, "num_attention_heads": 4,
                                "max_position_embeddings": 131072, "rope_parameters": params})
    ours = rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)
    np.testing.assert_allclose(ours, want.double().numpy(), rtol=1e-6)
    assert rope_attention_factor(cfg.rope_scaling) == pytest.approx(want_factor)


# ------------------------------------------------------------------------ hostile input


@pytest.fixture
def good(models, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(models["llama"][0], d)
    return d


def _set_config(d, **change):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))


def _header(d, name="model.safetensors"):
    raw = (d / name).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return raw, n, json.loads(raw[8:8 + n])


def _write_header(d, header, data, name="model.safetensors"):
    blob = json.dumps(header).encode()
    (d / name).write_bytes(len(blob).to_bytes(8, "little") + blob + data)


def test_truncated_file_names_file_and_tensor(good):
    raw, n, header = _header(good)
    (good / "model.safetensors").write_bytes(raw[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*': data .* runs past the end"):
        load_model(good)


@pytest.mark.parametrize("blob,message", [
    (b"\x05", "too small to be a safetensors file"),
    ((10**12).to_bytes(8, "little"), "over the 100000000-byte limit"),
    ((5000).to_bytes(8, "little") + b"{}", "runs past the end of the file"),
    ((4).to_bytes(8, "little") + b"{{{{", "not valid JSON"),
    ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
])
def test_broken_headers_are_clear_errors(good, blob, message):
    (good / "model.safetensors").write_bytes(blob)
    with pytest.raises(CheckpointError, match=message):
        load_model(good)


@pytest.mark.parametrize("change,message", [
    (lambda h: h["model.norm.weight"].update(dtype="Q4"), "unknown dtype 'Q4'"),
    (lambda h: h["model.norm.weight"].update(shape=[64, -1]), "not a list of non-negative integers"),
    (lambda h: h["model.norm.weight"].update(shape=[10**10, 10**10]), "bytes of data for shape"),
    (lambda h: h["model.norm.weight"].update(data_offsets=[8, 4]), "is not a \\[begin, end\\] pair"),
    (lambda h: h["lm_head.weight"].update(data_offsets=h["model.norm.weight"]["data_offsets"]),
     "overlap|bytes of data"),
])
def test_hostile_tensor_entries(good, change, message):
    raw, n, header = _header(good)
    change(header)
    _write_header(good, header, raw[8 + n:])
    with pytest.raises(CheckpointError, match=message):
        load_model(good)


def test_wrong_dtype_or_shape_for_the_config(good):
    raw, n, header = _header(good)
    norm = header["model.norm.weight"]
    norm["dtype"] = "I16"  # same bytes per value, not a float
    _write_header(good, header, raw[8 + n:])
    with pytest.raises(CheckpointError, match="tensor 'model.norm.weight' is I16; a float weight"):
        load_model(good)
    norm["dtype"], norm["shape"] = "BF16", [32, 2]
    _write_header(good, header, raw[8 + n:])
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \[32, 2\], expected \[64\]"):
        load_model(good)


def test_missing_tensor_and_missing_shard(good, models, tmp_path):
    raw, n, header = _header(good)
    del header["model.layers.1.mlp.down_proj.weight"]
    _write_header(good, header, raw[8 + n:])
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.down_proj.weight' is missing"):
        load_model(good)
    sharded = tmp_path / "sharded"
    models["llama"][1].to(torch.bfloat16).save_pretrained(sharded, max_shard_size="60KB")
    models["llama"][1].float()
    shutil.copy(good / "tokenizer.json", sharded)
    shard = sorted(sharded.glob("*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name} is missing"):
        load_model(sharded)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"hidden_size": "64"}, "hidden_size must be a positive integer"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"mlp_bias": True}, "mlp_bias = True is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "rope_scaling type 'dynamic' is not supported"),
    ({"vocab_size": 100}, "tokenizer.json has .* tokens, config.json's vocab_size is 100"),
    ({"quantization_config": {"quant_method": "exl9"}}, "quant_method 'exl9'; installed: .*gguf.*unquantized"),
    ({"num_hidden_layers": 3}, "'model.layers.2.input_layernorm.weight' is missing"),
])
def test_bad_configs_are_refused_clearly(good, change, message):
    _set_config(good, **change)
    with pytest.raises(CheckpointError, match=message):
        load_model(good)


def test_unreadable_config_and_tokenizer(good):
    (good / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json: not a tokenizer"):
        load_model(good)
    (good / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_model(good)
    (good / "config.json").write_bytes(b"\xff\xfe")
    with pytest.raises(CheckpointError, match="config.json: not a readable JSON model config"):
        load_model(good)


def test_a_bad_checkpoint_leaves_a_server_process_healthy(good, models):
    """A refused load raises and leaks no mapping: the same process loads a good one after."""
    raw, n, header = _header(good)
    (good / "model.safetensors").write_bytes(raw[: 8 + n + 10])
    for _ in range(3):
        with pytest.raises(CheckpointError):
            LLM(str(good), device="cpu_gguf")
    llm = LLM(str(models["llama"][0]), device="cpu_gguf", max_model_len=64)
    assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0))[0].outputs[0].token_ids


def test_reader_agrees_with_the_safetensors_library(models):
    d, _ = models["qwen3"]
    ours = SafetensorsFile(d / "model.safetensors")
    with safetensors.safe_open(str(d / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(ours.tensors)
        for name in f.keys():
            t = f.get_tensor(name)
            assert list(t.shape) == list(ours.tensors[name].shape)
            assert ours.raw(name).tobytes() == t.contiguous().view(torch.uint8).numpy().tobytes()
    ckpt = Checkpoint(d)
    assert len(ckpt) == len(ours.tensors) and ckpt.nbytes == (d / "model.safetensors").stat().st_size


# ------------------------------------------------------------------------ store, CLI, server


def test_pull_stores_a_directory_model(models, tmp_path, monkeypatch):
    from ember.store import IntegrityError, ModelNotFound, ModelStore

    monkeypatch.setenv("EMBER_MODELS", str(tmp_path / "store"))
    store = ModelStore()
    src, _ = models["qwen2"]
    path = store.pull(src, progress=False, name="tiny-qwen2")
    assert path.is_dir() and path.name == "model"
    assert {p.name for p in path.iterdir()} == {p.name for p in src.iterdir()}
    assert store.resolve("tiny-qwen2") == path and store.pull(src, progress=False, name="tiny-qwen2") == path
    entry = {e.name: e for e in store.list()}["tiny-qwen2"]
    assert entry.path == path and entry.size == sum(p.stat().st_size for p in src.iterdir())
    assert store.manifest("tiny-qwen2")["format"] == "safetensors"
    want = LLM(str(src), device="cpu_gguf", exact=True).prompt_logits(PROMPTS[0])
    got = LLM("tiny-qwen2", device="cpu_gguf", exact=True).prompt_logits(PROMPTS[0])
    assert np.array_equal(np.asarray(want), np.asarray(got))
    # a file of the stored model cut short: not a model any more, pulled again whole
    (path / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFound):
        store.resolve("tiny-qwen2")
    assert store.pull(src, progress=False, name="tiny-qwen2") == path
    assert (path / "model.safetensors").stat().st_size == (src / "model.safetensors").stat().st_size
    # a broken directory is refused before anything is stored
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    (broken / "model.safetensors").write_bytes(b"\x05")
    with pytest.raises(IntegrityError, match="not a model directory ember can run.*too small"):
        store.pull(broken, progress=False)
    assert "broken" not in {e.name for e in store.list()}
    assert not list((tmp_path / "store").glob(".tmp-*"))
    store.remove("tiny-qwen2")
    assert store.list() == []


def test_show_and_run_a_directory_from_the_cli(models, tmp_path):
    import subprocess
    import sys

    src, _ = models["llama"]
    env = {**__import__("os").environ, "EMBER_MODELS": str(tmp_path / "store")}
    out = subprocess.run([sys.executable, "-m", "ember.cli", "show", str(src), "--json"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)["model"]
    assert info["architecture"] == "llama" and info["quantization"] == "BF16" and info["chat_template"]
    run = subprocess.run([sys.executable, "-m", "ember.cli", "run", str(src), "the", "--max-tokens", "4",
                          "--no-server"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    bad = subprocess.run([sys.executable, "-m", "ember.cli", "run", str(tmp_path), "hi", "--no-server"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0 and "without a config.json" in bad.stderr and "Traceback" not in bad.stderr


def test_a_directory_model_serves_both_apis(models):
    pytest.importorskip("fastapi")
    import httpx

    from ember.server.serve import BackgroundServer, build_app

    src, _ = models["qwen3"]
    llm = LLM(str(src), device="cpu_gguf", max_model_len=256)
    with BackgroundServer(build_app(llm, "tiny-qwen3")) as srv:
        show = httpx.post(f"{srv.url}/api/show", json={"model": "tiny-qwen3"}, timeout=60).json()
        assert show["details"]["format"] == "safetensors" and show["details"]["family"] == "qwen3"
        assert "im_start" in show["template"]
        tags = httpx.get(f"{srv.url}/api/tags", timeout=60).json()["models"]
        assert tags[0]["size"] == sum(p.stat().st_size for p in src.iterdir()) and tags[0]["digest"]
        r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=120, json={
            "model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_generation_config_gives_the_sampling_defaults(models, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(models["llama"][0], d)
    (d / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [7, 9], "temperature": 0.6, "top_p": 0.9, "top_k": 20, "do_sample": True}))
    llm = LLM(str(d), device="cpu_gguf", max_model_len=64)
    p = llm.default_sampling_params()
    assert (p.temperature, p.top_p, p.top_k) == (0.6, 0.9, 20)
    assert {7, 9} <= llm.engine.runner.eos_token_ids  # generation stops on the file's EOS list too
    pytest.importorskip("fastapi")
    from ember.server.openai_api import _model_defaults, _sampling_params
    from ember.server.openai_protocol import ChatCompletionRequest

    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], top_p=0.5)
    params = _sampling_params(body, max_tokens=4, logprobs=None, defaults=_model_defaults(llm))
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.5, 20)  # the request's own top_p wins
