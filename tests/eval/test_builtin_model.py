"""The built-in model (SmolLM2-135M-Instruct) on the hand-written ARC-Easy file: answers checked by hand, and the
padded batches' log-likelihoods equal to one-sequence-at-a-time `llm.forward`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tinylm.eval.loglikelihood import Scorer
from tinylm.eval.runner import Settings, build_items, evaluate
from tinylm.eval.tasks import TASKS

DATA = Path(__file__).parents[1] / "data" / "eval"


def test_easy_questions_are_answered_right(default_llm):
    """Paris / a cow / blue: a pretrained model ranks them first by a wide margin (about 7 to 14 nats here),
    per token and per character."""
    result = evaluate(Scorer.from_llm(default_llm), [TASKS["arc_easy"]], DATA, Settings(progress=False))["arc_easy"]
    assert (result["acc"], result["acc_norm"], result["n"]) == (1.0, 1.0, 3)


def test_padded_batches_equal_single_sequences(default_llm):
    scorer = Scorer.from_llm(default_llm)
    items = build_items(TASKS["arc_easy"], DATA, Settings(num_fewshot=1))[:2]
    requests = [r for item in items for r in item.requests]  # 8 requests of different lengths
    pairs = [scorer.encode_pair(r.context, r.continuation) for r in requests]
    batched = {i: ll for batch in scorer.score(pairs, batch_size=8) for i, ll, _ in batch}
    for i, (context, continuation) in enumerate(pairs):
        whole = context + continuation
        logprobs = default_llm.forward(torch.tensor([whole])).logits[0].log_softmax(-1)  # (T, V)
        direct = sum(logprobs[len(context) - 1 + j, t].item() for j, t in enumerate(continuation))
        assert batched[i] == pytest.approx(direct, abs=2e-3)
