"""The plain generation loop: several prompts at once, left-padded, one preallocated KV cache.

Each step yields what every request produced, so callers can stream text as it comes or collect whole outputs.
(The continuous-batching engine for serving is separate; this loop is the reference it is checked against.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from tinylm.engine import sampler
from tinylm.engine.sequence import TokenLogprob
from tinylm.engine.stop import StopChecker
from tinylm.errors import ContextLengthError
from tinylm.model.cache import make_cache
from tinylm.sampling_params import SamplingParams


@dataclass
class StepEvent:
    """One generated token of one request, with the text it completes (may be empty while UTF-8 is partial)."""

    index: int
    token_id: int
    text: str
    logprob: TokenLogprob | None
    finish_reason: str | None  # None while running; "stop" (EOS / stop string / stop token) or "length"


@dataclass
class _Request:
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    stop: StopChecker
    generator: torch.Generator | None
    max_new: int
    generated: int = 0


def generate_steps(model, tokenizer, prompts: list[list[int]], params: list[SamplingParams],
                   eos_ids: set[int]) -> Iterator[list[StepEvent]]:
    """Run every prompt to completion; yield the events of each decoding step."""
    device = model.lm_head.weight.device
    requests = [_new_request(i, ids, p, tokenizer, model.config.max_position_embeddings, device, eos_ids)
                for i, (ids, p) in enumerate(zip(prompts, params))]
    input_ids, mask = _left_pad(prompts, tokenizer, device)
    longest = max(len(p) for p in prompts)
    cache = make_cache(model.config, len(prompts), longest + max(r.max_new for r in requests),
                       model.lm_head.weight.dtype, device)
    vocab = model.config.vocab_size
    prompt_mask = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=device)
    for row, ids in enumerate(prompts):
        prompt_mask[row, torch.tensor(ids, device=device)] = True
    counts = torch.zeros(len(prompts), vocab, dtype=torch.int32, device=device)
    with torch.inference_mode():
        logits = model(input_ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1].float()
        while requests:
            tokens, events = _sample_step(logits, requests, prompt_mask, counts)
            yield events
            keep = [row for row, event in enumerate(events) if event.finish_reason is None]
            if not keep:
                return
            if len(keep) < len(requests):
                rows = torch.tensor(keep, device=device)
                cache.reorder(rows)
                requests = [requests[r] for r in keep]
                mask, tokens, prompt_mask, counts = mask[rows], tokens[rows], prompt_mask[rows], counts[rows]
            mask = torch.cat([mask, mask.new_ones(len(requests), 1)], dim=1)
            logits = model(tokens[:, None], attention_mask=mask, cache=cache).logits[:, -1].float()


def _new_request(index: int, prompt_ids: list[int], params: SamplingParams, tokenizer, context: int,
                 device, eos_ids: set[int]) -> _Request:
    if not prompt_ids:
        raise ValueError(f"prompt {index} is empty")
    if len(prompt_ids) >= context:
        raise ContextLengthError(
            f"prompt {index} has {len(prompt_ids)} tokens; the model's context is {context} tokens "
            "(at least one must be left to generate)"
        )
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
    stop = StopChecker(tokenizer, params, stop_ids)
    return _Request(index, prompt_ids, params, stop, sampler.make_generator(params.seed, device),
                    max_new=min(params.max_tokens, context - len(prompt_ids)))


def _left_pad(prompts: list[list[int]], tokenizer, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) token ids padded on the left and the (B, L) attention mask (1 = real token)."""
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def _sample_step(logits, requests, prompt_mask, counts) -> tuple[torch.Tensor, list[StepEvent]]:
    params = [r.params for r in requests]
    raw = logits
    if any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params):
        logits = sampler.apply_penalties(logits, params, prompt_mask, counts)
    tokens = sampler.sample(logits, params, [r.generator for r in requests])
    counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=counts.dtype))
    logprob_rows = _logprobs(raw, tokens, params)
    token_list = tokens.tolist()
    events = []
    for row, request in enumerate(requests):
        request.generated += 1
        text, reason = request.stop.push(token_list[row])
        if reason is None and request.generated >= request.max_new:
            text, reason = text + request.stop.finish(), "length"
        events.append(StepEvent(request.index, token_list[row], text, logprob_rows[row], reason))
    return tokens, events


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]) -> list[TokenLogprob | None]:
    wanted = [p.logprobs for p in params]
    if all(w is None for w in wanted):
        return [None] * len(params)
    k = max(w or 0 for w in wanted)
    chosen, values, ids = sampler.top_logprobs(logits, tokens, k)
    chosen, values, ids = chosen.tolist(), values.tolist(), ids.tolist()
    return [
        None if w is None else TokenLogprob(int(t), chosen[row], list(zip(ids[row][:w], values[row][:w])))
        for row, (w, t) in enumerate(zip(wanted, tokens.tolist()))
    ]
