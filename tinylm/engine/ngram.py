"""Prompt lookup: speculative decoding's drafts taken from the sequence itself, with no draft model.

As vLLM's "ngram" method and transformers' `prompt_lookup_num_tokens`: the drafts are the tokens that followed the
most recent earlier occurrence of the sequence's last n tokens (n from `max_n` down to `min_n`). Proposing costs
microseconds, so it pays wherever the output repeats the prompt or itself (extraction, code edits, answers quoting
a document, summaries, a small model's loops) and costs little elsewhere: a verification of k + 1 rows reads the
weights once, as a one-row step does (tinylm/kernels/bf16_gemm.cpp, int8_gemm.cpp). Rejected drafts are replaced
as for a draft model, with q one-hot at the draft (tinylm/engine/speculative.py).
"""

from __future__ import annotations

import torch

NGRAM = "[ngram]"  # the draft "model" name that selects this proposer (vLLM's former spelling)


class NgramProposer:
    runner = None  # no model of its own: nothing to compile or warm up

    def __init__(self, max_n: int = 3, min_n: int = 1) -> None:
        self.max_n, self.min_n = max_n, min_n
        self.num_proposed = 0  # drafts checked by the target so far
        self.num_accepted = 0  # of which kept

    def propose(self, seqs, counts: list[int]) -> tuple[list[list[int]], list[None]]:
        """Up to counts[i] drafts for seqs[i] (none where its last tokens never occurred before); no q."""
        return [lookup(seq.all_token_ids, k, self.max_n, self.min_n) if k else [] for seq, k in zip(seqs, counts)], \
            [None] * len(seqs)

    def settle(self, seq, num_valid: int) -> None:
        """Nothing is cached per sequence."""

    def release(self, request_id: str) -> None:
        """Nothing is held per sequence."""


def lookup(tokens: list[int], count: int, max_n: int, min_n: int) -> list[int]:
    """The `count` tokens after the latest earlier occurrence of the last n tokens, for the largest n that has one."""
    ids = torch.tensor(tokens)
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        windows = ids[:-1].unfold(0, n, 1)  # (L - n, n): every earlier n-gram that has a token after it
        hits = (windows == ids[-n:]).all(dim=1).nonzero()
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start:start + count]
    return []
