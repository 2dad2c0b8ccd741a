"""Sampling as small pure functions over a batch of logits (B, V), one SamplingParams per row.

Row-wise parameters become (B, 1) tensors so one batch mixes greedy and sampled requests without Python loops
over the vocabulary. Random draws use one torch.Generator per seeded row, so a seeded request is reproducible
whatever else shares its batch.
"""

from __future__ import annotations

import torch

from tinylm.engine.sequence import TokenLogprob
from tinylm.sampling_params import SamplingParams


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], prompt_mask: torch.Tensor,
                    output_counts: torch.Tensor) -> torch.Tensor:
    """vLLM semantics. prompt_mask (B, V) bool: token seen in the prompt; output_counts (B, V): times generated.

    repetition: logits of tokens seen anywhere are divided by p when positive, multiplied when negative;
    presence: minus p once per generated token; frequency: minus p times its count.
    """
    rep = _column(params, "repetition_penalty", logits)
    presence = _column(params, "presence_penalty", logits)
    frequency = _column(params, "frequency_penalty", logits)
    seen = prompt_mask | (output_counts > 0)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    counts = output_counts.to(logits.dtype)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits (B, V) plus each row's logit_bias {token id: value} (OpenAI / vLLM: added before sampling)."""
    rows, ids, values = [], [], []
    for row, p in enumerate(params):
        for token, bias in (p.logit_bias or {}).items():
            rows.append(row), ids.append(token), values.append(bias)
    if not rows:
        return logits
    bias = torch.zeros_like(logits)
    bias[torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device)] = \
        torch.tensor(values, dtype=logits.dtype, device=logits.device)
    return logits + bias


def mask_tokens(logits: torch.Tensor, banned: list[set[int]]) -> torch.Tensor:
    """logits (B, V) with -inf at each row's banned token ids (min_tokens: EOS and stop ids, not yet allowed)."""
    rows = [row for row, ids in enumerate(banned) for _ in ids]
    if not rows:
        return logits
    ids = [token for tokens in banned for token in tokens]
    device = logits.device
    return logits.index_put((torch.tensor(rows, device=device), torch.tensor(ids, device=device)),
                            torch.tensor(float("-inf"), dtype=logits.dtype, device=device))


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks (-inf outside). Greedy rows keep temperature 1.

    In float32 and shifted so that each row's maximum is 0 before the division: softmax is unchanged, and a small
    temperature (down to SamplingParams' 1e-5) cannot overflow the scaled logits to inf (inf - inf is NaN)."""
    logits = logits.float()
    logits = logits - logits.amax(dim=-1, keepdim=True)
    temperature = _column(params, "temperature", logits)
    logits = logits / torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    top_k = torch.tensor([p.top_k if p.top_k > 0 else logits.shape[-1] for p in params], device=logits.device)
    top_p = _column(params, "top_p", logits)
    min_p = _column(params, "min_p", logits)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None]
    remove = ranks >= top_k[:, None]
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    # top-p keeps the smallest prefix whose mass reaches p: drop a token once the mass before it is >= p.
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= mass_before >= top_p
    remove |= probs < min_p * probs[:, :1]
    remove[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def argmax(logits: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """logits (B, V) -> (B,) index of each row's first maximum, as `logits.argmax(-1)`. For several rows, through
    the blocks' maxima: PyTorch's CPU argmax is not vectorized (16 x 49152 float32: 219 us; `amax` 19 us; this 45)."""
    rows, vocab = logits.shape
    if vocab < 2 * block:
        return logits.argmax(dim=-1)
    whole = vocab // block * block
    blocks = logits[:, :whole].reshape(rows, -1, block)  # (B, n, block)
    best = blocks.amax(dim=-1).argmax(dim=-1)  # (B,) the first block holding the row's maximum
    token = best * block + blocks[torch.arange(rows, device=logits.device), best].argmax(dim=-1)
    if whole < vocab:  # the last, partial block wins only with a strictly larger value (first maximum wins ties)
        tail = logits[:, whole:].max(dim=-1)
        larger = tail.values > logits.gather(1, token[:, None])[:, 0]
        token = torch.where(larger, whole + tail.indices, token)
    return token


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """Pick one token per row (B,): argmax for greedy rows, a draw from softmax(filtered logits) otherwise."""
    greedy = argmax(logits)
    if all(p.greedy for p in params):
        return greedy
    drawn = draw(probabilities(logits, params), generators)
    is_greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    return torch.where(is_greedy, greedy, drawn)


def probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """(B, V) the distribution each row samples from: softmax of the filtered logits."""
    return filter_logits(logits, params).softmax(dim=-1)


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One draw per row (B,) from probs (B, V). Exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p;
    one generator per seeded row."""
    noise = torch.stack([_exponential(probs.shape[-1], g, probs) for g in generators])
    return (probs / noise).argmax(dim=-1)


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw model log-probabilities (before penalties and temperature, as vLLM reports them).

    Returns chosen_logprob (B,), top_values (B, k), top_ids (B, k).
    """
    return _ranked_logprobs(logits, chosen, k)[:3]


def _ranked_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """top_logprobs' three tensors and the chosen token's rank (B,): 1 + how many tokens are more likely (ties
    ranked last, as vLLM counts them)."""
    logprobs = logits.float().log_softmax(dim=-1)
    values, ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], chosen[:, None][:, :0])
    chosen_logprob = logprobs.gather(-1, chosen[:, None])
    ranks = (logprobs >= chosen_logprob).sum(dim=-1)
    return chosen_logprob.squeeze(-1), values, ids, ranks


def logprob_entries(logits: torch.Tensor, chosen: torch.Tensor, wanted: list[int | None]) -> list[TokenLogprob | None]:
    """One TokenLogprob per row (None where that row asked for none): the chosen token's logprob and the top-N.

    logits (B, V) raw; chosen (B,); wanted[b] = N for row b, or None.
    """
    if all(w is None for w in wanted):
        return [None] * len(wanted)
    k = max(w or 0 for w in wanted)
    values, top, ids, ranks = (t.tolist() for t in _ranked_logprobs(logits, chosen, k))
    return [
        None if w is None else TokenLogprob(token, values[row], list(zip(ids[row][:w], top[row][:w])), ranks[row])
        for row, (w, token) in enumerate(zip(wanted, chosen.tolist()))
    ]


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator for a seeded request. Any integer is reduced modulo 2**64 into the range manual_seed takes
    (it raises "Overflow when unpacking long long" beyond), deterministically; SamplingParams refuses seeds
    outside [-2**63, 2**64 - 1] before they get here."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % 2 ** 64)
    return generator


def _exponential(size: int, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    noise = torch.empty(size, dtype=like.dtype, device=like.device)
    return noise.exponential_(generator=generator).clamp_min_(1e-20)


def _column(params: list[SamplingParams], name: str, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([float(getattr(p, name)) for p in params], dtype=like.dtype, device=like.device)[:, None]
