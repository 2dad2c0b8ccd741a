"""Scoring: acc and acc_norm on the task files, checked by hand on a model whose log-likelihoods are known, and
against a direct, unbatched computation from `llm.forward` on a tiny random model; lm-eval's pair encoding,
batching and metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tinylm.eval.loglikelihood import Scorer
from tinylm.eval.metrics import doc_scores, mean_stderr, pooled_stderr
from tinylm.eval.runner import Settings, build_items, evaluate
from tinylm.eval.tasks import TASKS, resolve_tasks

DATA = Path(__file__).parents[1] / "data" / "eval"
ALL = list(TASKS)


class CharTokenizer:
    """One token per character, so a continuation's token count is its length."""

    bos_token_id, eos_token_id = 1, 2

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [3 + ord(c) % 250 for c in text]


def uniform_forward(ids: torch.Tensor) -> torch.Tensor:
    return torch.zeros(*ids.shape, 253)  # every token has log-probability -ln(253)


@pytest.mark.parametrize("shots", [0, 1])
def test_hand_checked_accuracies_on_a_uniform_model(shots):
    """With uniform logits a continuation's log-likelihood is -len(continuation) * ln V, so by hand:
    acc picks the shortest " " + choice (the first on a tie) and acc_norm, -(len + 1) / len, the longest.
    hellaswag: the gold ending is the longest in 3 of 4 docs and the shortest in 1 -> acc 1/4, acc_norm 3/4.
    arc_challenge: gold shortest, longest, shortest -> 2/3, 1/3; arc_easy: gold always shortest -> 1, 0.
    winogrande: both options share the continuation -> acc picks option 1 (answers 1, 2, 1 -> 2/3); acc_norm
    divides by the partial context, so the longer option wins (right in doc 1 only -> 1/3).
    commonsense_qa / mmlu: the letters tie -> "A" -> answers A, C, A -> 2/3; MMLU 0, 0 | 1, 3 -> 1/2."""
    scorer = Scorer(uniform_forward, CharTokenizer(), max_length=4096, prefix_token_id=1)
    results = evaluate(scorer, resolve_tasks(ALL), DATA, Settings(num_fewshot=shots, batch_size=3, progress=False))
    expected = {"hellaswag": (1 / 4, 3 / 4), "arc_challenge": (2 / 3, 1 / 3), "arc_easy": (1, 0),
                "winogrande": (2 / 3, 1 / 3), "commonsense_qa": (2 / 3, 2 / 3), "mmlu": (1 / 2, 1 / 2)}
    for task, (acc, acc_norm) in expected.items():
        assert (results[task]["acc"], results[task]["acc_norm"]) == pytest.approx((acc, acc_norm)), task
    groups = results["mmlu"]["groups"]
    assert groups["elementary_mathematics"]["acc"] == 1.0 and groups["astronomy"]["acc"] == 0.0
    assert results["hellaswag"]["acc"] != results["hellaswag"]["acc_norm"]


def test_doc_scores_acc_and_acc_norm_differ_by_hand():
    # -10 over 1 character vs -12 over 20: acc takes choice 0, acc_norm (-10 vs -0.6) choice 1
    assert doc_scores([-10.0, -12.0], ["a", "a much longer answer"], gold=0) == {"acc": 1.0, "acc_norm": 0.0}
    assert doc_scores([-10.0, -12.0], ["a", "a much longer answer"], gold=1) == {"acc": 0.0, "acc_norm": 1.0}
    assert doc_scores([-3.0, -3.0], ["x", "y"], gold=0) == {"acc": 1.0, "acc_norm": 1.0}  # ties: the first


def test_stderr_formulas():
    assert mean_stderr([1, 0, 1]) == pytest.approx(1 / 3)  # sqrt(1/3) / sqrt(3)
    assert mean_stderr([1.0]) is None
    a, b = [1, 0, 1, 1], [0, 0, 1]
    # pooled over groups weighted by size: close to the stderr of everything concatenated (lm-eval's comment)
    pooled = pooled_stderr([mean_stderr(a), mean_stderr(b)], [4, 3])
    assert pooled == pytest.approx(math.sqrt((3 * mean_stderr(a) ** 2 * 4 + 2 * mean_stderr(b) ** 2 * 3) / 5 / 7))
    assert pooled == pytest.approx(mean_stderr(a + b), rel=0.1)


