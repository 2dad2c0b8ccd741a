"""A request inside the serving engine: its tokens, how many of them are in the KV cache, its blocks, its output.

The engine treats prefill and decode alike (as vLLM v1 does): every step computes the tokens a sequence has that
are not yet in the cache, `len(all_token_ids) - num_computed`. That is the whole prompt (or a chunk of it) at
first, one token per step afterwards, and everything again after a preemption (recompute).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from tinylm.engine.stop import StopChecker
from tinylm.engine.structured import Constraint
from tinylm.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), most likely first
    rank: int | None = None  # the token's rank in the model's distribution (1: the most likely), as vLLM's


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stop: StopChecker
    generator: torch.Generator | None = None
    max_new: int = 16  # max_tokens clamped to what the context leaves
    prompt_logprobs: int | None = None  # echo/scoring: logprobs of every prompt token (top-N alternatives)
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    block_ids: list[int] = field(default_factory=list)
    state_slot: int | None = None  # hybrid models: the row of the recurrent-state pool this sequence owns
    finish_reason: str | None = None
    num_preemptions: int = 0
    first_token_time: float | None = None
    prompt_logprob_values: list[TokenLogprob | None] = field(default_factory=list)  # [None, lp(t1), lp(t2), ...]
    prompt_logprobs_done: bool = False
    constraint: Constraint | None = None  # structured outputs: where the text is in its grammar
    lora_id: int = 0  # the LoRA adapter its rows run with (engine/lora.py); 0: the base model

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs are still owed: the prompt must be computed in full, with every position's logits."""
        return self.prompt_logprobs is not None and not self.prompt_logprobs_done


@dataclass
class StepOutput:
    """What one engine step produced for one request (one new token, or only prompt logprobs, or an abort)."""

    request_id: str
    token_id: int | None
    text: str
    logprob: TokenLogprob | None
    finish_reason: str | None  # None while running; "stop", "length" or "abort"
    num_prompt_tokens: int
    num_output_tokens: int
    prompt_logprobs: list[TokenLogprob | None] | None = None  # sent once, with the first output
    # vLLM's stop_reason: the stop string or stop_token_ids entry that ended the request (None for EOS, length)
    stop_reason: str | int | None = None
