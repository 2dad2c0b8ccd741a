"""Speculative decoding: greedy outputs equal the target's own, whatever the draft; sampled outputs follow the
target's distribution (the acceptance rule checked by counting); stops, limits, penalties, a full cache and
aborts behave as without a draft."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import run_engine
import tinylm
from tinylm.engine.engine import EngineConfig, LLMEngine
from tinylm.engine.ngram import NGRAM, lookup
from tinylm.engine.speculative import verify
from tinylm.errors import ConfigError
from tinylm.tiny import make_tiny

GREEDY = tinylm.SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    return {name: make_tiny(arch, root / name, seed=seed)
            for name, arch, seed in (("target", "llama", 2), ("other", "llama", 3), ("hybrid", "qwen3_next", 2))}


@pytest.fixture(scope="module")
def target(paths):
    return tinylm.load(paths["target"])


def _prompts(llm):
    texts = ["Once upon a time", "The capital of France is Paris. " * 3, "def add(a, b):", "Hi"]
    return [llm.encode(t) for t in texts]


def _speculative(paths, draft="other", k=3, **config) -> LLMEngine:
    target = tinylm.load(paths["target"])
    draft_model = NGRAM if draft == NGRAM else tinylm.load(paths[draft]).model
    config = {"speculative_max_rows": 64, **config}  # these tests speculate in every batch they run
    return LLMEngine(target.model, target.tokenizer, target.eos_token_ids,
                     EngineConfig(num_speculative_tokens=k, **config), draft_model=draft_model)


def _run(engine: LLMEngine, prompts, params=GREEDY) -> tuple[dict[str, list[int]], int]:
    """Each prompt's tokens by request id ("0", "1", ...), and the engine steps it took."""
    run = run_engine(engine, prompts, params)
    return {str(i): tokens for i, tokens in enumerate(run.tokens)}, run.steps


@pytest.mark.parametrize("draft,k", [("target", 1), ("target", 4), ("other", 2), ("other", 5), (NGRAM, 3)])
def test_greedy_outputs_equal_the_target_alone(paths, target, draft, k):
    prompts = _prompts(target)
    expected = [o.token_ids for o in target.generate(prompts, GREEDY)]
    engine = _speculative(paths, draft, k)
    out, steps = _run(engine, prompts)
    assert [out[str(i)] for i in range(len(prompts))] == expected
    drafter = engine.drafter
    assert drafter.num_proposed > 0
    if draft == "target":  # the draft is the target: every draft is accepted, k + 1 tokens per step
        assert drafter.num_accepted == drafter.num_proposed
        assert steps == 1 + math.ceil((GREEDY.max_tokens - 1) / (k + 1))  # the prefill, then k + 1 per step
    if draft != NGRAM:
        assert not drafter.shadows and drafter.blocks.num_free == drafter.blocks.num_blocks - 1  # all released


def test_an_int8_kv_cache_speculates_with_the_plain_int8_tokens(paths, target):
    """kv_cache_dtype applies to the draft's pool too; verification reads the same quantized rows as plain decoding."""
    prompts = _prompts(target)
    plain = LLMEngine(target.model, target.tokenizer, target.eos_token_ids, EngineConfig(kv_cache_dtype="int8"))
    expected, _ = _run(plain, prompts)
    engine = _speculative(paths, "target", k=3, kv_cache_dtype="int8")
    assert engine.drafter.pool.keys[0].dtype == torch.int8
    out, _ = _run(engine, prompts)
    assert out == expected
    assert engine.drafter.num_accepted == engine.drafter.num_proposed > 0  # the same model, the same cache


def test_large_batches_decode_plainly(paths, target):
    """Past speculative_max_rows verification rows (default 16), a step decodes one token per sequence."""
    engine = _speculative(paths, "target", k=3, speculative_max_rows=16)
    prompts = _prompts(target) * 2  # 8 sequences x 4 rows
    out, _ = _run(engine, prompts)
    assert [out[str(i)] for i in range(8)] == [o.token_ids for o in target.generate(prompts, GREEDY)]
    assert engine.drafter.num_proposed == 0


def test_prompt_lookup_drafts_repeated_text(paths, target):
    """A prompt that repeats itself: the continuation is found in it, most drafts are kept, the tokens unchanged."""
    prompt = target.encode("one two three four five six seven eight nine ten " * 4)
    params = tinylm.SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    llm = tinylm.load(paths["target"], draft=NGRAM, num_speculative_tokens=4)
    assert llm.generate([prompt], params)[0].token_ids == target.generate([prompt], params)[0].token_ids
    assert llm.engine.drafter.num_proposed > 0


