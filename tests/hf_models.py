"""Small Hugging Face model directories for the tests, written by transformers itself.

write_model() builds a random-weight model of one of the llama family's config types with
transformers' own classes and `save_pretrained` (config.json, safetensors, generation_config.json),
and a byte-level BPE tokenizer through `tokenizers` and transformers' PreTrainedTokenizerFast
(tokenizer.json, tokenizer_config.json with a ChatML template): the files a real checkpoint has,
from the library that writes real checkpoints.
"""
from __future__ import annotations

from pathlib import Path

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# small shapes: 2 layers, GQA 4:2, head_dim 16
COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rms_norm_eps=1e-5)
MODEL_TYPES = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "head_dim": 16, "norm_topk_prob": False},
}


def write_tokenizer(directory: Path, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet.sort()
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = []
    for a, b in [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n")]:
        if a + b not in vocab and len(vocab) < vocab_size - len(SPECIALS):
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=SPECIALS[1:2])
    fast.add_special_tokens({"additional_special_tokens": SPECIALS})
    fast.chat_template = CHATML
    fast.save_pretrained(directory)
    return fast


def write_model(directory: Path, model_type: str = "llama", dtype: str = "bfloat16", seed: int = 0,
                **overrides):
    """A random-weight model in `directory`; returns the transformers model (float32, eval)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **MODEL_TYPES[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # norms away from one, so that a wrong norm shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.to(getattr(torch, dtype)).save_pretrained(directory)
    write_tokenizer(directory, cfg.vocab_size)
    return model.float()
