"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) quantized: int8 stays close to the float model and both
int8 and int4 still answer "Paris"."""

from __future__ import annotations

import pytest

import tinylm
from tinylm.quant.quality import GATES, Reference, evaluate

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = tinylm.SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    return Reference(tinylm.load(smollm2_gguf, dtype="float32"))  # logits on the fixed text, once


@pytest.mark.parametrize("policy", ["int8", "int4"])
def test_quantized_default_model_is_close_and_answers_paris(smollm2_gguf, reference, policy):
    quantized = tinylm.load(smollm2_gguf, dtype="float32", quantize=policy)
    report = evaluate(reference, quantized, policy)
    assert report.passed, report.line()
    if policy == "int8":  # requantized per channel from the file's 4-bit values: close to lossless
        assert report.kl < GATES["int8"].max_kl and report.top1 > 0.93
    answer = quantized.chat(QUESTION, GREEDY)[0].text
    assert "Paris" in answer
