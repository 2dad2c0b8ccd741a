"""Turn a request's token stream into text deltas, detecting stop tokens and stop strings.

Stop strings can span several tokens, so text that might be the start of a stop string is held back until it
either completes one (and is cut, as OpenAI and vLLM do) or can no longer match (and is released).
"""

from __future__ import annotations

from tinylm.sampling_params import SamplingParams


class StopChecker:
    def __init__(self, tokenizer, params: SamplingParams, stop_token_ids: set[int]) -> None:
        self.decoder = _NoText()
        if tokenizer is not None:  # token-id prompts to a model without a tokenizer produce ids only
            from tinylm.tokenizer import IncrementalDecoder

            self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=params.skip_special_tokens)
        self.stop_strings = params.stop
        self.include_stop = params.include_stop_str_in_output
        self.stop_token_ids = stop_token_ids
        self.text = ""  # everything decoded so far, emitted or held back
        self.emitted = 0  # length of the prefix of `text` already returned

    def push(self, token_id: int) -> tuple[str, str | None]:
        """Return (new text to emit, finish reason or None)."""
        if token_id in self.stop_token_ids:
            return self.finish(), "stop"
        self.text += self.decoder.push(token_id)
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
            if pos >= 0:
                end = pos + len(stop) if self.include_stop else pos
                best = end if best is None else min(best, end)
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
