"""Text several examples start with (MMLU's subject line and few-shot block) run once (tinylm/eval/shared_head.py):
the same log-likelihoods and is_greedy as one unpadded `llm.forward` per request; the head's tokens run once per
cluster of examples, each example's own tokens after it; clusters need MIN_CLUSTER examples sharing MIN_HEAD
tokens; Gated DeltaNet models never share a head."""

from __future__ import annotations

import random

import pytest

from tinylm.eval.loglikelihood import Scorer
from tinylm.eval.prompts import requests_for
from tinylm.eval.shared_context import Group
from tinylm.eval.shared_head import MIN_CLUSTER, MIN_HEAD, cluster_groups, common_head
from tinylm.eval.tasks import TASKS

from .test_shared_context import direct

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = "the ball rolls under a red table while two cats watch from the old wooden chair".split()


def mmlu_pairs(scorer: Scorer, questions: int, shots: int, seed: int = 0):
    """MMLU rows of one subject, each after the same `shots` examples (lm-eval's first_n draw from dev)."""
    rnd = random.Random(seed)

    def row():
        return {"question": " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(5, 30))) + "?",
                "choices": [rnd.choice(WORDS) for _ in range(4)], "answer": rnd.randrange(4),
                "subject": "high_school_physics"}

    make = TASKS["mmlu"].make_doc
    examples = [make(row()) for _ in range(shots)]
    docs = [make(row()) for _ in range(questions)]
    return [scorer.encode_pair(r.context, r.continuation) for doc in docs for r in requests_for(doc, examples)]


def score_counting(llm, scorer: Scorer, pairs, batch_size: int):
    """-> ({pair index: (ll, greedy)}, the token count of every decoder pass)."""
    calls = []
    hook = llm.model.model.embed_tokens.register_forward_pre_hook(lambda m, a: calls.append(tuple(a[0].shape)))
    try:
        scored = {i: (ll, g) for batch in scorer.score(pairs, batch_size) for i, ll, g in batch}
    finally:
        hook.remove()
    return scored, calls


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shared_few_shot_block_runs_once_and_scores_as_one_forward_per_request(load_tiny, arch):
    llm = load_tiny(arch, seed=5, dtype="float32")
    scorer = Scorer.from_llm(llm)
    pairs = mmlu_pairs(scorer, questions=7, shots=2)
    scored, calls = score_counting(llm, scorer, pairs, batch_size=3)
    for i, (context, continuation) in enumerate(pairs):
        ll, greedy = direct(llm, context, continuation)
        assert scored[i][0] == pytest.approx(ll, rel=1e-5, abs=1e-4), i
        assert scored[i][1] == greedy, i
    contexts = sorted({tuple(c) for c, _ in pairs})
    head = common_head(contexts)
    assert len(head) >= MIN_HEAD
    assert calls[0] == (1, len(head))  # the head, once for the 3 batches of the cluster (the last of 1 example)
    assert [rows for rows, _ in calls[1:]] == [3, 3, 3, 3, 1, 1]  # per batch: contexts after it, then the endings
    assert all(tokens <= max(map(len, contexts)) - len(head) for _, tokens in calls[1:])


def test_one_token_answers_after_a_shared_block(default_llm):
    """SmolLM2-135M (" A".." D" one token each), 3-shot MMLU of one subject: one head pass, then one prefill per
    batch of questions, their own tokens only; log-likelihoods as one forward per request."""
    scorer = Scorer.from_llm(default_llm)
    pairs = mmlu_pairs(scorer, questions=4, shots=3, seed=1)
    scored, calls = score_counting(default_llm, scorer, pairs, batch_size=4)
    head = common_head(sorted({tuple(c) for c, _ in pairs}))
    assert calls[0] == (1, len(head)) and len(calls) == 2 and calls[1][0] == 4
    for i, (context, continuation) in enumerate(pairs):
        assert scored[i] == pytest.approx(direct(default_llm, context, continuation), abs=1e-4), i


def test_clusters_need_enough_examples_sharing_enough_tokens():
    shared = tuple(range(100, 100 + MIN_HEAD))
    many = [Group(shared + (i, i + 1)) for i in range(MIN_CLUSTER)]
    pair = [Group(tuple(range(MIN_HEAD)) + (7,)), Group(tuple(range(MIN_HEAD)) + (8, 9))]  # winogrande's halves
    short = [Group(shared[:MIN_HEAD - 1] + (50 + i,)) for i in range(MIN_CLUSTER)]
    clusters, loose = cluster_groups(many + pair + short)
    assert [sorted(g.prefix for g in c) for c in clusters] == [sorted(g.prefix for g in many)]
    assert sorted(g.prefix for g in loose) == sorted(g.prefix for g in pair + short)
    assert [len(g.prefix) for g in loose] == sorted((len(g.prefix) for g in loose), reverse=True)
    assert common_head([g.prefix for g in many]) == shared
    assert common_head([shared, shared + (1,)]) == ()  # each keeps its last token: 15 shared < MIN_HEAD


def test_gated_deltanet_models_do_not_share_heads(load_tiny):
    llm = load_tiny("qwen3_next", seed=5, dtype="float32")
    scorer = Scorer.from_llm(llm)
    assert scorer.shared.heads is None
    pairs = mmlu_pairs(scorer, questions=4, shots=1)
    scored, _ = score_counting(llm, scorer, pairs, batch_size=4)
    for i, (context, continuation) in enumerate(pairs):
        assert scored[i][0] == pytest.approx(direct(llm, context, continuation)[0], rel=1e-5, abs=1e-4), i
