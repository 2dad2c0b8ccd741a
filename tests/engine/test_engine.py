"""The continuous-batching engine on a tiny random model: outputs equal a no-cache reference whatever the batch,
chunking, preemption or prefix cache do; memory is freed; per-request parameters stay per request."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run_engine
import tinylm
from tinylm.engine.engine import EngineConfig, LLMEngine, QueueFullError

GREEDY = tinylm.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(load_tiny):
    return load_tiny("llama", 2)


@pytest.fixture(scope="module", params=["llama", "qwen3_next"])
def any_llm(request, load_tiny):
    """A softmax-attention model and a hybrid one (DeltaNet states live in the engine's state pool)."""
    return load_tiny(request.param, 2)


def _prompts(llm, count=6):
    texts = ["Once upon a time", "The capital of France is Paris. " * 3, "def add(a, b):", "Numbers 0 1 2 3 4 5",
             "The robot loved to read every day about the sea and the stars and the forest " * 2, "Hi"]
    return [llm.encode(t) for t in (texts * 3)[:count]]


def _reference(llm, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding by full forward passes, no cache: the obviously correct answer."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(llm.forward([ids]).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _run(engine: LLMEngine, prompts, params=GREEDY) -> dict[str, list[int]]:
    """Each prompt's tokens by request id ("0", "1", ...)."""
    return {str(i): tokens for i, tokens in enumerate(run_engine(engine, prompts, params).tokens)}


def _engine(llm, **config) -> LLMEngine:
    return LLMEngine(llm.model, llm.tokenizer, llm.eos_token_ids, EngineConfig(**config))


def _tokens_per_block_byte(llm, block_size):
    from tinylm.engine.kv_pool import KVPool

    return KVPool.bytes_per_block(llm.config, block_size, llm.dtype)


@pytest.mark.parametrize("config", [
    {},  # everything prefilled in one step, decoded together
    {"max_num_batched_tokens": 5, "block_size": 4},  # chunked prefill interleaved with decoding
    {"max_num_seqs": 2},  # requests join as others finish
], ids=["batched", "chunked-prefill", "two-at-a-time"])
def test_batched_greedy_equals_reference(any_llm, config):
    llm = any_llm
    prompts = _prompts(llm)
    out = _run(_engine(llm, **config), prompts)
    for i, prompt in enumerate(prompts):
        assert out[str(i)] == _reference(llm, prompt, GREEDY.max_tokens), f"request {i}"


def test_continued_chunk_next_to_a_fresh_prompt_equals_reference(any_llm):
    """A prompt split over two steps whose second, shorter chunk is left-padded next to a fresh prompt: the
    padding queries sit where the row's own earlier tokens are keys, so only the engine knows they are padding.
    (DeltaNet states once ran over that padding: greedy tokens still matched on tiny weights, logprobs did not.)"""
    llm = any_llm
    long, fresh = _prompts(llm, 5)[4], _prompts(llm, 2)[1]
    engine = _engine(llm, max_num_batched_tokens=len(long) - 4)  # step 1: long minus 4; step 2: 4 + fresh
    params = tinylm.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=0)
    outputs = {"0": [], "1": []}
    engine.add_request("0", long, params)
    engine.add_request("1", fresh, params)
    while engine.has_unfinished():
        for output in engine.step():
            outputs[output.request_id].append(output.logprob)
    for key, prompt in (("0", long), ("1", fresh)):
        tokens = [entry.token_id for entry in outputs[key]]
        logits = llm.forward([prompt + tokens]).logits[0, len(prompt) - 1:-1].float()  # (4, V) predicting each
        expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
        got = torch.tensor([entry.logprob for entry in outputs[key]])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_preemption_recomputes_and_changes_nothing(any_llm):
    llm = any_llm
    prompts = _prompts(llm)
    # Room for about two sequences at a time: the others are preempted and recomputed.
    per_block = _tokens_per_block_byte(llm, 4)
    engine = _engine(llm, block_size=4, kv_cache_bytes=per_block * 40)
    out = _run(engine, prompts)
    assert engine.scheduler.num_preemptions > 0
    for i, prompt in enumerate(prompts):
        assert out[str(i)] == _reference(llm, prompt, GREEDY.max_tokens)
    assert engine.blocks.num_free == engine.blocks.num_blocks - 1  # every block back


def test_prefix_cache_reuses_blocks_and_changes_nothing(llm):
    engine = _engine(llm, block_size=4)
    system = llm.encode("You are a helpful robot who loves the sea and the stars. " * 2)
    first = _run(engine, [system + llm.encode("Hello")])
    hits_before = engine.blocks.hits
    second = _run(engine, [system + llm.encode("Tell me a story")])
    assert engine.blocks.hits - hits_before >= len(system) // 4 * 4 - 4
    assert first["0"] == _reference(llm, system + llm.encode("Hello"), GREEDY.max_tokens)
    assert second["0"] == _reference(llm, system + llm.encode("Tell me a story"), GREEDY.max_tokens)


def test_abort_frees_everything_at_once(llm):
    engine = _engine(llm, block_size=4, max_num_batched_tokens=8)
    prompts = _prompts(llm, 4)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, tinylm.SamplingParams(max_tokens=200, ignore_eos=True))
    engine.step()
    engine.step()  # some in prefill, some decoding, some still queued
    for i in range(len(prompts)):
        assert engine.abort(str(i))
    assert not engine.has_unfinished() and not engine.scheduler.running and not engine.scheduler.waiting
    engine.blocks.reset_prefix_cache()
    assert engine.blocks.num_free == engine.blocks.num_blocks - 1
    assert engine.step() == []


