"""How the engine's step outputs become what LLM.generate returns: vLLM's RequestOutputs (tinylm/outputs.py), filled
token by token, with vLLM's per-token logprob dictionaries.

Kept apart from the LLM class (tinylm/llm.py), which only runs the requests and hands each step's events here.
"""

from __future__ import annotations

from dataclasses import replace

from tinylm.engine.sequence import StepOutput, TokenLogprob
from tinylm.outputs import CompletionOutput, Logprob, RequestOutput, StepEvent
from tinylm.sampling_params import SamplingParams


class OutputCollector:
    """Fills RequestOutputs from StepEvents. Holds the tokenizer and a cache of each token id's text (vLLM's
    Logprob.decoded_token, asked for top-N tokens at every step)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._token_texts: dict[int, str] = {}

    def new_output(self, request_id: str, text: str | None, ids: list[int], params: SamplingParams) -> RequestOutput:
        """An empty RequestOutput for one prompt: its n completions, with logprob lists when asked for."""
        wants_logprobs = params.logprobs is not None
        completions = [CompletionOutput(i, logprobs=[] if wants_logprobs else None,
                                        token_logprobs=[] if wants_logprobs else None,
                                        cumulative_logprob=0.0 if wants_logprobs else None)
                       for i in range(params.n)]
        return RequestOutput(request_id, text, ids, outputs=completions)

    def collect(self, output: RequestOutput, event: StepEvent, params: SamplingParams) -> None:
        """Add one event (a token of one completion, or a choice's prompt logprobs) to its RequestOutput."""
        completion = output.outputs[event.choice]
        if event.prompt_logprobs is not None and event.choice == 0:
            output.prompt_logprobs = [None if e is None else self._logprob_dict(e) for e in event.prompt_logprobs]
        if event.token_id is None:
            return
        completion.token_ids.append(event.token_id)
        completion.text += event.text
        completion.finish_reason = event.finish_reason
        completion.stop_reason = event.stop_reason
        if params.logprobs is not None and event.logprob is not None:
            completion.token_logprobs.append(event.logprob)
            completion.logprobs.append(self._logprob_dict(event.logprob))
            completion.cumulative_logprob += event.logprob.logprob

    def _logprob_dict(self, entry: TokenLogprob) -> dict[int, Logprob]:
        """vLLM's per-token form: the chosen token first (its rank in the distribution), then the top-N (ranks
        1..N); a chosen token among the top-N appears once."""
        logprobs = {entry.token_id: Logprob(entry.logprob, entry.rank, self._token_text(entry.token_id))}
        for rank, (token, value) in enumerate(entry.top, start=1):
            logprobs.setdefault(token, Logprob(value, rank, self._token_text(token)))
        return logprobs

    def _token_text(self, token: int) -> str | None:
        if self.tokenizer is None:
            return None
        if token not in self._token_texts:
            self._token_texts[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return self._token_texts[token]


def choice_params(params: SamplingParams, choice: int) -> SamplingParams:
    """Choice i of n: seed + i (SamplingParams.for_choice); prompt logprobs are the same for every choice, so
    only the first computes them."""
    params = params.for_choice(choice)
    return params if choice == 0 or params.prompt_logprobs is None else replace(params, prompt_logprobs=None)


def step_event(index: int, choice: int, output: StepOutput) -> StepEvent:
    """The engine's output for one request as the event of prompt `index`, completion `choice`."""
    return StepEvent(index, output.token_id, output.text, output.logprob, output.finish_reason, choice,
                     output.stop_reason, output.prompt_logprobs)
