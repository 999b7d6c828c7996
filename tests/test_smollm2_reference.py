"""ember in exact mode against transformers on the real SmolLM2-135M-Instruct Q4_1 file (the same
GGUF, float32). The fast path is held to the exact mode in test_fast_path_fidelity.py."""
import pytest
import torch

from ember.sampling_params import SamplingParams

from conftest import PROMPTS

pytestmark = pytest.mark.slow
N_TOKENS = 32


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    kw = dict(gguf_file=smollm2_gguf.name)
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), dtype=torch.float32, **kw)
    model.eval()
    return tok, model


def _chat_ids(llm, prompt):
    return llm.tokenizer.encode_chat([{"role": "user", "content": prompt}])


def test_greedy_tokens_match_transformers(smollm2_exact, hf_model):
    tok, model = hf_model
    prompts = [_chat_ids(smollm2_exact, p) for p in PROMPTS]
    # min_tokens masks EOS exactly as transformers' min_new_tokens does
    ours = smollm2_exact.generate(prompts, SamplingParams(temperature=0.0, max_tokens=N_TOKENS, min_tokens=N_TOKENS))
    mismatches = []
    for ids, out in zip(prompts, ours):
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=N_TOKENS, min_new_tokens=N_TOKENS,
                                 pad_token_id=tok.eos_token_id)
        ref_ids = ref[0, len(ids):].tolist()
        if out.outputs[0].token_ids != ref_ids:
            mismatches.append((tok.decode(ids), out.outputs[0].token_ids, ref_ids))
    assert not mismatches, mismatches


def test_prompt_logits_match_transformers(smollm2_exact, hf_model):
    _, model = hf_model
    for p in PROMPTS:
        ids = _chat_ids(smollm2_exact, p)
        ours = torch.as_tensor(smollm2_exact.prompt_logits(ids))  # numpy from a torch-free runner
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].float()
        assert ours.shape == ref.shape
        rel = (ours - ref).norm() / ref.norm()
        assert rel < 1e-3, f"{p!r}: relative logits error {rel:.2e}"


def test_chat_template_matches_transformers(smollm2_exact, hf_model):
    tok, _ = hf_model
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    assert smollm2_exact.tokenizer.encode_chat(msgs) == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
