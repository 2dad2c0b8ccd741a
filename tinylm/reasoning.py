"""Reasoning models (Qwen3's `<think> ... </think>`): a reply split into its reasoning and its answer, whole or as it
streams, as vLLM's reasoning parsers give them (`reasoning_content` and `content`).

A model reasons when its chat template writes the end marker (Qwen3, QwQ, DeepSeek-R1 distills). Where the reply
starts depends on the rendered prompt:
- "open": the prompt ends inside a reasoning block (DeepSeek-R1's template writes `<think>\\n`): the reply is
  reasoning up to the end marker;
- "closed": the prompt already closed it (Qwen3 with enable_thinking=False renders an empty block): all answer;
- "model": the model decides (Qwen3): a reply that starts with `<think>` reasons up to `</think>`, any other is
  all answer.
A block cut short by max_tokens is all reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningFormat:
    start: str = START
    end: str = END

    def opening(self, prompt_text: str) -> str:
        """"open", "closed" or "model": where a reply to this rendered prompt starts (module docstring)."""
        tail = prompt_text.rstrip()
        if tail.endswith(self.start):
            return "open"
        return "closed" if tail.endswith(self.end) else "model"

    def split(self, text: str, opening: str = "model") -> tuple[str | None, str]:
        """(reasoning or None, answer) of a whole reply."""
        stream = ReasoningStream(self, opening)
        reasoning, answer = stream.push(text)
        more_reasoning, more_answer = stream.finish()
        reasoning, answer = reasoning + more_reasoning, answer + more_answer
        return (reasoning.strip() or None), answer


def reasoning_format(template_source: str | None) -> ReasoningFormat | None:
    """The reasoning markers a chat template uses, or None for a model that does not reason."""
    if template_source and END in template_source:
        return ReasoningFormat()
    return None


class ReasoningStream:
    """Splits streamed text deltas into (reasoning delta, answer delta). Text that may still turn out to be a marker
    is held back until a later delta (or finish) decides it."""

    def __init__(self, fmt: ReasoningFormat, opening: str = "model") -> None:
        self.fmt = fmt
        self.state = {"open": "reasoning", "closed": "answer", "model": "undecided"}[opening]
        self.pending = ""
        self.after_end = False  # the newlines after the end marker are dropped, in whichever delta they come

    def push(self, delta: str) -> tuple[str, str]:
        self.pending += delta
        if self.state == "undecided":
            self._decide()
        if self.state == "reasoning":
            return self._reasoning()
        if self.state == "answer":
            text, self.pending = self.pending, ""
            if self.after_end:
                text = text.lstrip("\n")
                self.after_end = not text
            return "", text
        return "", ""

    def finish(self) -> tuple[str, str]:
        """Whatever is still held back, at the end of the reply."""
        text, self.pending = self.pending, ""
        return (text, "") if self.state == "reasoning" else ("", text)

    def _decide(self) -> None:
        """The model's first characters: the start marker (reasoning), a prefix of it (wait), or anything else."""
        stripped = self.pending.lstrip()
        if stripped.startswith(self.fmt.start):
            self.pending, self.state = stripped[len(self.fmt.start):].lstrip("\n"), "reasoning"
        elif not self.fmt.start.startswith(stripped):
            self.state = "answer"

    def _reasoning(self) -> tuple[str, str]:
        reasoning, found, answer = self.pending.partition(self.fmt.end)
        if found:
            self.state, self.pending = "answer", ""
            answer = answer.lstrip("\n")
            self.after_end = not answer
            return reasoning, answer
        keep = partial_suffix(self.pending, self.fmt.end)
        cut = len(self.pending) - keep
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text, ""


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`: text to hold back in case the
    next delta completes the marker."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
