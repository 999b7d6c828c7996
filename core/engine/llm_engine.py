"""The engine loop: requests in, one scheduler step at a time, streamed outputs back."""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, replace

from ember.backend import BackendOptions
from ember.config import EngineConfig
from ember.dummy import is_dummy, load_dummy
from ember.engine.block_manager import BlockManager
from ember.engine.scheduler import Scheduler
from ember.engine.sequence import FinishReason, Sequence
from ember.outputs import CompletionOutput, RequestMetrics, RequestOutput
from ember.plugins import BackendUnavailable, get_registry
from ember.sampling_params import SamplingParams

log = logging.getLogger(__name__)

# stop_reason of a request whose grammar matcher failed inside the engine (finish_reason "stop").
STRUCTURED_OUTPUT_ERROR = "structured_output_error"


@dataclass
class _SampleState:
    """Text-side state of one sample: detokenizer, stop-string scan, what was already streamed."""

    detok: object
    text: str = ""
    emitted: int = 0  # characters of `text` already streamed
    emitted_tokens: int = 0
    logprobs: list[float] | None = None
    top_logprobs: list | None = None


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    states: list[_SampleState]
    metrics: RequestMetrics
    want_prompt_logits: bool = False
    max_stop_len: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when first scheduled


class LLMEngine:
    def __init__(self, config: EngineConfig, registry=None):
        from ember.store import ModelStore

        t0 = time.perf_counter()
        self.config = config
        self.generation_defaults: dict = {}  # a Hugging Face directory's generation_config.json
        release_pages = None
        if is_dummy(config.model):  # a shape and random weights: no file behind it
            self.model_path = None
            cfg, self.tokenizer, weights = load_dummy(config.model, seed=config.seed)
        else:
            from ember.loading import load_model

            self.model_path = ModelStore().resolve(config.model)
            loaded = load_model(self.model_path)
            cfg, self.tokenizer, weights = loaded.config, loaded.tokenizer, loaded.weights
            release_pages, self.generation_defaults = loaded.release_pages, loaded.generation
        info = (registry or get_registry()).select(config.device)
        self.backend_info = info
        self.backend = info.cls(BackendOptions(threads=config.threads, exact=config.exact, dtype=config.dtype,
                                               int8_activations=config.int8_activations,
                                               memory_utilization=config.memory_utilization,
                                               eager=config.eager,
                                               max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
                                               max_num_seqs=config.scheduler.max_num_seqs))
        from ember.quant.grouped import weight_format

        missing = sorted({weight_format(w) for w in weights.values()} - set(self.backend.quant_formats))
        if missing:
            method = loaded.quant_method if release_pages is not None else "dummy"
            raise BackendUnavailable(f"backend {info.name!r} has no kernel for the {method} checkpoint's weight "
                                     f"formats {', '.join(missing)} (it runs {', '.join(sorted(self.backend.quant_formats))})")
        self.max_model_len = min(config.max_model_len or cfg.context_length, cfg.context_length)
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        # the runner only needs positions up to the context this engine serves
        self.model_config = replace(cfg, context_length=self.max_model_len)
        self.runner = self.backend.create_model_runner(self.model_config, weights, config.cache)
        if release_pages is not None:  # the backend holds what it needs now; the file's pages need not stay resident
            release_pages()
        self.runner.eos_token_ids = set(self.tokenizer.stop_token_ids)
        self.block_manager = BlockManager(self.runner.num_kv_blocks, config.cache.block_size,
                                          config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(replace(config.scheduler, max_model_len=self.max_model_len), self.block_manager)
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self.load_seconds = time.perf_counter() - t0
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0}

    # --- requests -----------------------------------------------------------------------------
    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, *, want_prompt_logits: bool = False) -> str:
        from ember.detokenizer import IncrementalDetokenizer

        params = params or SamplingParams()
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        vocab = self.tokenizer.vocab_size
        if not ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        n = len(ids)
        room = self.max_model_len - n
        if room < 1:
            raise ValueError(f"the prompt has {n} tokens but the context length is {self.max_model_len}: "
                             f"no room to generate")
        if params.max_tokens is None:
            params = replace(params, max_tokens=room)
        elif params.max_tokens > room:
            raise ValueError(f"max_tokens={params.max_tokens} does not fit: the prompt has {n} tokens and "
                             f"the context length is {self.max_model_len} ({room} left)")
        if n + params.max_tokens > self.kv_capacity_tokens:
            raise ValueError(f"the prompt ({n} tokens) plus max_tokens ({params.max_tokens}) exceeds the KV cache "
                             f"({self.kv_capacity_tokens} tokens); raise --kv-cache-memory")
        # Last of the checks, so a bad schema is reported before anything is queued, and the
        # grammar is compiled only for a request that will otherwise run.
        matchers = self._matchers(params) if params.structured is not None else [None] * params.n
        seqs, states = [], []
        for i in range(params.n):
            seq = Sequence(request_id, list(ids), params, index=i, want_prompt_logits=want_prompt_logits and i == 0,
                           matcher=matchers[i])
            seqs.append(seq)
            states.append(_SampleState(IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens),
                                       logprobs=[] if params.logprobs is not None else None,
                                       top_logprobs=[] if params.logprobs else None))
        req = _Request(request_id, text, list(ids), params, seqs, states, RequestMetrics(time.time()),
                       want_prompt_logits, max((len(s) for s in params.stop), default=0))
        for seq in seqs:
            self.scheduler.add(seq)
        self.requests[request_id] = req
        return request_id

    def _matchers(self, params: SamplingParams) -> list:
        """One grammar matcher per sample; ValueError (llguidance's message) for a bad spec."""
        from ember.sampling_params import StructuredOutput
        from ember.structured import compiler_for

        if not isinstance(params.structured, StructuredOutput):
            raise ValueError(f"structured must be a StructuredOutput, got {type(params.structured).__name__}")
        if not getattr(self.runner, "supports_structured_output", False):
            raise ValueError(f"the {self.backend_info.name!r} backend does not support structured output")
        compiler = compiler_for(self.tokenizer)
        return [compiler.matcher(params.structured) for _ in range(params.n)]

    def abort_request(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = FinishReason.ABORT
                self._release(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def _release(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self.runner.release(seq)
        seq.matcher = None

    # --- the loop -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched:
            return []
        now = time.time()
        for s in sched.scheduled:
            req = self.requests[s.seq.request_id]
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
                req.num_cached_tokens = s.seq.num_cached_tokens
        results = self.runner.execute(sched)
        self.scheduler.update(sched)
        self.stats["steps"] += 1
        self.stats["prompt_tokens"] += sum(
            max(0, min(s.end, s.seq.num_prompt_tokens) - s.start) for s in sched.scheduled)
        touched: dict[str, _Request] = {}
        now = time.time()
        for s in sched.scheduled:
            r = results.get(s.seq.seq_id)
            if r is None:
                continue
            req = self.requests[s.seq.request_id]
            self._append_token(req, s.seq, r, now)
            touched[req.request_id] = req
        self.stats["generation_tokens"] += len(results)
        return [self._output(req) for req in touched.values()]

    def _append_token(self, req: _Request, seq: Sequence, r, now: float) -> None:
        tok = r.token_id
        seq.output_token_ids.append(tok)
        st = req.states[seq.index]
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        req.metrics.last_token_time = now
        if st.logprobs is not None:
            st.logprobs.append(r.logprob)
        if st.top_logprobs is not None:
            st.top_logprobs.append(r.top_logprobs)
        p = seq.params
        n_out = len(seq.output_token_ids)
        prev_len = len(st.text)
        st.text += st.detok.step(tok)
        reason, stop, grammar_error = None, None, None
        if tok in self.runner.eos_token_ids and not p.ignore_eos:
            reason = FinishReason.STOP
        elif tok in p.stop_token_ids:
            reason, stop = FinishReason.STOP, tok
        elif p.stop and n_out > p.min_tokens and (hit := self._find_stop(st.text, prev_len, p.stop)):
            pos, s = hit
            st.text = st.text[: pos + len(s) if p.include_stop_str_in_output else pos]
            reason, stop = FinishReason.STOP, s
        elif seq.matcher is not None and self._grammar_ends(seq, tok):
            # A complete output ends the request even at max_tokens (so "stop", not "length") and
            # before min_tokens: nothing but EOS could follow it.
            reason, grammar_error = FinishReason.STOP, seq.matcher.error
        elif n_out >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            if stop is None:  # a stop string cut the text already; otherwise take what's held back
                st.text += st.detok.flush()
            if grammar_error is not None:
                log.warning("request %s: structured output failed (%s); finishing it", req.request_id,
                            grammar_error)
                stop = STRUCTURED_OUTPUT_ERROR
            seq.finish_reason, seq.stop_reason = reason, stop
            self._release(seq)

    @staticmethod
    def _grammar_ends(seq: Sequence, tok: int) -> bool:
        """Advance the sequence's grammar by its new token (exactly once per appended token, never
        on recompute); True when the output is complete or the matcher has failed."""
        m = seq.matcher
        return not m.advance(tok) or m.is_finished()

    @staticmethod
    def _find_stop(text: str, prev_len: int, stops: list[str]):
        best = None
        for s in stops:
            # only a match that ends in the new text is new
            i = text.find(s, max(0, prev_len - len(s) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def _output(self, req: _Request) -> RequestOutput:
        outs = []
        for seq, st in zip(req.seqs, req.states):
            done = seq.is_finished
            # hold back text that may turn out to be the start of a stop string
            visible = len(st.text) if done else max(st.emitted, len(st.text) - max(0, req.max_stop_len - 1))
            delta_text = st.text[st.emitted:visible]
            st.emitted = visible
            delta_ids = seq.output_token_ids[st.emitted_tokens:]
            st.emitted_tokens = len(seq.output_token_ids)
            outs.append(CompletionOutput(
                index=seq.index, text=st.text[:visible], token_ids=list(seq.output_token_ids),
                finish_reason=seq.finish_reason.value if seq.finish_reason else None,
                stop_reason=seq.stop_reason, logprobs=st.logprobs, top_logprobs=st.top_logprobs,
                delta_text=delta_text, delta_token_ids=delta_ids))
        finished = all(s.is_finished for s in req.seqs)
        if finished:
            req.metrics.finished_time = time.time()
            self.requests.pop(req.request_id, None)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, finished,
                             num_cached_tokens=req.num_cached_tokens,
                             metrics=req.metrics, prompt_logits=req.seqs[0].prompt_logits if finished else None)

    # --- introspection ------------------------------------------------------------------------
    def kv_usage(self) -> float:
        return self.block_manager.usage

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)
