"""Prometheus metrics for the engine, on a registry of their own (one per server)."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)


class EngineMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]

        def g(name, doc):
            return Gauge(f"ember:{name}", doc, labels, registry=r).labels(model_name)

        def c(name, doc):
            return Counter(f"ember:{name}", doc, labels, registry=r).labels(model_name)

        def h(name, doc, buckets=LATENCY_BUCKETS):
            return Histogram(f"ember:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.running = g("num_requests_running", "Requests in the running batch")
        self.waiting = g("num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_usage = g("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)")
        self.prefix_queries = c("prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_hits = c("prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.preemptions = c("num_preemptions", "Sequences preempted for lack of KV blocks")
        self.prompt_tokens = c("prompt_tokens", "Prompt tokens computed")
        self.generation_tokens = c("generation_tokens", "Tokens generated")
        self.requests_finished = c("request_success", "Requests finished")
        self.requests_aborted = c("request_aborted", "Requests aborted (client gone, or shutdown)")
        self.batch_size = h("step_running_requests", "Sequences computed together in one engine step",
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.step_time = h("engine_step_seconds", "Wall time of one engine step (schedule, forward, sample)",
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0))
        self.ttft = h("time_to_first_token_seconds", "Time from arrival to the first token")
        self.itl = h("inter_token_latency_seconds", "Time between two tokens of a request")
        self.e2e = h("e2e_request_latency_seconds", "Time from arrival to the last token")
        self._seen = {"q": 0, "h": 0, "p": 0, "pt": 0, "gt": 0}
        self._last_token: dict[str, float] = {}

    def _delta(self, key: str, value: int, counter) -> None:
        if value > self._seen[key]:
            counter.inc(value - self._seen[key])
        self._seen[key] = value

    def gauges(self, engine) -> None:
        """Refresh the gauges; also called when the engine goes idle (after aborts, say)."""
        self.running.set(len(engine.scheduler.running))
        self.waiting.set(len(engine.scheduler.waiting))
        self.kv_usage.set(engine.block_manager.usage)

    def step(self, engine, outs, seconds: float) -> None:
        """Called by the engine thread after every step."""
        bm, sched = engine.block_manager, engine.scheduler
        self.gauges(engine)
        self._delta("q", bm.prefix_queries, self.prefix_queries)
        self._delta("h", bm.prefix_hits, self.prefix_hits)
        self._delta("p", sched.num_preemptions, self.preemptions)
        self._delta("pt", engine.stats["prompt_tokens"], self.prompt_tokens)
        self._delta("gt", engine.stats["generation_tokens"], self.generation_tokens)
        self.batch_size.observe(len(sched.running))
        self.step_time.observe(seconds)
        now = time.time()
        for out in outs:
            m = out.metrics
            rid = out.request_id
            if rid not in self._last_token and m.first_token_time is not None:
                self.ttft.observe(m.first_token_time - m.arrival_time)
            elif rid in self._last_token:
                self.itl.observe(now - self._last_token[rid])
            self._last_token[rid] = now
            if out.finished:
                self._last_token.pop(rid, None)
                self.e2e.observe(now - m.arrival_time)
                self.requests_finished.inc()

    def aborted(self, request_id: str) -> None:
        self._last_token.pop(request_id, None)
        self.requests_aborted.inc()
