"""Batch-invariant inference (issue 21, EngineConfig.batch_invariant, on by default): a request's tokens and every
logprob are the same bits alone, beside 15 others, arriving staggered, with its prompt cut into small prefill
chunks, after a prefix-cache hit, with a draft proposing tokens, and scored afterwards as a prompt (echo /
prompt_logprobs) or by `llm.forward`. Compared with `==`, never a tolerance: the built-in model (SmolLM2-135M) in
bfloat16 and float32, int8, w8a8 and int4; compiled decode on a tiny Llama (float, int8, w8a8, int4: compiling the
built-in model's 30 layers costs minutes on 2 cores); a tiny Qwen3-Next hybrid (Gated DeltaNet + MoE) and a tiny Qwen3-MoE."""

from __future__ import annotations

import pytest
import torch

import tinylm
from tests.helpers import run_engine
from tinylm import hub, kernels
from tinylm.engine.engine import EngineConfig
from tinylm.engine.kv_pool import KVPool
from tinylm.loading import load_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ toolchain to build tinylm's kernels")

TOPICS = ["the sea", "a robot", "Paris", "mathematics", "a cat", "winter", "coffee", "the moon", "trains", "music",
          "a garden", "history", "rain", "chess", "bread", "the stars"]
GREEDY = tinylm.SamplingParams(max_tokens=12, temperature=0.0, logprobs=2, ignore_eos=True)


def _chat_prompts(llm, count: int = 16) -> list[list[int]]:
    texts = [f"Write one sentence about {topic}." for topic in TOPICS[:count]]
    return [llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                                                   add_generation_prompt=True))
            for t in texts]


def _token_prompts(count: int = 16) -> list[list[int]]:
    """Prompts of 3 to 33 tokens for the tiny models (ids below their vocabulary)."""
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, 250, (3 + 2 * i,), generator=gen).tolist() for i in range(count)]


def _trace(outputs) -> list[tuple]:
    """Each request's (token ids, [(chosen logprob, top-2 alternatives)]) from its StepOutputs."""
    return [tuple((o.token_id, o.logprob.logprob, tuple(o.logprob.top)) for o in request) for request in outputs]


def _together(engine, prompts, params=GREEDY) -> list[tuple]:
    return _trace(run_engine(engine, prompts, params).outputs)


def _alone(engine, prompts, params=GREEDY) -> list[tuple]:
    return [_together(engine, [prompt], params)[0] for prompt in prompts]


def _staggered(engine, prompts, params=GREEDY) -> list[tuple]:
    """A new request joins after every step, so each one's steps meet a different set of neighbours."""
    outputs: list[list] = [[] for _ in prompts]
    waiting = list(enumerate(prompts))
    while waiting or engine.has_unfinished():
        if waiting:
            index, prompt = waiting.pop(0)
            engine.add_request(str(index), prompt, params)
        for output in engine.step():
            outputs[int(output.request_id)].append(output)
    return _trace(outputs)


def _scored(llm, prompts, traces) -> list[list[float]]:
    """The logprobs of each prompt's generated tokens, scored as part of a prompt (prompt_logprobs)."""
    params = tinylm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    scored = []
    for prompt, trace in zip(prompts, traces):
        tokens = [token for token, _, _ in trace]
        result = llm.generate([prompt + tokens], params)[0]
        entries = result.prompt_logprobs[len(prompt):]
        scored.append([entry[token].logprob for entry, token in zip(entries, tokens)])
    return scored


def _forward_logprobs(llm, prompts, traces) -> list[list[float]]:
    """The same logprobs from llm.forward over prompt + generated tokens, all rows in one left-padded batch."""
    rows = [prompt + [token for token, _, _ in trace] for prompt, trace in zip(prompts, traces)]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    logprobs = llm.forward(ids, attention_mask=mask).logits.float().log_softmax(dim=-1)
    out = []
    for row, (prompt, trace) in enumerate(zip(prompts, traces)):
        start = width - len(trace) - 1  # the position predicting the first generated token
        out.append([logprobs[row, start + i, token].item() for i, (token, _, _) in enumerate(trace)])
    return out


def _decoded_logprobs(traces) -> list[list[float]]:
    return [[logprob for _, logprob, _ in trace] for trace in traces]


def _engine(llm, **config):
    return llm.engine_for(EngineConfig(**{**vars(llm.engine_config), **config}))


