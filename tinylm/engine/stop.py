"""Turn a request's token stream into text deltas, detecting stop tokens and stop strings.

Stop strings can span several tokens, so text that might be the start of a stop string is held back until it
either completes one (and is cut, as OpenAI and vLLM do) or can no longer match (and is released).

min_tokens (vLLM's): the first min_tokens tokens cannot end the request. The engine masks EOS and stop token ids
for them; here a stop string counts only if it ends after their text, as vLLM's detokenizer checks stop strings
only once more than min_tokens tokens are out.
"""

from __future__ import annotations

from tinylm.sampling_params import SamplingParams


class StopChecker:
    def __init__(self, tokenizer, params: SamplingParams, stop_token_ids: set[int]) -> None:
        self.decoder = _NoText()
        if tokenizer is not None:  # token-id prompts to a model without a tokenizer produce ids only
            from tinylm.detokenize import IncrementalDecoder

            self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=params.skip_special_tokens)
        self.stop_strings = params.stop
        self.include_stop = params.include_stop_str_in_output
        self.stop_token_ids = stop_token_ids
        self.user_stop_token_ids = set(params.stop_token_ids)
        self.min_tokens = params.min_tokens
        self.text = ""  # everything decoded so far, emitted or held back
        self.emitted = 0  # length of the prefix of `text` already returned
        self.pushed = 0  # tokens seen so far
        self.floor = 0  # a stop string must end past this index of `text`: after the first min_tokens tokens' text
        self.stop_reason: str | int | None = None  # vLLM's: the stop string or stop token id that ended the output

    def push(self, token_id: int) -> tuple[str, str | None]:
        """Return (new text to emit, finish reason or None)."""
        self.pushed += 1
        can_stop = self.pushed > self.min_tokens
        if can_stop and token_id in self.stop_token_ids:
            self.stop_reason = token_id if token_id in self.user_stop_token_ids else None  # EOS: None, as vLLM
            return self.finish(), "stop"
        self.text += self.decoder.push(token_id)
        if not can_stop:
            self.floor = len(self.text)
        cut = self._find_stop()
        if cut is not None:
            self.text = self.text[:cut]
            return self._release(cut), "stop"
        return self._release(len(self.text) - self._held_back()), None

    def finish(self) -> str:
        """At the end (length limit): everything still held back."""
        self.text += self.decoder.flush()
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        chunk = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return chunk

    def _find_stop(self) -> int | None:
        """Index where the output must end if a stop string has appeared, else None."""
        if not self.stop_strings:
            return None
        longest = max(len(s) for s in self.stop_strings)
        start = max(0, self.emitted - longest)
        best = None
        for stop in self.stop_strings:
            pos = self.text.find(stop, start)
            while 0 <= pos and pos + len(stop) <= self.floor:  # inside the min_tokens text: does not count
                pos = self.text.find(stop, pos + 1)
            if pos >= 0:
                end = pos + len(stop) if self.include_stop else pos
                if best is None or end < best:
                    best, self.stop_reason = end, stop
        return best

    def _held_back(self) -> int:
        """Length of the longest suffix of the unreleased text that is a proper prefix of a stop string."""
        pending = self.text[self.emitted:]
        for size in range(min(len(pending), max((len(s) for s in self.stop_strings), default=1) - 1), 0, -1):
            if any(s.startswith(pending[-size:]) for s in self.stop_strings):
                return size
        return 0


class _NoText:
    def push(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""
