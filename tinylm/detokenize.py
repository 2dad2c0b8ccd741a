"""IncrementalDecoder: streamed token ids to new, complete text (the engine's stop strings, the server's streams)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tinylm.tokenizer import Tokenizer


class IncrementalDecoder:
    """Streaming detokenizer: push token ids one at a time, get back only new, complete text.

    The prefix-offset technique of TGI and vLLM (`detokenize_incrementally`): decode a short window that starts a
    few tokens back, and emit what the newest tokens add to it. Decoding a window rather than single tokens keeps
    SentencePiece's "▁" spaces and the decoder's start-of-text stripping right, and costs O(1) per token. Text that
    ends in U+FFFD is an incomplete UTF-8 character (byte-fallback or byte-level tokens) and is held back. Special
    tokens that decode() would skip never enter the window: they add no text, and a run of them (padding, repeated
    EOS) would otherwise widen it without bound.
    """

    _CONTEXT = 5  # prompt tokens decoded before the first new one, as vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._skipped = tokenizer.special_ids if skip_special_tokens else frozenset()
        # The window: window[:_read] is text already emitted (decoded again for context), window[_read:] is not yet
        self._ids = [i for i in map(int, prompt_ids) if i not in self._skipped][-self._CONTEXT:]
        self._read = len(self._ids)
        self._chunks: list[str] = []

    def push(self, token_id: int) -> str:
        if int(token_id) in self._skipped:
            return ""
        self._ids.append(int(token_id))
        added = self._added_text()
        if not added or added.endswith("\ufffd"):
            return ""  # nothing new yet, or a character still missing some of its bytes
        return self._emit(added)

    def flush(self) -> str:
        """Whatever is still held back (a character that never completed) at the end of the stream."""
        added = self._added_text()
        return self._emit(added) if added else ""

    def _added_text(self) -> str:
        """What the tokens not yet emitted add to the window's text ("" when they add nothing)."""
        emitted = self._decode(self._ids[:self._read])
        whole = self._decode(self._ids)
        return whole[len(emitted):] if len(whole) > len(emitted) else ""

    def _emit(self, text: str) -> str:
        # The emitted tokens become the next window's context; older tokens are dropped so memory stays bounded
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        self._chunks.append(text)
        return text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.backend.decode(ids, skip_special_tokens=self.skip_special_tokens)

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._chunks)