def test_lookup_takes_the_latest_longest_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 5, 2, 3]
    assert lookup(tokens, 2, max_n=3, min_n=1) == [7, 5]  # "2 3" last seen before "7 5" (no earlier "5 2 3")
    assert lookup([4, 5, 6, 4], 3, max_n=3, min_n=1) == [5, 6, 4]  # one token of context
    assert lookup([1, 2, 3], 2, max_n=3, min_n=1) == []  # nothing repeats
    assert lookup([8, 8], 4, max_n=2, min_n=1) == [8]  # the proposal stops where the text does


def test_load_with_a_draft_generates_the_same_text(paths, target):
    llm = tinylm.load(paths["target"], draft=paths["other"], num_speculative_tokens=4)
    prompt = "The capital of France is Paris. " * 2
    assert llm.generate(prompt, GREEDY)[0].text == target.generate(prompt, GREEDY)[0].text
    assert llm.engine.drafter.num_proposed > 0


def test_limits_and_stop_strings_cut_inside_a_speculative_step(paths, target):
    prompt = _prompts(target)[1]
    engine = _speculative(paths, "target", k=4)
    for max_tokens in (1, 2, 7):  # 7 = one full step of 5 tokens, then 2 more than the next may hold
        params = tinylm.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        assert _run(engine, [prompt], params)[0]["0"] == target.generate([prompt], params)[0].token_ids
    full = target.generate([prompt], GREEDY)[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    params = tinylm.SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=[stop])
    llm = tinylm.load(paths["target"], draft=paths["target"], num_speculative_tokens=4)
    result = llm.generate([prompt], params)[0]
    assert result.text == target.generate([prompt], params)[0].text and result.finish_reason == "stop"


def test_logprobs_and_seeded_sampling(paths, target):
    params = tinylm.SamplingParams(max_tokens=12, temperature=0.9, top_k=40, seed=7, logprobs=2, ignore_eos=True)
    llm = tinylm.load(paths["target"], draft=paths["other"])
    first, second = (llm.generate(_prompts(target), params) for _ in range(2))
    assert [o.token_ids for o in first] == [o.token_ids for o in second]  # a seed reproduces the draws
    for output in first:
        assert len(output.token_ids) == 12 and len(output.logprobs) == 12
        assert all(lp.token_id == t and lp.logprob <= 0 and len(lp.top) == 2
                   for lp, t in zip(output.logprobs, output.token_ids))
    greedy = tinylm.SamplingParams(max_tokens=8, temperature=0, logprobs=1, ignore_eos=True)
    mine, theirs = llm.generate(_prompts(target), greedy)[2], target.generate(_prompts(target), greedy)[2]
    for a, b in zip(mine.logprobs, theirs.logprobs):  # the target's raw scores, as without a draft
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_penalized_requests_decode_plainly(paths, target):
    params = tinylm.SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.3, ignore_eos=True)
    engine = _speculative(paths, "target")
    out, _ = _run(engine, _prompts(target), params)
    assert [out[str(i)] for i in range(4)] == [o.token_ids for o in target.generate(_prompts(target), params)]
    assert engine.drafter.num_proposed == 0


def test_a_mixed_batch_matches(paths, target):
    """Penalized, speculating and nearly finished rows in one batch: each gets the tokens it gets alone."""
    params = [tinylm.SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.3, ignore_eos=True),
              GREEDY, tinylm.SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), GREEDY]
    prompts = _prompts(target)
    engine = _speculative(paths, "target", k=2)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, p)
    out = {str(i): [] for i in range(4)}
    while engine.has_unfinished():
        for output in engine.step():
            out[output.request_id].append(output.token_id)
    assert [out[str(i)] for i in range(4)] == [o.token_ids for o in target.generate(prompts, params)]
    assert engine.drafter.num_accepted > 0


def test_a_small_cache_preempts_and_still_matches(paths, target):
    from tinylm.engine.kv_pool import KVPool

    per_block = KVPool.bytes_per_block(target.config, 4, torch.float32)
    engine = _speculative(paths, "other", k=3, block_size=4, kv_cache_bytes=per_block * 16)
    prompts = _prompts(target)
    out, _ = _run(engine, prompts)
    assert [out[str(i)] for i in range(len(prompts))] == [o.token_ids for o in target.generate(prompts, GREEDY)]