def _preempted(llm, prompts, blocks: int) -> list[tuple]:
    """The prompts together in a K/V pool of `blocks` 4-token blocks: too small for all of them, so rows are
    preempted (their blocks freed) and later recomputed from their prompt and the tokens they had. No prefix
    cache: the shared chat template would let every prompt fit."""
    per_block = KVPool.bytes_per_block(llm.config, 4, llm.dtype)
    engine = _engine(llm, block_size=4, kv_cache_bytes=per_block * (blocks + 1), enable_prefix_caching=False)
    traces = _together(engine, prompts)
    assert engine.scheduler.num_preemptions > 0
    return traces


def _drafted(llm, draft="[ngram]"):
    """llm with a draft (prompt lookup by default), verification rows enough for every request's drafts (the
    default 16 rows take 4 requests of 3 drafts + 1: past that a step decodes plainly)."""
    config = EngineConfig(**{**vars(llm.engine_config), "speculative_max_rows": 64})
    drafted = tinylm.LLM(llm.loaded, engine_config=config, draft=draft)
    assert drafted.engine.speculation is not None
    return drafted


@pytest.fixture(scope="module")
def builtin_bf16():
    return tinylm.load(hub.resolve(hub.DEFAULT_MODEL), dtype="bfloat16")


def test_builtin_bf16_every_schedule_gives_the_same_bits(builtin_bf16):
    llm = builtin_bf16
    prompts = _chat_prompts(llm)
    alone = _alone(llm.engine, prompts)
    assert len({trace for trace in alone}) > 1  # the prompts do lead to different texts
    assert _together(llm.engine, prompts) == alone
    assert _staggered(llm.engine, prompts) == alone
    assert _together(_engine(llm, max_num_batched_tokens=16), prompts) == alone  # prompts cut into 16-token chunks
    assert _together(_engine(llm, max_num_seqs=3), prompts) == alone  # 3 at a time: the others wait
    assert _preempted(llm, prompts, blocks=30) == alone  # room for ~3 rows: the rest preempted and recomputed


def test_builtin_bf16_scoring_reproduces_decoding(builtin_bf16):
    llm = builtin_bf16
    prompts = _chat_prompts(llm, 6)
    traces = _together(llm.engine, prompts)
    assert _scored(llm, prompts, traces) == _decoded_logprobs(traces)
    assert _forward_logprobs(llm, prompts, traces) == _decoded_logprobs(traces)


def test_builtin_bf16_prefix_cache_hit_changes_nothing(builtin_bf16):
    llm = builtin_bf16
    engine = _engine(llm, enable_prefix_caching=True)
    shared = _chat_prompts(llm, 1)[0][:-6]  # a common system-and-user prefix, then different endings
    prompts = [shared + prompt[-6:] for prompt in _chat_prompts(llm, 8)]
    cold = _alone(_engine(llm, enable_prefix_caching=False), prompts)
    assert _together(engine, prompts[:1]) == cold[:1]  # fills the cache with the shared blocks
    assert engine.blocks.enable_prefix_caching
    assert _together(engine, prompts) == cold


def test_builtin_bf16_seeded_sampling_belongs_to_the_request(builtin_bf16):
    llm = builtin_bf16
    prompts = _chat_prompts(llm, 8)
    params = [tinylm.SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=100 + i, logprobs=0,
                                    ignore_eos=True) for i in range(8)]
    alone = [_together(llm.engine, [p], [q])[0] for p, q in zip(prompts, params)]
    assert _together(llm.engine, prompts, params) == alone


def test_builtin_bf16_greedy_speculation_changes_nothing(builtin_bf16):
    llm = builtin_bf16
    prompts = _chat_prompts(llm, 6)
    plain = _together(llm.engine, prompts)
    drafted = _drafted(llm)
    assert _together(drafted.engine, prompts) == plain
    assert drafted.engine.drafter.num_proposed > 0  # drafts were verified, not only allowed


@pytest.mark.parametrize("dtype", ["float32"])
def test_builtin_float32_alone_equals_together(dtype):
    llm = tinylm.load(hub.resolve(hub.DEFAULT_MODEL), dtype=dtype)
    prompts = _chat_prompts(llm, 8)
    alone = _alone(llm.engine, prompts)
    assert _together(llm.engine, prompts) == alone
    assert _scored(llm, prompts, alone) == _decoded_logprobs(alone)


