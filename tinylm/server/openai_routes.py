"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models, and vLLM's /tokenize, /detokenize.

Response shapes follow the OpenAI API reference; the extensions (top_k, min_p, repetition_penalty, ignore_eos,
stop_token_ids, echo with max_tokens=0) follow vLLM's OpenAI server.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from tinylm.server.app import APIError
from tinylm.server.generation import check_context, merged_stream, run_all, validate_all
from tinylm.server.openai_format import (chat_chunk, chat_logprobs, completion_logprobs, stream_completion_chunk,
                                         token_strings, usage)
from tinylm.server.protocol import ChatCompletionRequest, CompletionRequest

router = APIRouter()


def _state(request: Request):
    return request.app.state.tinylm


def _check_model(state, model: str | None) -> None:
    if model is not None and model != state.config.model_name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{state.config.model_name}`.",
                       "NotFoundError", "model")


def _prompt_ids(state, prompt) -> list[list[int]]:
    """A completion prompt (text, texts, token ids, lists of token ids) -> token id lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise ValueError("prompt must not be empty")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [state.llm.encode(p) if isinstance(p, str) else list(p) for p in prompt]


@router.get("/v1/models")
async def models(request: Request) -> dict:
    state = _state(request)
    card = {"id": state.config.model_name, "object": "model", "created": int(time.time()), "owned_by": "tinylm",
            "max_model_len": state.llm.config.max_position_embeddings}
    return {"object": "list", "data": [card]}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state = _state(request)
    _check_model(state, body.model)
    params = body.to_params()
    prompts = _prompt_ids(state, body.prompt)
    for prompt in prompts:
        check_context(state.llm.config.max_position_embeddings, prompt, params.max_tokens)
    validate_all(state, prompts, params, body.n)
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.config.model_name}
    if body.stream:
        stream = merged_stream(state, prompts, params, body.n, prompt_logprobs)
        return _sse(_completion_events(state, body, prompts, stream, meta))
    results = await run_all(state, request, prompts, params, body.n, prompt_logprobs)
    scoring_only = body.echo and body.max_tokens == 0
    choices = []
    for index, result in enumerate(results):
        prompt = prompts[index // body.n]
        if scoring_only:  # the one generated token is not part of the answer
            result.token_ids, result.logprobs, result.text, result.finish_reason = [], [], "", "length"
        text = (_prompt_text(state, body.prompt, prompt, index // body.n) if body.echo else "") + result.text
        logprobs = None if body.logprobs is None else completion_logprobs(
            state, prompt if body.echo else [], result, echo=body.echo)
        choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": result.finish_reason})
    return {**meta, "object": "text_completion", "choices": choices, "usage": usage(prompts, results, body.n)}


def _prompt_text(state, raw_prompt, prompt_ids: list[int], index: int) -> str:
    if isinstance(raw_prompt, str):
        return raw_prompt
    if isinstance(raw_prompt, list) and raw_prompt and isinstance(raw_prompt[index], str):
        return raw_prompt[index]
    return state.llm.tokenizer.decode(prompt_ids, skip_special_tokens=False) if state.llm.tokenizer else ""


async def _completion_events(state, body: CompletionRequest, prompts, stream, meta):
    counts = [0] * (len(prompts) * body.n)
    async for choice, output in stream:
        prefix = ""
        if body.echo and counts[choice] == 0:
            prefix = _prompt_text(state, body.prompt, prompts[choice // body.n], choice // body.n)
        counts[choice] += output.token_id is not None
        yield stream_completion_chunk(state, meta, choice, output, prefix, body.logprobs)
    if body.stream_options and body.stream_options.include_usage:
        prompt_tokens = sum(len(p) for p in prompts) * body.n
        yield {**meta, "object": "text_completion", "choices": [],
               "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": sum(counts),
                         "total_tokens": prompt_tokens + sum(counts)}}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = _state(request)
    _check_model(state, body.model)
    prompt = _chat_prompt(state, body)
    context = state.llm.config.max_position_embeddings
    explicit = body.max_tokens is not None or body.max_completion_tokens is not None
    params = body.to_params(default_max_tokens=max(1, context - len(prompt)))
    check_context(context, prompt, params.max_tokens, explicit)
    validate_all(state, [prompt], params, body.n)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.config.model_name}
    if body.stream:
        return _sse(_chat_events(state, body, prompt, merged_stream(state, [prompt], params, body.n), meta))
    results = await run_all(state, request, [prompt], params, body.n)
    choices = [{"index": i, "message": {"role": "assistant", "content": r.text},
                "logprobs": chat_logprobs(state, r.logprobs) if body.logprobs else None,
                "finish_reason": r.finish_reason} for i, r in enumerate(results)]
    return {**meta, "object": "chat.completion", "choices": choices, "usage": usage([prompt], results, body.n)}


def _chat_prompt(state, body: ChatCompletionRequest) -> list[int]:
    if state.llm.tokenizer is None:
        raise ValueError("this model has no tokenizer, so it cannot chat")
    messages = [m.plain() for m in body.messages]
    return state.llm.tokenizer.apply_chat_template(
        messages, add_generation_prompt=body.add_generation_prompt and not body.continue_final_message,
        continue_final_message=body.continue_final_message, tokenize=True, **(body.chat_template_kwargs or {}))


async def _chat_events(state, body: ChatCompletionRequest, prompt, stream, meta):
    started: set[int] = set()
    generated = 0
    async for choice, output in stream:
        if choice not in started:
            started.add(choice)
            yield chat_chunk(meta, choice, {"role": "assistant", "content": ""}, None, None)
        generated += output.token_id is not None
        logprobs = chat_logprobs(state, [output.logprob]) if body.logprobs and output.logprob else None
        delta = {"content": output.text} if output.text or output.finish_reason is None else {}
        yield chat_chunk(meta, choice, delta, logprobs, output.finish_reason)
    if body.stream_options and body.stream_options.include_usage:
        prompt_tokens = len(prompt) * body.n
        yield {**meta, "object": "chat.completion.chunk", "choices": [],
               "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                         "total_tokens": prompt_tokens + generated}}


def _sse(events) -> StreamingResponse:
    async def body():
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


class TokenizeRequest(BaseModel):
    prompt: str | None = None
    messages: list[dict] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    tokens: list[int]


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    state = _state(request)
    tokenizer = _tokenizer(state)
    if (body.prompt is None) == (body.messages is None):
        raise ValueError("give exactly one of prompt or messages")
    if body.messages is not None:
        ids = tokenizer.apply_chat_template(body.messages, add_generation_prompt=body.add_generation_prompt,
                                            tokenize=True)
    else:
        ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": state.llm.config.max_position_embeddings,
            "token_strs": token_strings(state, ids)}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    state = _state(request)
    vocab = state.llm.config.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
    return {"prompt": _tokenizer(state).decode(body.tokens, skip_special_tokens=False)}


def _tokenizer(state):
    if state.llm.tokenizer is None:
        raise ValueError("this model has no tokenizer")
    return state.llm.tokenizer
