"""The serving benchmark's load generator (tinylm/bench/load.py, a process of its own) against a real server, and
the engine thread's hand-off: one wake-up of the event loop per step, carrying every stream's output."""

from __future__ import annotations

import asyncio

import pytest

import tinylm
from tinylm.bench.serve import client_stamps, fresh_prompts
from tinylm.engine.async_engine import AsyncEngine
from tinylm.engine.engine import EngineConfig
from tinylm.server.app import ServerConfig

from .conftest import running_server

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def served(tiny_llm):
    config = ServerConfig(model_name="tiny", engine=EngineConfig(max_num_seqs=8, kv_cache_bytes=16 << 20))
    with running_server(tiny_llm, config) as (url, app):
        yield url, app


def test_clients_in_another_process_get_every_token(served):
    url, _ = served
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]
    stamps = client_stamps(url, prompts, new_tokens=7)
    assert [len(times) for times in stamps.tokens] == [7] * 4  # ignore_eos: exactly max_tokens each
    for times in stamps.tokens:
        assert times == sorted(times) and times[0] > 0


def test_a_refused_request_fails_the_run_in_one_line(served, tiny_llm):
    url, _ = served
    with pytest.raises(RuntimeError, match="HTTP 400"):
        client_stamps(url, [[tiny_llm.config.vocab_size + 5]], new_tokens=3)


def test_fresh_prompts_are_the_same_tokens_with_a_new_start_per_run():
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8]]
    first, second = fresh_prompts(prompts, 1), fresh_prompts(prompts, 2)
    assert [sorted(p) for p in first] == prompts == [sorted(p) for p in second]
    assert all(a[0] != b[0] != c[0] for a, b, c in zip(prompts, first, second))  # no prefix-cache hit between runs


def test_one_hand_over_per_step_carries_every_stream(load_tiny, monkeypatch):
    """Four streams decoding together reach the loop as one batch per step, not one wake-up per token, and each
    stream still gets its own tokens in order, equal to its tokens alone."""
    llm = load_tiny("llama", 7)  # an engine of its own (the module's server drives tiny_llm's)
    params = tinylm.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12]]
    expected = [out.outputs[0].token_ids
                for out in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    batches: list[int] = []
    hand_over = AsyncEngine._hand_over
    monkeypatch.setattr(AsyncEngine, "_hand_over", lambda self, batch: (batches.append(len(batch)),
                                                                         hand_over(self, batch)))
    engine = AsyncEngine(llm.engine_for(EngineConfig(max_num_seqs=8, kv_cache_bytes=16 << 20)))
    engine.start()
    try:
        tokens = asyncio.run(_read_shared_queue(engine, prompts, params))
    finally:
        engine.shutdown()
    assert tokens == expected
    assert max(batches) == 4 and len(batches) <= 6 + 1  # 6 tokens each: a step per token (+ one prefill apart)


async def _read_shared_queue(engine: AsyncEngine, prompts, params) -> list[list[int]]:
    queue: asyncio.Queue = asyncio.Queue()
    ids = [engine.open(prompt, params, queue, index) for index, prompt in enumerate(prompts)]
    tokens: list[list[int]] = [[] for _ in prompts]
    remaining = len(prompts)
    while remaining:
        index, output = await queue.get()
        tokens[index].append(output.token_id)
        remaining -= output.finish_reason is not None
    for request_id in ids:
        engine.close(request_id)
    return tokens
