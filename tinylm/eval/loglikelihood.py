"""Log-likelihood of continuations, computed in padded batches as lm-evaluation-harness's HFLM computes them.

Source: lm_eval/models/huggingface.py (`_loglikelihood_tokens`) and lm_eval/api/model.py (`_encode_pair`):
- the context's trailing whitespace moves to the continuation; the continuation's tokens are the tokens of
  context + continuation after the context's own tokens (so a BPE merge across the boundary is scored as lm-eval does);
  an empty context is the prefix token (BOS, else EOS); no special tokens are added unless add_bos.
- the model reads (context + continuation)[-(max_length + 1):][:-1] (left truncation), right-padded with id 0 and no
  attention mask (causal: padding after a row's tokens cannot change them); the continuation is scored at the row's
  last len(continuation) positions: the sum of log-softmax (computed here in float32), and whether every token is
  the argmax (lm-eval's is_greedy).
- requests are sorted longest first (lm-eval's Collator) so batches are tight; requests whose model input is the same
  token sequence (e.g. MMLU's one-token answers " A".." D") share one row, as lm-eval's logits cache does.

Two ways to compute the same numbers: a Scorer made from an LLM (`from_llm`) scores batches of examples with each
shared context run once and logits only at the scored tokens (shared_context.py; batch_size counts distinct
contexts, about one per example); a Scorer given only a `forward` function (any model's logits, e.g. transformers'
for a comparison) runs lm-eval's padded rows (batch_size counts rows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from tinylm.eval.data import EvalDataError
from tinylm.eval.shared_context import Group, SharedContextScorer, split_request
from tinylm.eval.shared_head import cluster_groups

Forward = Callable[[torch.Tensor], torch.Tensor]  # input_ids (B, T) -> logits (B, T, V)
Pair = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


class Scorer:
    def __init__(self, forward: Forward, tokenizer, max_length: int, prefix_token_id: int, add_bos: bool = False,
                 model=None, compile: bool = False):
        self.forward = forward
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.prefix_token_id = prefix_token_id
        self.add_bos = add_bos
        self.model = model  # tinylm's CausalLM: shared contexts run once (None: `forward`'s padded rows)
        self.shared = SharedContextScorer(model, compile) if model is not None else None

    @classmethod
    def from_llm(cls, llm, max_length: int | None = None, add_bos: bool = False, compile: bool = False) -> Scorer:
        if llm.tokenizer is None:
            raise EvalDataError("this model has no tokenizer; evaluating text needs one")
        return cls(lambda ids: llm.forward(ids).logits, llm.tokenizer, max_length or llm.config.max_position_embeddings,
                   prefix_token_id(llm), add_bos, model=llm.model, compile=compile)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=self.add_bos)

    def encode_pair(self, context: str, continuation: str) -> Pair:
        if context == "":
            return [self.prefix_token_id], self.encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        return context_ids, whole[len(context_ids):]

    def score(self, pairs: Sequence[Pair], batch_size: int) -> Iterator[list[tuple[int, float, bool]]]:
        """For each batch run, the (pair index, log-likelihood, is_greedy) of the pairs it scored."""
        if self.shared is not None:
            yield from self._score_shared(pairs, batch_size)
            return
        by_input: dict[tuple[int, ...], list[int]] = {}
        for index, (context, continuation) in enumerate(pairs):
            self._check(context, continuation)
            by_input.setdefault(tuple((context + continuation)[-(self.max_length + 1):][:-1]), []).append(index)
        order = sorted(by_input, key=lambda toks: (-len(toks), toks))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            yield self._run(chunk, [by_input[toks] for toks in chunk], pairs)

    def _score_shared(self, pairs: Sequence[Pair], batch_size: int) -> Iterator[list[tuple[int, float, bool]]]:
        """batch_size distinct prefixes (contexts) per batch, every choice of each in the same batch."""
        groups: dict[tuple[int, ...], Group] = {}
        for index, (context, continuation) in enumerate(pairs):
            self._check(context, continuation)
            prefix = split_request(context + continuation, continuation, self.max_length)
            groups.setdefault(prefix, Group(prefix)).members.append((index, continuation))
        for run in self._runs(list(groups.values())):
            for start in range(0, len(run), batch_size):
                yield self.shared.score(run[start:start + batch_size])

    def _runs(self, groups: list[Group]) -> list[list[Group]]:
        """The groups in the runs batches are cut from: examples starting with the same few-shot block together
        (their start then runs once, shared_head.py), each run longest first (tight left padding)."""
        if self.shared.heads is None:
            return [sorted(groups, key=lambda g: (-len(g.prefix), g.prefix))]
        self.shared.heads.clear()
        clusters, loose = cluster_groups(groups)
        return clusters + [loose]

    def _check(self, context: list[int], continuation: list[int]) -> None:
        if not context or not continuation:
            raise EvalDataError("a request has an empty context or continuation after tokenization")
        if len(continuation) > self.max_length:
            raise EvalDataError(f"a continuation of {len(continuation)} tokens is longer than the context "
                                f"({self.max_length})")

    def _run(self, chunk: list[tuple[int, ...]], users: list[list[int]], pairs: Sequence[Pair]
             ) -> list[tuple[int, float, bool]]:
        ids = torch.zeros(len(chunk), len(chunk[0]), dtype=torch.long)  # (B, T): longest first, right-padded
        for row, toks in enumerate(chunk):
            ids[row, :len(toks)] = torch.tensor(toks)
        logits = self.forward(ids)  # (B, T, V)
        out = []
        for row, toks in enumerate(chunk):
            for index in users[row]:
                out.append((index, *_continuation_score(logits[row], len(toks), pairs[index][1])))
        return out


def _continuation_score(logits: torch.Tensor, length: int, continuation: list[int]) -> tuple[float, bool]:
    """logits (T, V) of one row whose real tokens are the first `length`."""
    target = torch.tensor(continuation, device=logits.device)  # (k,)
    logprobs = logits[length - len(continuation):length].float().log_softmax(-1)  # (k, V)
    ll = logprobs.gather(-1, target[:, None]).sum().item()
    return ll, bool((logprobs.argmax(-1) == target).all())


def prefix_token_id(llm) -> int:
    """lm-eval's `prefix_token_id`: BOS if the tokenizer has one, else EOS."""
    tokenizer = llm.tokenizer
    for candidate in (tokenizer.bos_token_id, tokenizer.eos_token_id, llm.config.bos_token_id):
        if candidate is not None:
            return candidate
    eos = llm.config.eos_token_id
    if eos:
        return eos[0] if isinstance(eos, (list, tuple)) else eos
    raise EvalDataError("the model's tokenizer has neither a BOS nor an EOS token to start a text with")
