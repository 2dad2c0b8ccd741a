"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models, and vLLM's /tokenize, /detokenize.

Response shapes follow the OpenAI API reference; the extensions (top_k, min_p, repetition_penalty, ignore_eos,
stop_token_ids, echo with max_tokens=0) follow vLLM's OpenAI server.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from tinylm.server.chat_replies import ChatPlan, ReplyStream, called_finish_reason, plan_chat, reply_message
from tinylm.server.errors import APIError, stream_error
from tinylm.server.generation import (check_context, check_prompt_bytes, lora_id, merged_stream, off_loop,
                                      record_usage, run_all, validate_all)
from tinylm.server.openai_format import (chat_chunk, chat_logprobs, completion_logprobs, stream_completion_chunk,
                                         token_strings, usage)
from tinylm.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, StrictRequest

router = APIRouter()


def _state(request: Request):
    return request.app.state.tinylm


def _check_model(state, model: str | None) -> int:
    """The request's model: the served model (0) or one of its LoRA adapters (the adapter's id); else 404."""
    selected = lora_id(state, model)
    if selected is not None:
        return selected
    names = ", ".join(f"`{n}`" for n in [state.config.model_name, *state.engine.engine.loras.ids])
    raise APIError(404, f"The model `{model}` does not exist; this server serves {names}.", "NotFoundError", "model")


def _prompt_ids(state, prompt) -> list[list[int]]:
    """A completion prompt (text, texts, token ids, lists of token ids) -> token id lists (runs off the loop)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise ValueError("prompt must not be empty")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [state.llm.encode(p) if isinstance(p, str) else list(p) for p in prompt]


def _prompt_bytes(prompt) -> int:
    texts = [prompt] if isinstance(prompt, str) else [p for p in prompt if isinstance(p, str)]
    return sum(len(t.encode()) for t in texts)


@router.get("/v1/models")
async def models(request: Request) -> dict:
    state = _state(request)
    created, base = int(time.time()), state.config.model_name
    card = {"id": base, "object": "model", "created": created, "owned_by": "tinylm", "root": base, "parent": None,
            "max_model_len": state.llm.config.max_position_embeddings}
    adapters = [{**card, "id": name, "root": path, "parent": base}
                for name, path in state.engine.engine.loras.paths.items()]  # vLLM lists LoRA adapters so
    return {"object": "list", "data": [card, *adapters]}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state = _state(request)
    lora_id = _check_model(state, body.model)
    params = body.to_params(state.sampling_defaults)
    check_prompt_bytes(state, _prompt_bytes(body.prompt))
    prompts = await off_loop(state, _prompt_ids, state, body.prompt)
    for prompt in prompts:
        check_context(state.llm.config.max_position_embeddings, prompt, params.max_tokens)
    await validate_all(state, prompts, params, body.n)
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": body.model or state.config.model_name}
    if body.stream:
        stream = merged_stream(state, prompts, params, body.n, prompt_logprobs, lora_id=lora_id)
        return _sse(request, functools.partial(_completion_events, state, body, prompts, stream, meta))
    results = await run_all(state, request, prompts, params, body.n, prompt_logprobs, lora_id=lora_id)
    record_usage(request, prompts, results, body.n)
    scoring_only = body.max_tokens == 0
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


async def _completion_events(state, body: CompletionRequest, prompts, stream, meta, usage_out: list):
    counts = [0] * (len(prompts) * body.n)
    prompt_tokens = sum(len(p) for p in prompts) * body.n
    async for choice, output in stream:
        prefix = ""
        if body.echo and counts[choice] == 0:
            prefix = _prompt_text(state, body.prompt, prompts[choice // body.n], choice // body.n)
        counts[choice] += output.token_id is not None
        usage_out[:] = [prompt_tokens, sum(counts)]
        yield stream_completion_chunk(state, meta, choice, output, prefix, body.logprobs)
    if body.stream_options and body.stream_options.include_usage:
        yield {**meta, "object": "text_completion", "choices": [],
               "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": sum(counts),
                         "total_tokens": prompt_tokens + sum(counts)}}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = _state(request)
    lora_id = _check_model(state, body.model)
    _check_messages(state, body.messages)
    template_kwargs = _template_kwargs(state, body)
    plan = plan_chat(state.llm.tokenizer, body, template_kwargs["chat_template"])
    prompt = await off_loop(state, _chat_prompt, state, body, template_kwargs, plan)
    context = state.llm.config.max_position_embeddings
    explicit = body.max_tokens is not None or body.max_completion_tokens is not None
    params = body.to_params(max(1, context - len(prompt)), state.sampling_defaults)
    if plan.constraint is not None:  # a forced tool call: its grammar
        params = dataclasses.replace(params, structured_outputs=plan.constraint)
    check_context(context, prompt, params.max_tokens, explicit)
    await validate_all(state, [prompt], params, body.n)
    gate = _constraint_gate(state, plan, params)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": body.model or state.config.model_name}
    if body.stream:
        stream = merged_stream(state, [prompt], params, body.n, constraint_gate=gate, lora_id=lora_id)
        return _sse(request, functools.partial(_chat_events, state, body, plan, prompt, stream, meta))
    results = await run_all(state, request, [prompt], params, body.n, constraint_gate=gate, lora_id=lora_id)
    record_usage(request, [prompt], results, body.n)
    choices = []
    for i, result in enumerate(results):
        message, finish_reason = reply_message(plan, result.text, result.finish_reason)
        choices.append({"index": i, "message": message, "finish_reason": finish_reason,
                        "logprobs": chat_logprobs(state, result.logprobs) if body.logprobs else None})
    return {**meta, "object": "chat.completion", "choices": choices, "usage": usage([prompt], results, body.n)}


def _constraint_gate(state, plan: ChatPlan, params) -> int | None:
    """A reasoning model's constraint holds from its end-of-thinking token on (None: from the first token)."""
    if plan.reasoning is None or params.structured_outputs is None or plan.opening == "closed":
        return None
    return state.llm.tokenizer.token_to_id(plan.reasoning.end)


