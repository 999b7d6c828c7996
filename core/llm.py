"""The offline API: ``LLM(model).generate(prompts, SamplingParams(...))`` and ``LLM.chat``."""
from __future__ import annotations

from ember.config import CacheConfig, EngineConfig, SchedulerConfig
from ember.engine.llm_engine import LLMEngine
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, *, device: str = "auto", threads: int | None = None,
                 max_model_len: int | None = None, kv_cache_memory: int | None = None,
                 num_kv_blocks: int | None = None, block_size: int = 16,
                 enable_prefix_caching: bool = True, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, exact: bool = False, dtype: str | None = None,
                 gpu_memory_utilization: float = 0.9, eager: bool = False, int8_activations: bool = False,
                 registry=None):
        cache = CacheConfig(block_size=block_size, num_blocks=num_kv_blocks,
                            enable_prefix_caching=enable_prefix_caching)
        if kv_cache_memory is not None:
            cache.kv_cache_memory = kv_cache_memory
        config = EngineConfig(model=model, device=device, threads=threads, exact=exact, dtype=dtype,
                              int8_activations=int8_activations,
                              memory_utilization=gpu_memory_utilization, eager=eager,
                              max_model_len=max_model_len, cache=cache,
                              scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                                        max_num_batched_tokens=max_num_batched_tokens))
        self.engine = LLMEngine(config, registry=registry)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for every prompt together (continuously batched); outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or self.default_sampling_params()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        ids = []
        try:
            for p, sp in zip(prompts, params):
                ids.append(self.engine.add_request(p, sp))
        except Exception:
            for rid in ids:  # leave the engine as it was
                self.engine.abort_request(rid)
            raise
        return self._run(ids)

    def default_sampling_params(self) -> SamplingParams:
        """What generate() samples with when given no SamplingParams: the model's own defaults
        (a Hugging Face directory's generation_config.json), as vLLM's LLM does, else SamplingParams()."""
        gen = {k: v for k, v in self.engine.generation_defaults.items() if k != "eos_token_ids"}
        return SamplingParams(**gen)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | None = None, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Chat completions with the model's own template; one conversation or a list of them."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode_chat(c, add_generation_prompt=add_generation_prompt) for c in convs]
        return self.generate(prompts, sampling_params)

    def prompt_logits(self, prompt: str | list[int]):
        """Logits at every prompt position, [prompt_len, vocab], computed through the paged engine."""
        rid = self.engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0),
                                      want_prompt_logits=True)
        return self._run([rid])[0].prompt_logits

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        try:
            while len(final) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return [final[r] for r in ids]
