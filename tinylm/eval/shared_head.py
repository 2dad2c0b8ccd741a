"""Text several examples start with, run once: MMLU's subject line and few-shot examples, any task's few-shot block.

lm-eval's MMLU takes its few-shot examples from `dev` with the first_n sampler, so every question of a subject reads
the same description and the same k examples before its own text: 5-shot, about 600 of a prompt's 700 tokens. The
multiple-choice scorer (shared_context.py) already runs each example's context once for its choices; this runs
the part its examples share once for all of them:

- `cluster_groups` orders the examples so that those sharing a long start are batched together: a lexicographic
  sort puts them next to each other, runs whose neighbours share >= MIN_HEAD tokens form a cluster (at least
  MIN_CLUSTER examples: winogrande's two sentence halves of one example are not worth a pass of their own), each
  cluster longest first; the other examples keep the plain longest-first order.
- `common_head` is the start a batch's prefixes share (each keeps at least its last token: that token's state
  predicts the choices' first tokens); a batch whose prefixes all continue the last head run reuses that one.
- `HeadCache` runs a head once, keeps its K/V per attention layer, and writes them at the front of a batch's cache:
  the batch's rows then run only their own tokens (left-padded after the head), positions continuing after it.
  Consecutive batches of one cluster share the head, so it runs once per cluster, not once per batch.

Softmax-attention models only: a Gated DeltaNet layer's state is a recurrence over every token, so the left padding
between a head and a row's own tokens would enter it (its short convolution reads the previous tokens).
"""

from __future__ import annotations

import torch

from tinylm.model.cache import make_cache

MIN_HEAD = 16  # shared tokens worth a pass of their own (MMLU's subject line is about 17 in SmolLM2's tokenizer)
MIN_CLUSTER = 4  # examples sharing them


def shares_heads(config) -> bool:
    """Whether the model's cache contract lets rows continue a shared head after left padding."""
    return not config.has_linear_layers


def common_head(prefixes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The longest start of every prefix, leaving each at least its last token; () when shorter than MIN_HEAD."""
    limit = min(len(p) for p in prefixes) - 1
    first = prefixes[0]
    size = 0
    while size < limit and all(p[size] == first[size] for p in prefixes):
        size += 1
    return first[:size] if size >= MIN_HEAD else ()


def _shared_length(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    size = 0
    for x, y in zip(a, b):
        if x != y:
            break
        size += 1
    return size


def cluster_groups(groups: list, key=lambda g: g.prefix) -> tuple[list[list], list]:
    """-> (clusters: lists of groups sharing a start of >= MIN_HEAD tokens, each longest first; the other groups,
    longest first). Batches are cut within a cluster, so a batch's head is the cluster's."""
    ordered = sorted(groups, key=key)
    runs, current = [], ordered[:1]
    for before, after in zip(ordered, ordered[1:]):
        if _shared_length(key(before), key(after)) >= MIN_HEAD:
            current.append(after)
        else:
            runs.append(current)
            current = [after]
    runs.append(current) if current else None
    longest_first = lambda gs: sorted(gs, key=lambda g: (-len(key(g)), key(g)))  # noqa: E731
    clusters = [longest_first(run) for run in runs if len(run) >= MIN_CLUSTER]
    loose = longest_first([g for run in runs if len(run) < MIN_CLUSTER for g in run])
    return sorted(clusters, key=lambda c: -len(key(c[0]))), loose


class HeadCache:
    """The K/V of the last head run, per attention layer (1, H_kv, L, D), reused while batches share it."""

    def __init__(self, model, hidden_states) -> None:
        self.model = model
        self.hidden_states = hidden_states  # the scorer's (possibly compiled) CausalLM.hidden_states
        self.tokens: tuple[int, ...] = ()
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []

    def clear(self) -> None:
        """Forget the last head (a new scoring run: each run pays for its own heads)."""
        self.tokens, self.keys, self.values = (), [], []

    def head_for(self, prefixes: list[tuple[int, ...]]) -> tuple[int, ...]:
        """The head a batch runs after: the last head run if every prefix continues it (the rest of a cluster,
        even a batch of one), else the batch's common start if it has two prefixes or more, else none."""
        size = len(self.tokens)
        if size and all(len(p) > size and p[:size] == self.tokens for p in prefixes):
            return self.tokens
        return common_head(prefixes) if len(prefixes) > 1 else ()

    def kv(self, head: tuple[int, ...], rows: int) -> tuple[list, list]:
        """The head's K/V per layer, run now unless it is the last head run. rows: the batch the head is run in
        (a compiled forward is given at least 2 rows; row 0 is kept)."""
        if head != self.tokens:
            weight = self.model.lm_head.weight
            ids = torch.tensor([head] * rows, device=weight.device)  # (rows, L)
            cache = make_cache(self.model.config, rows, len(head), self.model.dtype, weight.device)
            self.hidden_states(ids, torch.ones_like(ids, dtype=torch.bool), cache)  # a mask: the prefill's graph
            self.keys = [None if k is None else k[:1].clone() for k in cache.keys]
            self.values = [None if v is None else v[:1].clone() for v in cache.values]
            self.tokens = head
        return self.keys, self.values

    def write(self, cache, head: tuple[int, ...], rows: int) -> None:
        """Put the head's K/V at the front of every row of `cache` (empty, B rows) and advance it past them."""
        keys, values = self.kv(head, rows)
        length = len(head)
        for layer, (k, v) in enumerate(zip(keys, values)):
            if k is not None:
                cache.keys[layer][:, :, :length] = k  # (1, H_kv, L, D) broadcast over the batch's rows
                cache.values[layer][:, :, :length] = v
        cache.advance(length)