def test_each_request_keeps_its_own_parameters(llm):
    prompts = _prompts(llm, 4)
    sampled = tinylm.SamplingParams(max_tokens=12, temperature=1.3, top_k=20, seed=7, ignore_eos=True)
    penalized = tinylm.SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.5,
                                      frequency_penalty=0.5, ignore_eos=True)
    mixed = _run(_engine(llm), prompts, [GREEDY, sampled, penalized, sampled])
    alone = {i: _run(_engine(llm), [prompts[i]], [p])["0"] for i, p in [(0, GREEDY), (1, sampled), (2, penalized)]}
    assert mixed["0"] == alone[0] == _reference(llm, prompts[0], 12)
    assert mixed["1"] == alone[1]  # seeded: the same draw whatever shares the batch
    assert mixed["2"] == alone[2] and mixed["2"] != mixed["0"]


def test_prompt_logprobs_equal_the_forward_pass(llm):
    prompt = _prompts(llm)[4]
    engine = _engine(llm, max_num_batched_tokens=7)  # the prompt is scored over several chunks
    engine.add_request("s", prompt, tinylm.SamplingParams(max_tokens=1, temperature=0), prompt_logprobs=2)
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    scored = outputs[0].prompt_logprobs
    expected = llm.forward([prompt]).logits[0].log_softmax(-1)
    assert scored[0] is None and len(scored) == len(prompt)
    for t in range(1, len(prompt)):
        assert scored[t].token_id == prompt[t]
        assert scored[t].logprob == pytest.approx(expected[t - 1, prompt[t]].item(), abs=1e-4)
        assert [i for i, _ in scored[t].top] == expected[t - 1].topk(2).indices.tolist()


def test_bad_requests_are_refused_before_they_run(llm):
    engine = _engine(llm, block_size=4, kv_cache_bytes=_tokens_per_block_byte(llm, 4) * 8, max_num_seqs=1,
                     max_queue=1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("a", [1, 10**6], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("a", [], GREEDY)
    with pytest.raises(tinylm.ContextLengthError, match="needs 40 tokens of KV cache; the cache holds 28"):
        engine.add_request("a", [1] * 30, tinylm.SamplingParams(max_tokens=10))
    engine.add_request("a", [1, 2], GREEDY)
    engine.add_request("b", [1, 2], GREEDY)  # one running, one waiting: what max_num_seqs=1, max_queue=1 allow
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.add_request("c", [1, 2], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [1, 2], GREEDY)


def test_stop_strings_and_finish_reasons(llm):
    prompt = _prompts(llm)[0]
    free = _run(_engine(llm), [prompt], tinylm.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))["0"]
    text = llm.tokenizer.decode(free)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    engine = _engine(llm)
    engine.add_request("s", prompt, tinylm.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=stop))
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert outputs[-1].finish_reason == "stop"
    assert "".join(o.text for o in outputs) == text[:text.index(stop)]
