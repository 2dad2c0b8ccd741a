"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) quantized: int8 and w8a8 (int8 activations too, smoothed)
stay close to the float model and all of int8, w8a8 and int4 still know that the answer is "Paris".

int8 must answer it greedily. int4's and w8a8's greedy answers start at a near-tie ("The" vs "L'") that the
kernels' rounding decides, and the int4 kernel rounds differently on AVX2 and AVX-512 hosts: on an AVX512-BF16
EPYC both begin "L'Étoile ..." while int4's KL to the float model (0.002) is lower than int8's. So for int4 and
w8a8 the check is on the float model's own answer: after "The capital of France is", " Paris" must be the
quantized model's top token."""

from __future__ import annotations

import pytest

import tinylm
from tinylm.quant.quality import GATES, Reference, evaluate

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = tinylm.SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    return Reference(tinylm.load(smollm2_gguf, dtype="float32"))  # logits on the fixed text, once


@pytest.mark.parametrize("policy", ["int8", "w8a8", "int4"])
def test_quantized_default_model_is_close_and_answers_paris(smollm2_gguf, reference, policy):
    quantized = tinylm.load(smollm2_gguf, dtype="float32", quantize=policy)
    report = evaluate(reference, quantized, policy)
    assert report.passed, report.line()
    if policy in ("int8", "w8a8"):  # requantized per channel from the file's 4-bit values: close to lossless
        assert report.kl < GATES["int8"].max_kl and report.top1 > 0.93
    if policy == "int8":
        assert "Paris" in quantized.chat(QUESTION, GREEDY)[0].text
    prompt = quantized.apply_chat_template(QUESTION) + quantized.tokenizer.encode("The capital of France is", False)
    logits = quantized.forward([prompt]).logits[0, -1]
    assert quantized.tokenizer.decode([int(logits.argmax())]).strip() == "Paris"
