"""SmolLM2-135M-Instruct as a bf16 Hugging Face directory: transformers dequantizes the Q4_1 GGUF of
ember's store (`ember pull smollm2`) and saves it. Usage: python make_bf16.py [OUT]"""
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ember.store import ModelStore

t = time.time()
gguf = ModelStore().resolve("smollm2")
d, name = str(gguf.parent), gguf.name
OUT = sys.argv[1] if len(sys.argv) > 1 else "/work/models/hf/smollm2-bf16"
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
del model.config.quantization_config
model.hf_quantizer = None
model.to(torch.bfloat16).save_pretrained(OUT)
tok.save_pretrained(OUT)
print("tied", model.config.tie_word_embeddings, model.config.hidden_size, model.config.intermediate_size,
      model.config.num_attention_heads, model.config.num_key_value_heads, model.config.vocab_size)
ids = tok("The capital of France is", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=12, do_sample=False)
print(repr(tok.decode(out[0])))
print("time", time.time() - t)
