"""SmolLM2 as a Hugging Face directory (bf16 safetensors) against transformers on that directory,
and against the same weights as a GGUF Q8_0 file."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from ember.llm import LLM
from ember.sampling_params import SamplingParams

from conftest import PROMPTS
from requantize import requantize

pytestmark = pytest.mark.slow
N_TOKENS = 16
NEAR_TIE = 0.15  # logits: a divergence where the two tokens are closer than this is a near-tie


@pytest.fixture(scope="module")
def hf_llm(smollm2_hf_dir):
    return LLM(str(smollm2_hf_dir), max_model_len=512, exact=True)


def _chat(llm, prompt):
    return llm.tokenizer.encode_chat([{"role": "user", "content": prompt}])


def test_logits_match_transformers_on_the_directory(smollm2_hf_dir, hf_llm):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_hf_dir), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_hf_dir))
    for p in PROMPTS[:3]:
        ids = _chat(hf_llm, p)
        assert ids == tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False)
        ours = torch.as_tensor(np.asarray(hf_llm.prompt_logits(ids)))
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0].float()
        rel = ((ours - want).norm() / want.norm()).item()
        assert rel < 1e-3, f"{p!r}: relative logits error {rel:.2e}"


def test_greedy_tokens_match_the_gguf_q8_0(smollm2_gguf, hf_llm, tmp_path_factory):
    q8 = requantize(smollm2_gguf, tmp_path_factory.mktemp("q8") / "smollm2-q8_0.gguf", GGMLQuantizationType.Q8_0)
    gguf_llm = LLM(str(q8), max_model_len=512, exact=True)
    params = SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True)
    prompts = [_chat(hf_llm, p) for p in PROMPTS]
    assert prompts == [_chat(gguf_llm, p) for p in PROMPTS]  # the same tokenizer, from either file
    ours = [o.outputs[0].token_ids for o in hf_llm.generate(prompts, params)]
    theirs = [o.outputs[0].token_ids for o in gguf_llm.generate(prompts, params)]
    for ids, a, b in zip(prompts, ours, theirs):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if k is None:
            continue
        logits = np.asarray(hf_llm.prompt_logits(ids + a[:k]))[-1]
        gap = abs(float(logits[a[k]]) - float(logits[b[k]]))
        assert gap < NEAR_TIE, f"tokens differ at {k} ({a[k]} vs {b[k]}), logit gap {gap:.3f}: not a near-tie"