def test_switched_off_the_engine_uses_the_library_products():
    loaded = load_model(hub.resolve(hub.DEFAULT_MODEL), dtype="bfloat16")
    llm = tinylm.LLM(loaded, engine_config=EngineConfig(batch_invariant=False))
    llm.engine  # noqa: B018 - builds the engine
    assert not getattr(llm.model, "batch_invariant", False)
    assert type(llm.model.lm_head) is torch.nn.Linear


@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3_moe"])
def test_hybrid_and_moe_every_schedule_gives_the_same_bits(load_tiny, arch):
    llm = load_tiny(arch, 3, dtype="bfloat16")
    prompts = _token_prompts()
    alone = _alone(llm.engine, prompts)
    assert _together(llm.engine, prompts) == alone
    assert _staggered(llm.engine, prompts) == alone
    assert _together(_engine(llm, max_num_batched_tokens=8), prompts) == alone
    assert _preempted(llm, prompts, blocks=12) == alone  # prompts of 3-33 tokens
    assert _scored(llm, prompts[:6], alone[:6]) == _decoded_logprobs(alone[:6])


def test_moe_prefix_cache_hit_and_greedy_speculation_change_nothing(tiny_folder):
    """The small MoE's experts after a prefix-cache hit and with drafts checked several tokens per step (the
    model drafting for itself: random weights never repeat their prompt, so prompt lookup would propose nothing).
    Hybrids keep neither: their recurrent state cannot be rebuilt from paged K/V or rolled back."""
    folder = tiny_folder("qwen3_moe", 3)
    llm = tinylm.load(folder, dtype="bfloat16")
    shared = list(range(10, 50))  # 40 tokens for the cache to share
    prompts = [shared + [60 + i, 70 + i] for i in range(8)]
    cold = _alone(_engine(llm, enable_prefix_caching=False), prompts)
    cached = _engine(llm, enable_prefix_caching=True)
    assert _together(cached, prompts[:1]) == cold[:1]  # fills the cache with the shared blocks
    assert _together(cached, prompts) == cold
    drafted = _drafted(llm, draft=load_model(folder, dtype="bfloat16"))
    assert _together(drafted.engine, prompts) == cold
    assert drafted.engine.drafter.num_proposed > 0


@pytest.mark.parametrize("arch,quantize,dtype", [("llama", None, "bfloat16"), ("llama", None, "float32"),
                                                 ("llama", "w8a8", "bfloat16"), ("llama", "int8", "bfloat16"),
                                                 ("llama", "int4", "bfloat16"), ("qwen3_next", None, "bfloat16"),
                                                 ("qwen3_moe", None, "bfloat16")])
def test_compiled_decode_equals_eager_prefill(load_tiny, arch, quantize, dtype):
    """The compiled step (batch-1 graph alone, batched graph together) gives the bits an eager prefill scores and
    llm.forward computes. The hybrid's DeltaNet mixing, its gated attention and the experts' routing run as C++
    kernels (deltanet_mix.cpp, invariant_rows.cpp, invariant_experts.cpp), the same call eagerly and compiled."""
    llm = load_tiny(arch, 5, dtype=dtype, quantize=quantize, compile=True)
    prompts = _token_prompts(6)
    alone = _alone(llm.engine, prompts)
    assert llm.engine.runner.compiled is not None and not llm.engine.runner.compiled.failed
    assert _together(llm.engine, prompts) == alone
    assert not llm.engine.runner.compiled.failed  # the batched graph compiled too (a fallback is eager == eager)
    assert _scored(llm, prompts, alone) == _decoded_logprobs(alone)
    if quantize is None:
        assert _forward_logprobs(llm, prompts, alone) == _decoded_logprobs(alone)


@pytest.mark.parametrize("quantize", ["int8", "w8a8", "int4"])
def test_builtin_quantized_alone_equals_together(quantize):
    """int8 weight-only, w8a8 (int8 activations per token, exact int32 sums) and int4 (tinylm's int4 x int8
    kernel for every row count): products whose float steps run in one order per row."""
    llm = tinylm.load(hub.resolve(hub.DEFAULT_MODEL), dtype="bfloat16", quantize=quantize)
    prompts = _chat_prompts(llm, 8)
    alone = _alone(llm.engine, prompts)
    assert _together(llm.engine, prompts) == alone
    assert _scored(llm, prompts, alone) == _decoded_logprobs(alone)  # prompts scored whole: chunking is the bf16 test's
