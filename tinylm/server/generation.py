"""What both HTTP dialects do with a request: check it against the context, run it to the end or stream it, and
cancel it when the client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from fastapi import Request

from tinylm.engine.sequence import StepOutput, TokenLogprob
from tinylm.errors import ContextLengthError
from tinylm.sampling_params import SamplingParams

_DISCONNECT_POLL_SECONDS = 0.1


@dataclass
class Completion:
    """One finished choice."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_prompt_tokens: int = 0

    def add(self, output: StepOutput) -> None:
        if output.token_id is not None:
            self.token_ids.append(output.token_id)
            self.logprobs.append(output.logprob)
        self.text += output.text
        self.finish_reason = output.finish_reason
        self.num_prompt_tokens = output.num_prompt_tokens
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs


def check_context(context: int, prompt_ids: list[int], max_tokens: int, explicit: bool = True) -> None:
    """vLLM's rule: prompt + max_tokens must fit the context (when the client asked for max_tokens)."""
    if len(prompt_ids) >= context:
        raise ContextLengthError(f"This model's maximum context length is {context} tokens, but the prompt has "
                                 f"{len(prompt_ids)} tokens. Please reduce the length of the prompt.")
    if explicit and len(prompt_ids) + max_tokens > context:
        raise ContextLengthError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, {max_tokens} for the "
            "completion). Please reduce the length of the prompt or completion.")


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """The params of choice `index` of n: a seeded request gives each choice its own seed (seed + index)."""
    return params if params.seed is None or index == 0 else replace(params, seed=params.seed + index)


async def run_all(state, request: Request, prompts: list[list[int]], params: SamplingParams, n: int,
                  prompt_logprobs: int | None = None) -> list[Completion]:
    """Run n choices for each prompt concurrently; cancel them all if the client disconnects."""
    async def one(prompt: list[int], index: int) -> Completion:
        completion = Completion()
        async for output in state.engine.generate(prompt, choice_params(params, index),
                                                  prompt_logprobs=prompt_logprobs):
            completion.add(output)
        return completion

    tasks = [asyncio.ensure_future(one(p, i)) for p in prompts for i in range(n)]
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request, tasks))
    try:
        return await asyncio.gather(*tasks)
    finally:
        watcher.cancel()
        for task in tasks:
            task.cancel()


async def merged_stream(state, prompts: list[list[int]], params: SamplingParams, n: int,
                        prompt_logprobs: int | None = None) -> AsyncIterator[tuple[int, StepOutput]]:
    """Outputs of every choice as they come, tagged with the choice index (prompt-major, as OpenAI numbers them).
    Closing this iterator (a client that left) cancels every choice."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(prompt: list[int], index: int, choice: int) -> None:
        try:
            async for output in state.engine.generate(prompt, choice_params(params, index),
                                                      prompt_logprobs=prompt_logprobs):
                await queue.put((choice, output))
        except Exception as exc:
            await queue.put((choice, exc))

    tasks = [asyncio.ensure_future(pump(p, i, k * n + i)) for k, p in enumerate(prompts) for i in range(n)]
    remaining = len(tasks)
    try:
        while remaining:
            choice, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            remaining -= item.finish_reason is not None
            yield choice, item
    finally:
        for task in tasks:
            task.cancel()


def validate_all(state, prompts: list[list[int]], params: SamplingParams, n: int = 1) -> None:
    """Refuse bad input, or a request the queue has no room for (n choices of each prompt), before a response (or
    a stream) starts."""
    state.engine.validate(prompts, params, copies=n)


async def _cancel_on_disconnect(request: Request, tasks: list[asyncio.Future]) -> None:
    while not all(task.done() for task in tasks):
        if await request.is_disconnected():
            for task in tasks:
                task.cancel()
            return
        await asyncio.sleep(_DISCONNECT_POLL_SECONDS)
