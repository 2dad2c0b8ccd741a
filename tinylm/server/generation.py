"""What both HTTP dialects do with a request: check it against the context, tokenize it off the event loop, run
it to the end or stream it, and cancel it when the client goes away, its time limit passes or the server stops.

A request's outputs arrive on one asyncio.Queue per request. Its end, by any cause, is an item on that queue too:
a timer puts `RequestTimeout` there when the request's wall-clock limit passes, and a server that is shutting
down puts `ServerStopping` on every live queue shortly before its grace period ends, so a stream closes with a
final error event instead of a cut connection, and a waiting response gets an error body.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import anyio
from fastapi import Request

from tinylm.engine.sequence import StepOutput, TokenLogprob
from tinylm.errors import ContextLengthError
from tinylm.sampling_params import SamplingParams
from tinylm.server.errors import APIError

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


def check_prompt_bytes(state, size: int) -> None:
    """Refuse text no context could hold before spending CPU on tokenizing it."""
    if size > state.max_prompt_bytes:
        raise APIError(400, f"the prompt text is {size} bytes; this server accepts at most {state.max_prompt_bytes} "
                       "bytes per request (--max-prompt-bytes)", param="prompt")


def record_usage(request: Request, prompts: list[list[int]], results, n: int) -> None:
    """Token counts for the access log line (tinylm/server/middleware.py)."""
    request.state.usage = (sum(len(p) for p in prompts) * n, sum(len(r.token_ids) for r in results))


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """The params of choice `index` of n: a seeded request gives each choice its own seed (seed + index)."""
    return params.for_choice(index)


class RequestTimeout(APIError):
    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the request ran past the server's limit of {seconds:g} s (--request-timeout)",
                         "timeout_error")


class ServerStopping(APIError):
    def __init__(self) -> None:
        super().__init__(503, "the server is shutting down; the request was stopped", "server_shutdown")


async def off_loop(state, function: Callable, *args, **kwargs):
    """Run CPU work (tokenizing, rendering a chat template) in a worker thread, so the event loop keeps answering
    /health and streaming tokens; at most `state.cpu_limiter` such jobs run at once."""
    return await anyio.to_thread.run_sync(functools.partial(function, *args, **kwargs), limiter=state.cpu_limiter)


async def run_all(state, request: Request, prompts: list[list[int]], params: SamplingParams, n: int,
                  prompt_logprobs: int | None = None, constraint_gate: int | None = None,
                  lora_id: int = 0) -> list[Completion]:
    """Run n choices for each prompt concurrently; cancel them all if the client disconnects."""
    completions = [Completion() for _ in range(len(prompts) * n)]

    async def collect() -> None:
        async for choice, output in merged_stream(state, prompts, params, n, prompt_logprobs, constraint_gate,
                                                  lora_id):
            completions[choice].add(output)

    task = asyncio.ensure_future(collect())
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request, [task]))
    try:
        await task
        return completions
    finally:
        watcher.cancel()
        task.cancel()


async def merged_stream(state, prompts: list[list[int]], params: SamplingParams, n: int,
                        prompt_logprobs: int | None = None, constraint_gate: int | None = None, lora_id: int = 0
                        ) -> AsyncIterator[tuple[int, StepOutput]]:
    """Outputs of every choice as they come, tagged with the choice index (prompt-major, as OpenAI numbers them).
    Closing this iterator (a client that left) cancels every choice; the request's time limit or the server's
    shutdown raises RequestTimeout / ServerStopping here."""
    queue: asyncio.Queue = asyncio.Queue()
    limit = state.config.request_timeout
    timer = asyncio.get_running_loop().call_later(limit, queue.put_nowait, (None, RequestTimeout(limit)))
    state.live_queues.add(queue)
    engine, request_ids = state.engine, []
    try:
        # every choice's outputs straight into this queue, tagged with its index: no task or queue per choice
        for k, prompt in enumerate(prompts):
            for i in range(n):
                request_ids.append(engine.open(prompt, choice_params(params, i), queue, k * n + i,
                                               prompt_logprobs=prompt_logprobs, constraint_gate=constraint_gate,
                                               lora_id=lora_id))
        remaining = len(request_ids)
        while remaining:
            choice, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            remaining -= item.finish_reason is not None
            yield choice, item
    finally:
        timer.cancel()
        state.live_queues.discard(queue)
        for request_id in request_ids:
            engine.close(request_id)


def stop_live_requests(state) -> int:
    """Shutdown: end every running request with ServerStopping (called on the event loop). Returns how many."""
    for queue in list(state.live_queues):
        queue.put_nowait((None, ServerStopping()))
    return len(state.live_queues)


async def validate_all(state, prompts: list[list[int]], params: SamplingParams, n: int = 1) -> None:
    """Refuse bad input, or a request the queue has no room for (n choices of each prompt), before a response (or
    a stream) starts. A schema or grammar is compiled off the event loop (a large one takes a while; the engine
    then finds it in its cache)."""
    if params.structured_outputs is not None:
        await off_loop(state, state.engine.engine.grammars.compile, params.structured_outputs)
    state.engine.validate(prompts, params, copies=n)


async def _cancel_on_disconnect(request: Request, tasks: list[asyncio.Future]) -> None:
    while not all(task.done() for task in tasks):
        if await request.is_disconnected():
            for task in tasks:
                task.cancel()
            return
        await asyncio.sleep(_DISCONNECT_POLL_SECONDS)


def lora_id(state, name: str | None) -> int | None:
    """The engine id a request's model name selects: 0 for the served model (or no name), a loaded LoRA adapter's
    id, or None when neither (each dialect answers that in its own way)."""
    if name is None or name == state.config.model_name:
        return 0
    return state.engine.engine.loras.ids.get(name)
