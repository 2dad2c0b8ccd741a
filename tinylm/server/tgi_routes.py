"""Text Generation Inference routes: /generate, /generate_stream, /info.

Parameters, validation messages, `details` and the stream events follow TGI's router (router/src/lib.rs and
validation.rs): sampling is on when do_sample is set or any of temperature/top_k/top_p departs from its neutral
value; temperature, top_k, repetition_penalty must be strictly positive; top_p in (0, 1); up to 4 stop sequences.
"""

from __future__ import annotations

import json
import random

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

import tinylm
from tinylm.server.errors import APIError, stream_error
from tinylm.server.generation import (Completion, check_context, check_prompt_bytes, lora_id, merged_stream, off_loop,
                                      record_usage, run_all, validate_all)
from tinylm.server.openai_format import token_strings
from tinylm.server.protocol import TGIParameters, TGIRequest
from tinylm.sampling_params import SamplingParams

router = APIRouter()
MAX_STOP_SEQUENCES = 4
MAX_TOP_N_TOKENS = 5
DEFAULT_MAX_NEW_TOKENS = 100


def _fail(message: str) -> None:
    raise APIError(400, message)  # sent as 422 {"error", "error_type": "validation"} on these routes


def to_sampling_params(p: TGIParameters) -> SamplingParams:
    checks = [
        (p.temperature is not None and p.temperature <= 0, "`temperature` must be strictly positive"),
        (p.repetition_penalty is not None and p.repetition_penalty <= 0, "`repetition_penalty` must be strictly positive"),
        (p.frequency_penalty is not None and not -2 <= p.frequency_penalty <= 2,
         "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        (p.top_p is not None and not 0 < p.top_p < 1, "`top_p` must be > 0.0 and < 1.0"),
        (p.typical_p is not None and p.typical_p != 1.0, "`typical_p` is not supported by this server"),
        (p.top_k is not None and p.top_k <= 0, "`top_k` must be strictly positive"),
        (p.max_new_tokens is not None and p.max_new_tokens <= 0, "`max_new_tokens` must be strictly positive"),
        (len(p.stop) > MAX_STOP_SEQUENCES,
         f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. Given: {len(p.stop)}"),
        (p.best_of is not None and p.best_of > 1, "`best_of` is not supported by this server"),
        (p.watermark, "`watermark` is not supported by this server"),
        (p.top_n_tokens is not None and not 0 <= p.top_n_tokens <= MAX_TOP_N_TOKENS,
         f"`top_n_tokens` must be >= 0 and <= {MAX_TOP_N_TOKENS}"),
        (p.truncate is not None and p.truncate <= 0, "`truncate` must be strictly positive"),
    ]
    for failed, message in checks:
        if failed:
            _fail(message)
    sampling = p.do_sample or (p.temperature not in (None, 1.0)) or bool(p.top_k) or (p.top_p not in (None, 1.0))
    seed = p.seed if p.seed is not None or not sampling else random.randrange(2**63)
    return SamplingParams(
        max_tokens=p.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=(p.temperature or 1.0) if sampling else 0.0, top_k=p.top_k or -1, top_p=p.top_p or 1.0,
        repetition_penalty=p.repetition_penalty or 1.0, frequency_penalty=p.frequency_penalty or 0.0,
        stop=p.stop, seed=seed, logprobs=(p.top_n_tokens or 0) if (p.details or p.top_n_tokens) else None,
        structured_outputs=p.grammar.constraint() if p.grammar else None)


async def _prepare(request: Request, body: TGIRequest) -> tuple:
    state = request.app.state.tinylm
    params = to_sampling_params(body.parameters)
    if not body.inputs:
        _fail("`inputs` cannot be empty")
    check_prompt_bytes(state, len(body.inputs.encode()))
    prompt = await off_loop(state, state.llm.encode, body.inputs)
    if body.parameters.truncate:
        prompt = prompt[-body.parameters.truncate:]
    check_context(state.llm.config.max_position_embeddings, prompt, params.max_tokens,
                  explicit=body.parameters.max_new_tokens is not None)
    await validate_all(state, [prompt], params)
    return state, params, prompt, _adapter(state, body.parameters.adapter_id)


def _adapter(state, adapter_id: str | None) -> int:
    """TGI's adapter_id: a LoRA adapter the server loaded (--lora-modules), by name; None is the base model."""
    selected = lora_id(state, adapter_id)
    if selected is None:
        loaded = ", ".join(state.engine.engine.loras.ids) or "none"
        _fail(f"adapter `{adapter_id}` is not loaded; loaded: {loaded}")
    return selected


@router.post("/generate")
async def generate(body: TGIRequest, request: Request):
    if body.stream:
        return await generate_stream(body, request)
    state, params, prompt, lora_id = await _prepare(request, body)
    prompt_logprobs = 0 if body.parameters.decoder_input_details else None
    result = (await run_all(state, request, [prompt], params, 1, prompt_logprobs, lora_id=lora_id))[0]
    record_usage(request, [prompt], [result], 1)
    text = (body.inputs if body.parameters.return_full_text else "") + result.text
    response = {"generated_text": text}
    if body.parameters.details:
        response["details"] = _details(state, body.parameters, params, prompt, result)
    return response


@router.post("/generate_stream")
async def generate_stream(body: TGIRequest, request: Request):
    state, params, prompt, lora_id = await _prepare(request, body)

    async def events():
        count = 0
        try:
            async for event in _stream_events(state, body, params, prompt, lora_id):
                count += 1
                yield f"data:{json.dumps(event, ensure_ascii=False)}\n\n"
        except Exception as exc:  # noqa: BLE001  (the time limit, the server stopping: TGI's final error event)
            yield f"data:{json.dumps(stream_error(request.url.path, exc), ensure_ascii=False)}\n\n"
        finally:
            request.state.usage = (len(prompt), count)

    return StreamingResponse(events(), media_type="text/event-stream")


async def _stream_events(state, body: TGIRequest, params: SamplingParams, prompt: list[int], lora_id: int = 0):
    text, count = "", 0
    async for _, output in merged_stream(state, [prompt], params, 1, lora_id=lora_id):
        text += output.text
        count += 1
        event = {"index": count - 1, "token": _token(state, output.token_id, output.logprob, output.text),
                 "top_tokens": _top_tokens(state, output.logprob) if body.parameters.top_n_tokens else None,
                 "generated_text": None, "details": None}
        if output.finish_reason is not None:
            event["generated_text"] = (body.inputs if body.parameters.return_full_text else "") + text
            if body.parameters.details:
                event["details"] = {"finish_reason": _finish_reason(state, params, output.token_id,
                                                                    output.finish_reason),
                                    "generated_tokens": count, "seed": params.seed, "input_length": len(prompt)}
        yield event


@router.get("/info")
async def info(request: Request) -> dict:
    state = request.app.state.tinylm
    engine = state.engine.engine
    context = state.llm.config.max_position_embeddings
    return {
        "model_id": state.config.model_name, "model_sha": None,
        "model_dtype": str(state.llm.dtype).removeprefix("torch."), "model_device_type": state.llm.device.type,
        "model_pipeline_tag": "text-generation", "max_concurrent_requests": engine.config.max_num_seqs,
        "max_best_of": 1, "max_stop_sequences": MAX_STOP_SEQUENCES, "max_input_tokens": context - 1,
        "max_total_tokens": context, "validation_workers": 1, "max_client_batch_size": 1,
        "router": "tinylm", "version": tinylm.__version__, "sha": None, "docker_label": None,
    }


def _details(state, p: TGIParameters, params: SamplingParams, prompt: list[int], result: Completion) -> dict:
    last = result.token_ids[-1] if result.token_ids else None
    details = {
        "finish_reason": _finish_reason(state, params, last, result.finish_reason),
        "generated_tokens": len(result.token_ids), "seed": params.seed, "prefill": [],
        "tokens": [_token(state, t, lp) for t, lp in zip(result.token_ids, result.logprobs)],
    }
    if p.decoder_input_details:
        entries = result.prompt_logprobs or [None] * len(prompt)
        details["prefill"] = [{"id": t, "text": s, "logprob": None if e is None else e.logprob}
                              for t, s, e in zip(prompt, token_strings(state, prompt), entries)]
    if p.top_n_tokens:
        details["top_tokens"] = [_top_tokens(state, lp) for lp in result.logprobs]
    return details


def _finish_reason(state, params: SamplingParams, last_token: int | None, reason: str | None) -> str:
    if reason == "length":
        return "length"
    stop_ids = set(params.stop_token_ids) | state.llm.eos_token_ids
    return "eos_token" if last_token in stop_ids else "stop_sequence"


def _token(state, token_id: int, logprob, text: str | None = None) -> dict:
    special = state.llm.tokenizer is not None and token_id in state.llm.tokenizer.special_ids
    return {"id": token_id, "text": token_strings(state, [token_id])[0] if text is None else text,
            "logprob": None if logprob is None else logprob.logprob, "special": special}


def _top_tokens(state, logprob) -> list[dict]:
    if logprob is None:
        return []
    texts = token_strings(state, [t for t, _ in logprob.top])
    return [{"id": t, "text": s, "logprob": lp, "special": t in state.llm.tokenizer.special_ids}
            for (t, lp), s in zip(logprob.top, texts)]
