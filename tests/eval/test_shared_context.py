"""Multiple-choice scoring with each shared context run once (tinylm/eval/shared_context.py): the log-likelihoods and
is_greedy of one unpadded `llm.forward` per request on every test task file (float32, tight tolerance), for a dense,
a biased-q/k/v and a hybrid (Gated DeltaNet) family; each example's context run once, its choices on its K/V; lm_head
only at the scored tokens; the compiled forward gives the same numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tinylm.eval.loglikelihood import Scorer
from tinylm.eval.runner import Settings, build_items
from tinylm.eval.tasks import TASKS

DATA = Path(__file__).parents[1] / "data" / "eval"
pytestmark = pytest.mark.usefixtures("one_thread")


def direct(llm, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """lm-eval's log-likelihood and is_greedy from one unpadded forward of context + continuation."""
    whole = context + continuation
    logprobs = llm.forward(torch.tensor([whole[:-1]])).logits[0].float().log_softmax(-1)  # (T, V)
    rows = logprobs[len(context) - 1:]  # (k, V): the positions that predict the continuation
    target = torch.tensor(continuation)
    return rows.gather(-1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())


def task_pairs(scorer: Scorer, shots: int) -> list[tuple[list[int], list[int]]]:
    items = [item for spec in TASKS.values() for item in build_items(spec, DATA, Settings(num_fewshot=shots))]
    return [scorer.encode_pair(r.context, r.continuation) for item in items for r in item.requests]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3_next"])
@pytest.mark.parametrize("shots", [0, 1])
def test_loglikelihoods_equal_one_forward_per_request_on_every_task_file(load_tiny, arch, shots):
    llm = load_tiny(arch, seed=3, dtype="float32")
    scorer = Scorer.from_llm(llm)
    pairs = task_pairs(scorer, shots)
    scored = {i: (ll, greedy) for batch in scorer.score(pairs, batch_size=3) for i, ll, greedy in batch}
    assert sorted(scored) == list(range(len(pairs)))
    for i, (context, continuation) in enumerate(pairs):
        ll, greedy = direct(llm, context, continuation)
        assert scored[i][0] == pytest.approx(ll, rel=1e-5, abs=1e-4), i
        assert scored[i][1] == greedy, i


@pytest.fixture(scope="module")
def tiny_llm(load_tiny):
    return load_tiny("llama", seed=4, dtype="float32")


def test_each_context_runs_once_and_lm_head_sees_only_scored_tokens(tiny_llm):
    """HellaSwag, 1-shot: the decoder reads each example's context once (one prefill row per example) and each
    ending after it; lm_head runs on one state per example (its context's last token, shared by the choices'
    first tokens) plus one per ending token after the first, nowhere else."""
    scorer = Scorer.from_llm(tiny_llm)
    items = build_items(TASKS["hellaswag"], DATA, Settings(num_fewshot=1))
    pairs = [scorer.encode_pair(r.context, r.continuation) for item in items for r in item.requests]
    calls, head_rows = [], []
    embed = tiny_llm.model.model.embed_tokens.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))
    head = tiny_llm.model.lm_head.register_forward_pre_hook(lambda m, a: head_rows.append(a[0].shape[0]))
    try:
        list(scorer.score(pairs, batch_size=len(items)))
    finally:
        embed.remove()
        head.remove()
    contexts = {tuple(context) for context, _ in pairs}
    endings = {(tuple(context), tuple(continuation[:-1])) for context, continuation in pairs}
    assert len(contexts) == len(items) == 4
    assert [shape[0] for shape in calls] == [len(contexts), len(endings)]  # a prefill pass, then the endings
    assert calls[0][1] == max(len(c) for c in contexts)  # the prefill reads contexts only
    assert calls[1][1] == max(len(e) for _, e in endings)  # the second pass reads endings only
    assert sum(head_rows) == len(contexts) + sum(len(e) for _, e in endings)


