"""Multiple-choice scoring with each example's shared context run once and logits only where tokens are scored.

A request's model input is lm-eval's `(context + continuation)[-(max_length + 1):][:-1]`; its last k = len(continuation)
positions score the continuation. Split that input as `prefix` (everything up to and including the position that
predicts the first continuation token) + `tail` (continuation[:-1], the k - 1 tokens after it). The choices of one
example have the same prefix (the context), so a batch of examples runs in two passes of the one decoder:

1. the distinct prefixes, left-padded (G, P), through `CausalLM.hidden_states` with a contiguous KV cache
   (tinylm/model/cache.py, the model's own incremental-forward contract); the state at each prefix's last token
   predicts every choice's first token;
2. the cache's rows copied once per distinct tail (`KVCache.reorder`), and the tails, right-padded (R, T), run on
   top of it: each choice reads its context's K/V instead of recomputing it. Choices of one token (MMLU's " A".." D")
   need no second pass at all.

Then lm_head and log-softmax run only on the N hidden states that score tokens (in chunks of rows: the (N, V) float
logits never exist at once), never on the (B, T, V) logits of every position. The numbers are lm-eval's: the sum of
float32 log-softmax at the continuation tokens and whether each is the argmax (is_greedy); the same as one unpadded
`llm.forward` per request, to float rounding (tests/eval/test_shared_context.py).

Why not the serving engine's prefix cache: it matches whole 16-token blocks (the context's last partial block would
be recomputed per choice), turns itself off for requests asking prompt logprobs, runs those one at a time, and samples
a token per request. The model's cache contract gives the same reuse with none of that.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from tinylm.eval.shared_head import HeadCache, shares_heads
from tinylm.model.attention import one_range_per_row
from tinylm.model.cache import make_cache

LOGIT_ROWS = 256  # hidden states per lm_head chunk: (256, V) float32 logits, 50 MB for a 49,152-token vocabulary


@dataclass
class Group:
    """The requests that share one prefix: (pair index, continuation tokens) each."""

    prefix: tuple[int, ...]
    members: list[tuple[int, list[int]]] = field(default_factory=list)


def split_request(tokens: list[int], continuation: list[int], max_length: int) -> tuple[int, ...]:
    """The prefix of a request whose context + continuation is `tokens` (the continuation's tail follows it)."""
    model_input = tokens[-(max_length + 1):][:-1]
    return tuple(model_input[:len(model_input) - (len(continuation) - 1)])


class SharedContextScorer:
    """compile: run the decoder through torch.compile with dynamic shapes (one graph for every batch size and
    length, after a compile of about a minute): a prefill's norms, rotary, casts and SwiGLU products are many
    small elementwise passes that Inductor fuses. Pays on long runs (a whole task), not on a few examples. If it
    fails (no C++ compiler, an op Inductor cannot lower), a warning and the eager decoder."""

    def __init__(self, model, compile: bool = False) -> None:
        self.model = model
        self.compiled = torch.compile(model.hidden_states, dynamic=True) if compile else None
        # Compiled graphs specialize sizes 0 and 1 and a cache exactly as long as its input: batches, lengths and
        # the tails' room are padded to at least 2, so about three graphs serve a whole run (prefill, tails)
        self.least = 2 if compile else 0
        # text several examples start with (few-shot blocks), run once per cluster of examples (shared_head.py)
        self.heads = HeadCache(model, self.hidden_states) if shares_heads(model.config) else None

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor | None, cache=None) -> torch.Tensor:
        """The final-normed states (B, T, C) of `CausalLM.hidden_states`, compiled when asked for."""
        # Batch invariant: a key mask with a hole (a shared few-shot head, then a left-padded prefix) runs eagerly,
        # where the invariant attention sends it to SDPA; inside a graph it would be read as one range (attention.py)
        if self.compiled is not None and (not getattr(self.model, "batch_invariant", False) or mask is None
                                          or one_range_per_row(mask)):
            try:
                return self.compiled(ids, attention_mask=mask, cache=cache)
            except Exception as e:  # noqa: BLE001 - any compile failure: the eager decoder gives the same numbers
                warnings.warn(f"not compiling the scoring forward: {type(e).__name__}: {e}", RuntimeWarning,
                              stacklevel=2)
                self.compiled = None
        return self.model.hidden_states(ids, attention_mask=mask, cache=cache)

    @torch.inference_mode()
    def sequence_logprobs(self, ids: torch.Tensor, rows: list[int], positions: list[int], targets: list[int]
                          ) -> torch.Tensor:
        """ids (B, T) right-padded; token m is targets[m] predicted at ids[rows[m], positions[m]]: its float32
        log-probability (M,), with lm_head run at those positions only (perplexity windows)."""
        device = self.model.lm_head.weight.device
        hidden = self.hidden_states(ids.to(device), None)  # (B, T, C); causal, so right padding changes nothing
        flat = torch.tensor(rows, device=device) * ids.shape[1] + torch.tensor(positions, device=device)
        picked = hidden.reshape(-1, hidden.shape[-1])[flat]  # (M, C)
        index = torch.arange(len(targets), device=device)
        return token_logprobs(self.model.lm_head, picked, index, torch.tensor(targets, device=device))[0]

    @torch.inference_mode()
    def score(self, groups: list[Group]) -> list[tuple[int, float, bool]]:
        """(pair index, log-likelihood, is_greedy) of every member of the groups, scored in one batch."""
        tails, tail_rows = _distinct_tails(groups)
        room = max([len(tokens) for _, tokens in tails] + [self.least])  # the tails' width
        prefixes = [g.prefix for g in groups]
        head = self.heads.head_for(prefixes) if self.heads is not None else ()
        last, cache, prefix_mask = self._prefill(prefixes, room, head)
        states = [last[:len(groups)]]  # (G, C)
        if tails:
            states.append(self._extend(cache, prefix_mask, tails, room))  # (N_tail, C)
        hidden = torch.cat(states)  # (G + N_tail, C): every state that scores a token
        rows, targets, owner, order = _token_plan(groups, tail_rows, _tail_offsets(tails, len(groups)))
        lls, greedy = self._continuation_scores(hidden, rows, targets, owner, len(order))
        return list(zip(order, lls.tolist(), greedy.tolist()))

    def _prefill(self, prefixes: list[tuple[int, ...]], room: int, head: tuple[int, ...] = ()):
        """Prefixes left-padded (G, P) -> the final-normed state at each one's last token (G, C), the KV cache
        holding their K/V (with room for `room` more tokens per row), the (G, P) real-token mask. With a head
        (the start every prefix shares): its K/V written first (H tokens), then only the rest of each prefix
        run, left-padded after it; the mask is then (G, H + P - H)."""
        own = [p[len(head):] for p in prefixes]  # each prefix after the head: at least its last token
        width = max([len(p) for p in own] + [self.least])
        if len(own) < self.least:
            own = own * self.least  # a copy of the row; its states are never read
        weight = self.model.lm_head.weight
        ids = torch.zeros(len(own), width, dtype=torch.long)
        mask = torch.zeros(len(own), len(head) + width, dtype=torch.bool)
        mask[:, :len(head)] = True
        for row, tokens in enumerate(own):
            ids[row, width - len(tokens):] = torch.tensor(tokens)
            mask[row, len(head) + width - len(tokens):] = True
        ids, mask = ids.to(weight.device), mask.to(weight.device)
        cache = make_cache(self.model.config, len(own), len(head) + width + room, self.model.dtype,
                           weight.device)
        if head:
            self.heads.write(cache, head, max(self.least, 1))
        # always the mask: a compiled forward then has one graph for every batch, padded or not
        hidden = self.hidden_states(ids, mask, cache)
        return hidden[:, -1], cache, mask

    def _extend(self, cache, prefix_mask: torch.Tensor, tails: list[tuple[int, tuple[int, ...]]],
                width: int) -> torch.Tensor:
        """Tails (group, tokens) right-padded (R, width) after their prefixes' cached K/V -> the states of their
        real tokens, row-major (N_tail, C)."""
        count = len(tails)
        tails = tails * 2 if count < self.least else tails  # a copy of the row; its states are never read
        device = prefix_mask.device
        ids = torch.zeros(len(tails), width, dtype=torch.long)
        mask = torch.zeros(len(tails), width, dtype=torch.bool)
        for row, (_, tokens) in enumerate(tails):
            ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = True
        rows = torch.tensor([g for g, _ in tails], device=device)
        cache.reorder(rows)  # (R, H_kv, P + room, D): each tail gets a copy of its prefix's K/V
        mask = mask.to(device)
        keys = torch.cat([prefix_mask[rows], mask], dim=1)  # (R, P + T): real keys
        hidden = self.hidden_states(ids.to(device), keys, cache)  # (R, T, C)
        return hidden[:count][mask[:count]]

    def _continuation_scores(self, hidden: torch.Tensor, rows: list[int], targets: list[int], owner: list[int],
                             count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per request: the float32 sum of its tokens' log-probabilities and whether each token is the argmax."""
        device = hidden.device
        rows_t, targets_t = torch.tensor(rows, device=device), torch.tensor(targets, device=device)
        logprobs, top = token_logprobs(self.model.lm_head, hidden, rows_t, targets_t)  # (M,) each
        owner_t = torch.tensor(owner, device=device)
        lls = torch.zeros(count, dtype=torch.float32, device=device).index_add_(0, owner_t, logprobs)
        misses = torch.zeros(count, dtype=torch.long, device=device).index_add_(0, owner_t, (~top).long())
        return lls.cpu(), (misses == 0).cpu()


def token_logprobs(lm_head, hidden: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                   chunk: int = LOGIT_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (N, C) final-normed states; rows, targets (M,): token m is targets[m] scored from hidden[rows[m]].
    Returns its float32 log-probability (M,) and whether it is the argmax (M,), as log_softmax + gather and
    argmax would, with lm_head run on `chunk` rows at a time.

    No argmax over the vocabulary (aten's is a slow scalar loop on CPU: 6% of a HellaSwag run): a token is the
    argmax when its logit equals the row's max and no earlier logit does (argmax's first-index rule), checked
    only on the rows where the first holds."""
    picked = torch.empty(rows.shape[0], dtype=torch.float32, device=hidden.device)  # (M,) target logits
    lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (N,) logsumexp per state
    greedy = torch.zeros(rows.shape[0], dtype=torch.bool, device=hidden.device)  # (M,)
    for start in range(0, hidden.shape[0], chunk):
        logits = lm_head(hidden[start:start + chunk]).float()  # (n, V)
        top = logits.amax(-1)  # (n,)
        lse[start:start + chunk] = top + (logits - top[:, None]).exp_().sum(-1).log_()
        inside = ((rows >= start) & (rows < start + chunk)).nonzero().squeeze(1)
        local = rows[inside] - start
        picked[inside] = logits[local, targets[inside]]
        greedy[inside] = _is_first_max(logits, local, targets[inside], picked[inside], top)
    return picked - lse[rows], greedy


def _is_first_max(logits: torch.Tensor, local: torch.Tensor, targets: torch.Tensor, picked: torch.Tensor,
                  top: torch.Tensor) -> torch.Tensor:
    """logits (n, V); per token (m,): its row, target and target logit -> whether argmax(row) == target."""
    hits = picked == top[local]  # (m,) the target's logit is the max
    found = hits.nonzero().squeeze(1)
    if found.numel():
        candidates = logits[local[found]]  # (h, V): rows where the target ties the max
        before = torch.arange(logits.shape[1], device=logits.device)[None, :] < targets[found, None]  # (h, V)
        tied_earlier = (candidates.eq(top[local[found], None]) & before).any(-1)
        hits[found] = ~tied_earlier
    return hits


def _distinct_tails(groups: list[Group]) -> tuple[list[tuple[int, tuple[int, ...]]], dict]:
    """The distinct non-empty tails (continuation[:-1]) per group, and (group, tail) -> its row."""
    tails, rows = [], {}
    for g, group in enumerate(groups):
        for _, continuation in group.members:
            key = (g, tuple(continuation[:-1]))
            if key[1] and key not in rows:
                rows[key] = len(tails)
                tails.append(key)
    return tails, rows


def _token_plan(groups: list[Group], tail_rows: dict, offsets: list[int]):
    """Per scored token: the hidden state it is scored from (its group's last prefix state for a continuation's
    first token, then its tail's states), its target and the request it belongs to; and the requests' pair indices."""
    rows, targets, owner, order = [], [], [], []
    for g, group in enumerate(groups):
        for index, continuation in group.members:
            start = offsets[tail_rows[(g, tuple(continuation[:-1]))]] if len(continuation) > 1 else 0
            rows += [g] + list(range(start, start + len(continuation) - 1))
            targets += continuation
            owner += [len(order)] * len(continuation)
            order.append(index)
    return rows, targets, owner, order


def _tail_offsets(tails: list[tuple[int, tuple[int, ...]]], first: int) -> list[int]:
    """Where each tail's states start among the hidden states (after the `first` prefix states)."""
    offsets, at = [], first
    for _, tokens in tails:
        offsets.append(at)
        at += len(tokens)
    return offsets
