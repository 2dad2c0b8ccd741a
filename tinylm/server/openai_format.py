"""OpenAI response pieces: legacy completion logprobs, chat logprobs, stream chunks, usage."""

from __future__ import annotations

from tinylm.engine.sequence import StepOutput, TokenLogprob


def token_strings(state, ids: list[int]) -> list[str]:
    """Each token's own text (special tokens included), as the logprobs fields name tokens."""
    tokenizer = state.llm.tokenizer
    if tokenizer is None:
        return [f"<{i}>" for i in ids]
    return [tokenizer.decode([i], skip_special_tokens=False) for i in ids]


def completion_logprobs(state, prompt_ids: list[int], result, echo: bool) -> dict:
    """The legacy /v1/completions `logprobs` object; with echo, the prompt's tokens come first (the first has no
    logprob), as lm-evaluation-harness expects for log-likelihood requests."""
    entries: list[TokenLogprob | None] = []
    ids: list[int] = []
    if echo:
        entries += result.prompt_logprobs or [None] * len(prompt_ids)
        ids += prompt_ids
    entries += result.logprobs
    ids += result.token_ids
    strings = token_strings(state, ids)
    offsets, position = [], 0
    for text in strings:
        offsets.append(position)
        position += len(text)
    return {
        "tokens": strings,
        "token_logprobs": [None if e is None else e.logprob for e in entries],
        "top_logprobs": [None if e is None else _top_dict(state, e) for e in entries],
        "text_offset": offsets,
    }


def _top_dict(state, entry: TokenLogprob) -> dict[str, float]:
    """{token text: logprob} of the top alternatives plus the chosen token (OpenAI always lists the chosen one)."""
    pairs = entry.top + [(entry.token_id, entry.logprob)]
    strings = token_strings(state, [token for token, _ in pairs])
    top: dict[str, float] = {}
    for text, (_, logprob) in zip(strings, pairs):
        top.setdefault(text, logprob)
    return top


def chat_logprobs(state, entries: list[TokenLogprob | None]) -> dict:
    content = []
    for entry in entries:
        if entry is None:
            continue
        text = token_strings(state, [entry.token_id])[0]
        alternatives = token_strings(state, [token for token, _ in entry.top])
        content.append({
            "token": text, "logprob": entry.logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": alt, "logprob": lp, "bytes": list(alt.encode())}
                             for alt, (_, lp) in zip(alternatives, entry.top)],
        })
    return {"content": content}


def stream_completion_chunk(state, meta: dict, choice: int, output: StepOutput, prefix: str,
                            logprobs: int | None) -> dict:
    lp = None
    if logprobs is not None and output.logprob is not None:
        lp = completion_logprobs(state, [], _One(output), echo=False)
    return {**meta, "object": "text_completion",
            "choices": [{"index": choice, "text": prefix + output.text, "logprobs": lp,
                         "finish_reason": output.finish_reason}]}


def chat_chunk(meta: dict, choice: int, delta: dict, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {**meta, "object": "chat.completion.chunk",
            "choices": [{"index": choice, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def usage(prompts: list[list[int]], results, n: int) -> dict:
    prompt_tokens = sum(len(p) for p in prompts) * n
    completion_tokens = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _One:
    """A one-token result, for the logprobs of one streamed token."""

    def __init__(self, output: StepOutput) -> None:
        self.token_ids = [output.token_id]
        self.logprobs = [output.logprob]
        self.prompt_logprobs = None
