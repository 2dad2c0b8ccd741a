"""Sliding-window perplexity, bits per byte and tokens/s, as lm-evaluation-harness's rolling loglikelihood computes them.

Each document is tokenized alone (no special tokens unless add_bos) and starts with the prefix token (BOS, else EOS),
so its first token is scored too. Over x = [prefix] + tokens, with context C and stride S (1 <= S <= C):

- the first window feeds x[0:C] and scores the C tokens x[1:C+1] it predicts;
- each next window scores the next (up to) S tokens: it feeds the C tokens that end just before the last of them
  (x[end-C:end]) and scores the predictions of the new ones only.

So every token is scored exactly once, from at most C tokens of history and, after the first window, at least C-S+1.
S = C is exactly lm-eval's `loglikelihood_rolling` (`get_rolling_token_windows(..., max_seq_len=C, context_len=1)` +
`make_disjoint_window`, lm_eval/utils.py); S < C gives the overlapping windows of the transformers perplexity guide
(https://huggingface.co/docs/transformers/perplexity), without its approximations (there the first token is never
scored and the loss is re-weighted by a token count off by one per window).
Reported as lm-eval reports wikitext: token perplexity exp(NLL / tokens), bits per byte NLL / (bytes * ln 2), byte and
word perplexity; bytes are UTF-8 bytes, words are `re.split(r"\\s+", doc)` pieces.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from tinylm.eval.data import EvalDataError
from tinylm.eval.loglikelihood import Scorer


@dataclass
class PerplexityResult:
    documents: int
    tokens: int  # scored tokens
    bytes: int
    words: int
    nll: float  # summed negative log-likelihood, nats
    windows: int
    context: int
    stride: int
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (self.bytes * math.log(2))

    def as_dict(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "byte_perplexity": math.exp(self.nll / self.bytes), "word_perplexity": math.exp(self.nll / self.words),
                "tokens_per_s": self.tokens / self.seconds if self.seconds else None}


def rolling_windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) per window over x = [prefix] + n tokens: feed x[begin:end], score positions first..end-1."""
    if n == 0:
        return []
    windows = [(0, min(context, n), 0)]
    scored = windows[0][1]
    while scored < n:
        end = min(scored + stride, n)
        windows.append((max(0, end - context), end, scored))
        scored = end
    return windows


def perplexity(scorer: Scorer, documents: list[str], context: int | None = None, stride: int | None = None,
               batch_size: int = 1, progress: bool = True) -> PerplexityResult:
    context = context or scorer.max_length
    stride = stride or context
    if not 1 <= stride <= context:
        raise EvalDataError(f"--stride must be between 1 and the context ({context}), got {stride}")
    start = time.perf_counter()
    sequences = [[scorer.prefix_token_id] + scorer.encode(doc) for doc in documents]
    jobs = [(seq, w) for seq in sequences for w in rolling_windows(len(seq) - 1, context, stride)]
    if not jobs:
        raise EvalDataError("the data holds no text to score")
    nll = 0.0
    with tqdm(total=len(jobs), desc="perplexity", unit="window", disable=not progress) as bar:
        for i in range(0, len(jobs), batch_size):
            nll += _score_windows(scorer, jobs[i:i + batch_size])
            bar.update(len(jobs[i:i + batch_size]))
    return PerplexityResult(
        documents=len(documents), tokens=sum(len(s) - 1 for s in sequences),
        bytes=sum(len(d.encode("utf-8")) for d in documents), words=sum(len(re.split(r"\s+", d)) for d in documents),
        nll=nll, windows=len(jobs), context=context, stride=stride, seconds=time.perf_counter() - start)


def _score_windows(scorer: Scorer, jobs: list[tuple[list[int], tuple[int, int, int]]]) -> float:
    """Summed NLL of the tokens the windows score; windows are right-padded into one batch (causal: no mask)."""
    width = max(end - begin for _, (begin, end, _) in jobs)
    ids = torch.zeros(len(jobs), width, dtype=torch.long)  # (B, T)
    rows, positions, targets = [], [], []
    for row, (seq, (begin, end, first)) in enumerate(jobs):
        ids[row, :end - begin] = torch.tensor(seq[begin:end])
        rows += [row] * (end - first)
        positions += range(first - begin, end - begin)
        targets += seq[first + 1:end + 1]
    if scorer.shared is not None:  # tinylm's model: lm_head at the scored positions only
        return -scorer.shared.sequence_logprobs(ids, rows, positions, targets).sum().item()
    logits = scorer.forward(ids)  # (B, T, V)
    logprobs = logits[rows, positions].float().log_softmax(-1)  # (M, V)
    target = torch.tensor(targets, device=logprobs.device)  # (M,)
    return -logprobs.gather(-1, target[:, None]).sum().item()