@pytest.fixture(scope="module")
def tiny_llm(load_tiny):
    return load_tiny("llama", seed=1, dtype="float32")


def direct_loglikelihood(llm, context: str, continuation: str) -> float:
    """lm-eval's definition, one unpadded sequence at a time: the continuation's tokens are those of
    context + continuation after the context's own tokens."""
    ctx = llm.tokenizer.encode(context, add_special_tokens=False)
    whole = llm.tokenizer.encode(context + continuation, add_special_tokens=False)
    logprobs = llm.forward(torch.tensor([whole])).logits[0].float().log_softmax(-1)  # (T, V)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


@pytest.mark.parametrize("shots", [0, 2])
def test_acc_and_acc_norm_equal_a_direct_computation_from_forward(tiny_llm, shots):
    scorer = Scorer.from_llm(tiny_llm)
    settings = Settings(num_fewshot=shots, batch_size=4, progress=False)
    specs = resolve_tasks(ALL)
    results = evaluate(scorer, specs, DATA, settings)
    for spec in specs:
        items = build_items(spec, DATA, settings)
        accs, norms = [], []
        for item in items:
            lls = [direct_loglikelihood(tiny_llm, r.context, r.continuation) for r in item.requests]
            best = max(range(len(lls)), key=lambda i: (lls[i], -i))
            best_norm = max(range(len(lls)), key=lambda i: (lls[i] / len(item.doc.choices[i]), -i))
            accs.append(best == item.doc.gold)
            norms.append(best_norm == item.doc.gold)
        assert results[spec.name]["acc"] == pytest.approx(sum(accs) / len(accs)), spec.name
        assert results[spec.name]["acc_norm"] == pytest.approx(sum(norms) / len(norms)), spec.name
        assert results[spec.name]["n"] == len(items)


def test_batched_loglikelihoods_equal_unbatched_ones(tiny_llm):
    settings = Settings(num_fewshot=1, progress=False)
    items = build_items(TASKS["hellaswag"], DATA, settings) + build_items(TASKS["mmlu"], DATA, settings)
    scorer = Scorer.from_llm(tiny_llm)
    requests = [r for item in items for r in item.requests]
    pairs = [scorer.encode_pair(r.context, r.continuation) for r in requests]
    scored = {i: ll for batch in scorer.score(pairs, batch_size=5) for i, ll, _ in batch}
    for i, r in enumerate(requests):
        assert scored[i] == pytest.approx(direct_loglikelihood(tiny_llm, r.context, r.continuation), abs=1e-4)


def test_encode_pair_moves_trailing_space_and_splits_the_joint_encoding(tiny_llm):
    scorer = Scorer.from_llm(tiny_llm)
    tok = tiny_llm.tokenizer
    ctx, cont = scorer.encode_pair("The answer is ", "Paris")
    assert ctx == tok.encode("The answer is", add_special_tokens=False)
    assert ctx + cont == tok.encode("The answer is Paris", add_special_tokens=False)
    ctx, cont = scorer.encode_pair("", "Paris")  # empty context: the prefix token (BOS, else EOS)
    assert ctx == [scorer.prefix_token_id] and cont == tok.encode("Paris", add_special_tokens=False)


def test_left_truncation_keeps_the_continuation(tiny_llm):
    scorer = Scorer.from_llm(tiny_llm, max_length=16)
    long_ctx = "Once upon a time there was a little robot who loved to read. " * 4
    pair = scorer.encode_pair(long_ctx, " Paris")
    [(index, ll, _)] = next(scorer.score([pair], batch_size=1))
    window = (pair[0] + pair[1])[-17:]  # the last 16 inputs and the final target
    logprobs = tiny_llm.forward(torch.tensor([window[:-1]])).logits[0].log_softmax(-1)
    k = len(pair[1])
    expected = sum(logprobs[16 - k + j, pair[1][j]].item() for j in range(k))
    assert ll == pytest.approx(expected, abs=1e-4)
