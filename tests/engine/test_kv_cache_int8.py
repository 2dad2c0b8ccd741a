"""The int8 K/V cache (EngineConfig.kv_cache_dtype="int8", tinylm/engine/kv_pool.py): rows stored as int8 codes and
a scale per row, within half a step of the original; the engine's tokens and log-probabilities stay close to the
model-dtype cache's; the compiled step (tinylm's attention kernel) decodes what the eager one (dequantized rows)
does; twice or more the tokens per memory budget; bad names refused before any weights are read."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run_engine
import tinylm
from tinylm.engine.engine import EngineConfig, LLMEngine
from tinylm.engine.kv_pool import KVPool, quantize_rows

TEXTS = ["Once upon a time", "The capital of France is Paris. " * 3, "def add(a, b):", "Hi"]


@pytest.fixture(scope="module")
def llm(load_tiny):
    return load_tiny("qwen3", 3)


def _run(llm, kv_cache_dtype: str, compile_: bool = False, texts=TEXTS, logprobs: int | None = None):
    """Greedy tokens and each chosen token's log-probability, per prompt (4 prompts decoded as one batch)."""
    engine = LLMEngine(llm.model, llm.tokenizer, llm.eos_token_ids,
                       EngineConfig(compile=compile_, kv_cache_dtype=kv_cache_dtype))
    params = tinylm.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=logprobs)
    run = run_engine(engine, [llm.encode(text) for text in texts], params)
    return [[(step.token_id, step.logprob) for step in outputs] for outputs in run.outputs]


def test_quantized_rows_are_within_half_a_step():
    rows = torch.randn(50, 3, 64) * torch.logspace(-3, 2, 50)[:, None, None]
    rows[7] = 0.0  # an all-zero row: scale 0, codes 0, no NaN
    codes, scales = quantize_rows(rows)
    assert codes.dtype == torch.int8 and scales.shape == (50, 3) and scales.dtype == torch.float32
    restored = codes.float() * scales[..., None]
    assert torch.isfinite(restored).all() and (restored[7] == 0).all()
    assert ((restored - rows).abs() <= scales[..., None] / 2 * (1 + 1e-5) + 1e-30).all()
    # the largest value of each row is kept exactly (up to float rounding of the scale)
    torch.testing.assert_close(restored.abs().amax(-1), rows.abs().amax(-1), rtol=1e-6, atol=0)


def test_engine_tokens_and_logprobs_stay_close_to_the_model_dtype_cache(llm):
    exact = _run(llm, "auto", logprobs=0)
    quantized = _run(llm, "int8", logprobs=0)
    for want, got in zip(exact, quantized):
        assert [t for t, _ in got] == [t for t, _ in want]
        assert max(abs(a.logprob - b.logprob) for (_, a), (_, b) in zip(want, got)) < 0.02


def test_compiled_decode_with_an_int8_cache_gives_eager_tokens(llm):
    """The compiled step reads codes and scales in tinylm's kernel; the eager step attends to dequantized rows."""
    eager = _run(llm, "int8")
    compiled = _run(llm, "int8", compile_=True)
    assert [[t for t, _ in row] for row in compiled] == [[t for t, _ in row] for row in eager]


def test_an_int8_cache_holds_more_tokens_per_budget(llm):
    engines = {kv: LLMEngine(llm.model, llm.tokenizer, llm.eos_token_ids, EngineConfig(kv_cache_dtype=kv))
               for kv in ("auto", "int8")}
    config = llm.model.config
    dim, itemsize = config.head_dim, llm.model.lm_head.weight.dtype.itemsize
    ratio = engines["int8"].capacity_tokens / engines["auto"].capacity_tokens
    assert ratio == pytest.approx(dim * itemsize / (dim + 4), rel=0.01)  # 64-wide bf16 rows: 128 / 68 bytes
    assert engines["int8"].pool.keys[0].dtype == torch.int8
    assert KVPool.bytes_per_block(config, 16, torch.int8) < KVPool.bytes_per_block(config, 16, torch.bfloat16)


def test_a_hybrid_model_quantizes_its_attention_layers_only(load_tiny):
    llm = load_tiny("qwen3_next", 1)
    exact, quantized = _run(llm, "auto", texts=TEXTS[:2]), _run(llm, "int8", texts=TEXTS[:2])
    assert [[t for t, _ in row] for row in quantized] == [[t for t, _ in row] for row in exact]


def test_an_unknown_cache_dtype_is_refused_before_loading(monkeypatch):
    monkeypatch.setattr("tinylm.llm.load_for_engine", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, int8"):
        tinylm.load("anything", kv_cache_dtype="fp8")
