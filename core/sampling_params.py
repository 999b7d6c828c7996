"""What a request asks of the sampler, validated up front so a bad value fails before it queues."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StructuredOutput:
    """A constraint on the output's shape, enforced by masking tokens in the sampler.

    Exactly one field is set: ``json_object`` (any JSON object), ``json_schema`` (a JSON Schema,
    as a dict or a JSON string), ``regex``, or ``grammar`` (Lark syntax, as llguidance reads it).
    """

    json_object: bool = False
    json_schema: dict | str | None = None
    regex: str | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        chosen = [self.json_object, self.json_schema is not None, self.regex is not None, self.grammar is not None]
        if sum(chosen) != 1:
            raise ValueError("structured output takes exactly one of json_object, json_schema, regex, grammar")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # number of top logprobs per sampled token (0: only the chosen)
    skip_special_tokens: bool = True
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(msg)

        if not 1 <= self.n <= 128:
            bad(f"n must be in [1, 128], got {self.n}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            bad(f"seed must be a 64-bit signed integer, got {self.seed}")
        if not self.temperature >= 0.0:
            bad(f"temperature must be non-negative, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            bad(f"top_k must be -1 (off), 0 (off) or positive, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not 1e-3 <= self.repetition_penalty <= 1e3:
            bad(f"repetition_penalty must be in [0.001, 1000], got {self.repetition_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            bad(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad(f"logprobs must be in [0, 20], got {self.logprobs}")
        if any(not s for s in self.stop):
            bad("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1
