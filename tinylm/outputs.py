"""What LLM.generate, chat and stream return, shaped like vLLM's: a RequestOutput per prompt holding its n
CompletionOutputs (text, token ids, vLLM's per-token {token id: Logprob} dicts), and a StepEvent per streamed token.

Plain records with no engine logic, kept apart from the LLM class that fills them (tinylm/llm.py, which also
re-exports them, so `from tinylm.llm import RequestOutput` still works).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tinylm.engine.sequence import TokenLogprob


@dataclass
class StepEvent:
    """One generated token of one prompt, with the text it completes (may be empty while UTF-8 is partial)."""

    index: int  # which prompt of the call
    token_id: int
    text: str
    logprob: TokenLogprob | None
    finish_reason: str | None  # None while running; "stop" (EOS / stop string / stop token) or "length"
    choice: int = 0  # which of the prompt's n completions (SamplingParams.n)
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop token id that ended it
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with a choice's first token, when asked for


@dataclass
class Logprob:
    """vLLM's Logprob: a token's log-probability, its rank in the distribution (1: most likely), its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One of a prompt's n completions, as vLLM's CompletionOutput."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None  # None unless logprobs were asked for (as vLLM)
    logprobs: list[dict[int, Logprob]] | None = None  # per token: {token id: Logprob}, the chosen one and top-N
    finish_reason: str | None = None  # "stop" or "length"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (None: EOS, length)
    token_logprobs: list[TokenLogprob] | None = None  # tinylm's form of `logprobs`

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """One prompt's result, as vLLM's RequestOutput; the properties below are tinylm's shorter forms, those of
    the first completion (README: res[0].text, res[0].logprobs[0].top)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # [None, {id: Logprob} per later prompt token]
    outputs: list[CompletionOutput] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(o.finished() for o in self.outputs)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        """tinylm's form: one TokenLogprob (token_id, logprob, top) per token; vLLM's is outputs[i].logprobs."""
        return self.outputs[0].token_logprobs

    @property
    def cumulative_logprob(self) -> float | None:
        return self.outputs[0].cumulative_logprob