def test_one_token_answers_need_one_pass_and_one_state_per_question(default_llm):
    """MMLU's " A".." D" (one token each in SmolLM2-135M's vocabulary; the tiny models' split off the space):
    16 requests, 4 questions -> one prefill of 4 rows, lm_head on 4 states."""
    tiny_llm = default_llm
    scorer = Scorer.from_llm(tiny_llm)
    items = build_items(TASKS["mmlu"], DATA, Settings())
    pairs = [scorer.encode_pair(r.context, r.continuation) for item in items for r in item.requests]
    calls, head_rows = [], []
    embed = tiny_llm.model.model.embed_tokens.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    head = tiny_llm.model.lm_head.register_forward_pre_hook(lambda m, a: head_rows.append(a[0].shape[0]))
    try:
        results = [x for batch in scorer.score(pairs, batch_size=64) for x in batch]
    finally:
        embed.remove()
        head.remove()
    assert {len(continuation) for _, continuation in pairs} == {1}
    assert len(results) == 16 and calls == [4] and head_rows == [4]
    for (index, ll, greedy), (context, continuation) in zip(sorted(results), pairs):
        assert (ll, greedy) == pytest.approx(direct(default_llm, context, continuation), abs=1e-4)


def test_padded_rows_path_shares_identical_inputs(tiny_llm):
    """The path for a plain forward function (transformers' in benchmarks/eval_mc.py): MMLU's answers read the
    same input, one row per question, as lm-eval's logits cache."""
    rows = []
    plain = Scorer(lambda ids: (rows.append(ids.shape[0]), tiny_llm.forward(ids).logits)[1], tiny_llm.tokenizer,
                   tiny_llm.config.max_position_embeddings, Scorer.from_llm(tiny_llm).prefix_token_id)
    items = build_items(TASKS["mmlu"], DATA, Settings())
    pairs = [plain.encode_pair(r.context, r.continuation) for item in items for r in item.requests]
    results = [x for batch in plain.score(pairs, batch_size=64) for x in batch]
    assert len(results) == 16 and sum(rows) == 4


def test_compiled_forward_gives_the_same_loglikelihoods(tiny_llm):
    eager = Scorer.from_llm(tiny_llm)
    compiled = Scorer.from_llm(tiny_llm, compile=True)
    items = build_items(TASKS["hellaswag"], DATA, Settings())  # each graph shape costs a compile: one task's
    pairs = [eager.encode_pair(r.context, r.continuation) for item in items for r in item.requests]
    want = {i: ll for batch in eager.score(pairs, batch_size=3) for i, ll, _ in batch}
    got = {i: ll for batch in compiled.score(pairs, batch_size=3) for i, ll, _ in batch}
    assert compiled.shared.compiled is not None  # it compiled, rather than falling back to eager
    assert got == pytest.approx(want, rel=1e-5, abs=1e-4)
    # MMLU rows after a shared 2-shot block: the block's K/V then each row's left-padded rest, a key mask with a
    # hole, which the batch-invariant attention cannot take as one range inside a graph (it gave nats off)
    from tests.eval.test_shared_head import mmlu_pairs

    assert getattr(tiny_llm.model, "batch_invariant", False) and compiled.shared.heads is not None
    head_pairs = mmlu_pairs(eager, questions=6, shots=2)
    want = {i: ll for batch in eager.score(head_pairs, batch_size=6) for i, ll, _ in batch}
    got = {i: ll for batch in compiled.score(head_pairs, batch_size=6) for i, ll, _ in batch}
    assert got == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_token_logprobs_and_greedy_match_log_softmax_and_argmax_ties_included():
    """lm_head as the identity (hidden states are the logits), chunks of 2 rows: values as log_softmax + gather,
    greedy as argmax == target, where a tie goes to the first index (argmax's rule, lm-eval's is_greedy)."""
    from tinylm.eval.shared_context import token_logprobs

    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    logits[1, 2] = logits[1, 5] = logits[1].max() + 1.0  # tie: argmax is 2, so target 5 is not greedy
    logits[3, 0] = logits[3, 4] = logits[3].max() + 1.0  # tie at index 0: target 0 is greedy
    rows = torch.tensor([0, 1, 1, 2, 3, 3, 4, 4])
    targets = torch.tensor([int(logits[0].argmax()), 5, 2, 1, 0, 4, int(logits[4].argmax()), 3])
    values, greedy = token_logprobs(lambda h: h, logits, rows, targets, chunk=2)
    want = logits.log_softmax(-1)[rows, targets]
    assert torch.allclose(values, want, atol=1e-6)
    assert greedy.tolist() == (logits.argmax(-1)[rows] == targets).tolist()
    assert greedy.tolist()[1:3] == [False, True] and greedy.tolist()[4:6] == [True, False]
