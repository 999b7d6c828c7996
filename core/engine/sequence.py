"""A sequence being generated: its tokens, its place in the KV cache, and its progress."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

from ember.sampling_params import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    index: int = 0  # which of the request's n samples
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of those, how many came from the prefix cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hash chain of the full blocks so far
    finish_reason: FinishReason | None = None
    stop_reason: Any = None  # the stop string or token id that ended it
    generator: Any = None  # per-request RNG, owned by the runner's sampler
    want_prompt_logits: bool = False
    prompt_logits: Any = None
    num_preemptions: int = 0
    # Structured output: the grammar matcher (ember.structured.StructuredMatcher), advanced by the
    # engine once per appended token and only then, so recomputing after preemption leaves it be.
    matcher: Any = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def token_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]