def test_abort_releases_the_draft_cache(paths, target):
    engine = _speculative(paths, "other")
    engine.add_request("a", _prompts(target)[0], GREEDY)
    for _ in range(3):
        engine.step()
    assert "a" in engine.drafter.shadows
    engine.abort("a")
    assert not engine.drafter.shadows and engine.drafter.blocks.num_free == engine.drafter.blocks.num_blocks - 1


def test_bad_drafts_are_refused(paths, target):
    with pytest.raises(ConfigError, match="Gated DeltaNet"):
        tinylm.load(paths["target"], draft=paths["hybrid"])
    other = tinylm.load(paths["other"]).model
    other.config.vocab_size = 500  # another tokenizer's vocabulary
    with pytest.raises(ConfigError, match="vocabulary"):
        LLMEngine(target.model, target.tokenizer, target.eos_token_ids, draft_model=other)
    with pytest.raises(ValueError, match="at least 1"):
        _speculative(paths, "other", k=0)
    with pytest.raises(ValueError, match="draft_quantize"):
        tinylm.load(paths["target"], draft_quantize="int8")


def test_a_draft_with_another_tokenizer_is_refused(paths, smollm2_gguf):
    """The default model's vocabulary is 49152 tokens, the tiny models' 512: resized to match, the ids would still
    mean other tokens."""
    from tinylm.llm_loading import check_same_tokens

    target, other = tinylm.load(paths["target"]), tinylm.load(smollm2_gguf)
    with pytest.raises(ConfigError, match="tokenizer"):
        check_same_tokens(target.tokenizer, other.tokenizer)
    check_same_tokens(target.tokenizer, tinylm.load(paths["other"]).tokenizer)  # the same tokenizer: accepted


def _counts(draws, size):
    return torch.bincount(torch.tensor(draws), minlength=size).double() / len(draws)


@pytest.mark.parametrize("one_hot", [False, True])  # True: drafts without q (prompt lookup), fixed tokens
@pytest.mark.parametrize("params", [tinylm.SamplingParams(temperature=1.0),
                                    tinylm.SamplingParams(temperature=0.7, top_k=4, top_p=0.95)])
def test_verify_keeps_the_target_distribution(params, one_hot):
    """Whatever the draft proposes, the first emitted token is distributed as the target's p_1, and the token
    after an accepted first draft as p_2 (the residual draw makes up for rejected drafts)."""
    from tinylm.engine import sampler

    vocab, trials = 6, 30000
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, vocab, generator=gen) * 2  # target, at the last token and at 2 drafts
    q = torch.softmax(torch.randn(2, vocab, generator=gen) * 2, dim=-1)  # the draft's distributions
    p = sampler.probabilities(logits, [params] * 3)
    first, second = [], []
    for _ in range(trials):
        drafts = [2, 3] if one_hot else [int(torch.multinomial(q[j], 1, generator=gen)) for j in range(2)]
        tokens = verify(logits, drafts, None if one_hot else q, params, gen)
        assert 1 <= len(tokens) <= 3 and tokens[:-1] == drafts[:len(tokens) - 1]
        first.append(tokens[0])
        if len(tokens) > 1:
            second.append(tokens[1])
    assert torch.allclose(_counts(first, vocab), p[0].double(), atol=0.012)
    assert len(second) > trials // 10
    assert torch.allclose(_counts(second, vocab), p[1].double(), atol=0.02)


def test_compiled_drafts_and_verification_give_eager_tokens(paths, target):
    """Compiled, the draft's steps and the target's verification (k + 1 rows per sequence) run through the decode
    graphs: the tokens stay the target's own."""
    prompts = _prompts(target)
    engine = _speculative(paths, "other", k=3, compile=True)
    assert engine.runner.compiled is not None and engine.drafter.runner.compiled is not None
    out, _ = _run(engine, prompts[:1])  # batch 1 first: the draft's batch-1 graph, a verification batch of 4
    out2, _ = _run(engine, prompts)
    expected = [o.token_ids for o in target.generate(prompts, GREEDY)]
    assert [out["0"]] + [out2[str(i)] for i in range(len(prompts))] == expected[:1] + expected
    assert not engine.runner.compiled.failed and not engine.drafter.runner.compiled.failed