def _check_messages(state, messages: list[ChatMessage]) -> None:
    """Message count and text size, refused before anything renders or tokenizes them."""
    if len(messages) > state.config.max_messages:
        raise APIError(400, f"{len(messages)} messages; this server accepts at most "
                       f"{state.config.max_messages} per request", param="messages")
    check_prompt_bytes(state, sum(m.text_bytes() for m in messages))


def _template_kwargs(state, body: ChatCompletionRequest) -> dict:
    """The template arguments of a request: `chat_template` and the request's own variables, kept apart so that no
    variable can stand in for an argument. A template source sent by the request is untrusted code: refused
    unless the server was started with --trust-request-chat-template (a name of one of the model's templates is
    fine)."""
    variables = dict(body.chat_template_kwargs or {})
    source = variables.pop("chat_template", None) or body.chat_template
    if source is not None:
        known = state.llm.tokenizer is not None and state.llm.tokenizer.has_template(source)
        if not known and not state.config.trust_request_chat_template:
            raise APIError(400, "request-supplied chat templates are refused by this server (start it with "
                           "--trust-request-chat-template to allow them)", param="chat_template")
    return {"chat_template": source, "chat_template_kwargs": variables}


def _chat_prompt(state, body: ChatCompletionRequest, template_kwargs: dict, plan: ChatPlan) -> list[int]:
    """Render and tokenize the conversation (runs off the loop; the template has a time and size budget). Message
    text never becomes control tokens, and only allow-listed template variables may be set by a request. Tools
    reach the template as transformers passes them (or are described in the system message, for a template without
    tools: tinylm/tool_calls.py); a reasoning model's rendered prompt says where its reply starts (plan.opening)."""
    tokenizer = state.llm.tokenizer
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so it cannot chat")
    source = tokenizer.template_source(template_kwargs["chat_template"], plan.template_tools)
    messages = plan.messages([m.plain() for m in body.messages], source)
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=body.add_generation_prompt and not body.continue_final_message,
        continue_final_message=body.continue_final_message, tokenize=True, trusted_kwargs=False,
        tools=plan.template_tools, **template_kwargs)
    if plan.reasoning is not None:
        plan.opening = plan.reasoning.opening(tokenizer.decode(ids[-32:], skip_special_tokens=False))
    return ids


async def _chat_events(state, body: ChatCompletionRequest, plan: ChatPlan, prompt, stream, meta, usage_out: list):
    replies: dict[int, ReplyStream] = {}
    generated = 0
    prompt_tokens = len(prompt) * body.n
    async for choice, output in stream:
        if choice not in replies:
            replies[choice] = ReplyStream(plan)
            yield chat_chunk(meta, choice, {"role": "assistant", "content": ""}, None, None)
        generated += output.token_id is not None
        usage_out[:] = [prompt_tokens, generated]
        logprobs = chat_logprobs(state, [output.logprob]) if body.logprobs and output.logprob else None
        finished = output.finish_reason is not None
        deltas = replies[choice].push(output.text, finished)
        if not deltas and not finished and logprobs is None:
            continue  # text held back (a marker or a call in progress): nothing to send yet
        for delta in deltas[:-1]:
            yield chat_chunk(meta, choice, delta, None, None)
        finish_reason = called_finish_reason(output.finish_reason, replies[choice].called)
        yield chat_chunk(meta, choice, deltas[-1] if deltas else {}, logprobs, finish_reason)
    if body.stream_options and body.stream_options.include_usage:
        yield {**meta, "object": "chat.completion.chunk", "choices": [],
               "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                         "total_tokens": prompt_tokens + generated}}


def _sse(request: Request, make_events) -> StreamingResponse:
    """An OpenAI event stream. A request that ends in an error after the stream started (its time limit, the
    server stopping, an internal error) gets a final `data: {"error": ...}` event, as vLLM sends, then [DONE]."""
    usage_out: list = []
    events = make_events(usage_out)  # the generator writes [prompt tokens, completion tokens] there

    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except Exception as exc:  # noqa: BLE001  (any failure: the client gets it as the last event)
            yield f"data: {json.dumps(stream_error(request.url.path, exc), ensure_ascii=False)}\n\n"
        finally:
            request.state.usage = tuple(usage_out) or None
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


class TokenizeRequest(StrictRequest):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(StrictRequest):
    model: str | None = None
    tokens: list[int]


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    state = _state(request)
    _check_model(state, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise ValueError("give exactly one of prompt or messages")
    ids = await off_loop(state, _tokenize, state, body)
    return {"tokens": ids, "count": len(ids), "max_model_len": state.llm.config.max_position_embeddings,
            "token_strs": token_strings(state, ids)}


def _tokenize(state, body: TokenizeRequest) -> list[int]:
    tokenizer = _tokenizer(state)
    if body.messages is not None:
        _check_messages(state, body.messages)
        return tokenizer.apply_chat_template([m.plain() for m in body.messages], tokenize=True,
                                             add_generation_prompt=body.add_generation_prompt, trusted_kwargs=False)
    check_prompt_bytes(state, len(body.prompt.encode()))
    return tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    state = _state(request)
    _check_model(state, body.model)
    vocab = state.llm.config.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
    text = await off_loop(state, _tokenizer(state).decode, body.tokens, skip_special_tokens=False)
    return {"prompt": text}


def _tokenizer(state):
    if state.llm.tokenizer is None:
        raise ValueError("this model has no tokenizer")
    return state.llm.tokenizer
