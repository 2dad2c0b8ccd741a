"""vLLM's offline API on tinylm: a vLLM script runs with only its import changed, and the sampling values vLLM
accepts (n, min_tokens, logit_bias, prompt_logprobs, any seed torch takes) mean what they mean there; values
that are not finite or not meaningful are refused. On a tiny random Llama with a working tokenizer."""

from __future__ import annotations

import math

import pytest
import torch

import tinylm
from tinylm import LLM, SamplingParams
from tinylm.engine import sampler
from tinylm.engine.stop import StopChecker
from tinylm.sampling_params import MIN_TEMPERATURE

GREEDY = dict(temperature=0.0, ignore_eos=True)

# A vLLM offline script; only its first line differs from vLLM's (`from vllm import LLM, SamplingParams`).
VLLM_SCRIPT = '''
from tinylm import LLM, SamplingParams

llm = LLM(model=MODEL_PATH, dtype="float32", seed=0, max_model_len=256, gpu_memory_utilization=0.5,
          tensor_parallel_size=1, trust_remote_code=True, enforce_eager=True)
params = SamplingParams(n=2, temperature=0.8, top_p=0.95, max_tokens=8, seed=0, logprobs=2, logit_bias={5: -100})
outputs = llm.generate(["Hello, my name is", "The capital of France is"], params, use_tqdm=False)
for output in outputs:
    prompt = output.prompt
    for completion in output.outputs:
        print(prompt, completion.text, completion.token_ids, completion.logprobs[0])

conversation = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hello! How can I assist you today?"},
    {"role": "user", "content": [{"type": "text", "text": "Write an essay about the importance of higher education."}]},
]
chat_outputs = llm.chat(conversation, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
print(chat_outputs[0].outputs[0].text)

scored = llm.generate({"prompt_token_ids": [5, 6, 7, 8]}, SamplingParams(max_tokens=1, prompt_logprobs=1))
print(scored[0].prompt_logprobs)
'''


@pytest.fixture(scope="module")
def model_path(tiny_folder):
    return str(tiny_folder("llama", 2))


@pytest.fixture(scope="module")
def llm(model_path):
    return LLM(model=model_path, dtype="float32")


def test_vllm_script_runs_with_only_its_import_changed(model_path, capsys):
    namespace = {"MODEL_PATH": model_path}
    exec(VLLM_SCRIPT, namespace)
    assert "The capital of France is" in capsys.readouterr().out
    outputs, llm = namespace["outputs"], namespace["llm"]
    assert [o.prompt for o in outputs] == ["Hello, my name is", "The capital of France is"]
    assert len({o.request_id for o in outputs}) == 2 and all(o.finished for o in outputs)
    for output in outputs:
        assert output.prompt_token_ids == llm.get_tokenizer().encode(output.prompt)
        assert output.prompt_logprobs is None
        assert [c.index for c in output.outputs] == [0, 1]
        for completion in output.outputs:
            _check_completion(completion, max_tokens=8, top=2)
            assert 5 not in completion.token_ids  # logit_bias -100
    chat = namespace["chat_outputs"][0]
    assert len(chat.outputs) == 1 and len(chat.outputs[0].token_ids) <= 6
    assert chat.outputs[0].logprobs is None and chat.outputs[0].cumulative_logprob is None
    scored = namespace["scored"][0]
    assert scored.prompt is None and scored.prompt_token_ids == [5, 6, 7, 8]
    assert scored.prompt_logprobs[0] is None and len(scored.prompt_logprobs) == 4


def _check_completion(completion, max_tokens: int, top: int) -> None:
    """vLLM's shapes: one {token id: Logprob} per token holding the chosen token and the top-N (ranks 1..N)."""
    assert 1 <= len(completion.token_ids) <= max_tokens
    assert completion.finish_reason in ("stop", "length") and completion.finished()
    assert len(completion.logprobs) == len(completion.token_ids)
    for token, entry in zip(completion.token_ids, completion.logprobs):
        assert token in entry and entry[token].rank >= 1
        assert sorted(lp.rank for lp in entry.values())[:top] == list(range(1, top + 1))
        assert len(entry) == top or (len(entry) == top + 1 and entry[token].rank > top)
        assert all(isinstance(lp.decoded_token, str) and lp.logprob <= 0 for lp in entry.values())
    chosen = [entry[token].logprob for token, entry in zip(completion.token_ids, completion.logprobs)]
    assert completion.cumulative_logprob == pytest.approx(sum(chosen))


def test_logprobs_are_the_models_and_ranked(llm):
    prompt = llm.encode("Once upon a time")
    out = llm.generate([prompt], SamplingParams(max_tokens=5, logprobs=3, seed=1))[0]
    logits = llm.forward([prompt + out.token_ids]).logits[0].float().log_softmax(-1)
    for step, (token, entry) in enumerate(zip(out.token_ids, out.outputs[0].logprobs)):
        row = logits[len(prompt) - 1 + step]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token].rank == int((row >= row[token]).sum())
        assert {t for t, lp in entry.items() if lp.rank <= 3} == set(row.topk(3).indices.tolist())
        assert out.logprobs[step].token_id == token  # tinylm's form is still there
        assert entry[token].decoded_token == llm.tokenizer.decode([token], skip_special_tokens=False)


def test_prompt_logprobs_equal_a_teacher_forced_forward(llm):
    prompt = llm.encode("The robot loved to read")
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=2, prompt_logprobs=2, n=2,
                                                                    seed=3))[0]
    logits = llm.forward([prompt]).logits[0].float().log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for position, entry in enumerate(out.prompt_logprobs[1:], start=1):
        token, row = prompt[position], logits[position - 1]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert {t for t, lp in entry.items() if lp.rank <= 2} >= set(row.topk(2).indices.tolist()) - {token}
    assert len(out.outputs) == 2


def test_greedy_equals_tinylm_load_and_the_loaded_model_form(llm, model_path):
    params = SamplingParams(max_tokens=10, **GREEDY)
    ours = llm.generate(["Once upon a time", "def add(a, b):"], params)
    loaded = tinylm.load(model_path)
    theirs = loaded.generate(["Once upon a time", "def add(a, b):"], params)
    assert [o.token_ids for o in ours] == [o.token_ids for o in theirs]
    assert [o.text for o in ours] == [o.outputs[0].text for o in theirs]
    assert LLM(loaded.loaded).generate("Once upon a time", params)[0].token_ids == ours[0].token_ids


def test_n_choices_use_seed_plus_index(llm):
    params = SamplingParams(n=3, max_tokens=8, seed=11, ignore_eos=True)
    out = llm.generate("Once upon a time", params)[0]
    for index, completion in enumerate(out.outputs):
        alone = llm.generate("Once upon a time", SamplingParams(max_tokens=8, seed=11 + index, ignore_eos=True))[0]
        assert completion.token_ids == alone.token_ids
    events = list(llm.stream("Hi", SamplingParams(n=2, max_tokens=3, seed=1, ignore_eos=True)))
    assert sorted({e.choice for e in events}) == [0, 1] and len(events) == 6


@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 1e-6])
def test_tiny_temperature_is_raised_as_vllm_does(llm, temperature):
    """logits / 1e-45 overflowed to inf and NaN (end-of-text tokens, empty text); vLLM raises it to 0.01."""
    with pytest.warns(UserWarning, match="raised"):
        params = SamplingParams(max_tokens=8, temperature=temperature, ignore_eos=True, seed=0)
    assert params.temperature == MIN_TEMPERATURE
    tiny = llm.generate("Once upon a time", params)[0]
    same = llm.generate("Once upon a time", SamplingParams(max_tokens=8, temperature=MIN_TEMPERATURE,
                                                           ignore_eos=True, seed=0))[0]
    assert len(tiny.token_ids) == 8 and tiny.token_ids == same.token_ids


def test_small_temperature_keeps_the_distribution_finite():
    logits = torch.tensor([[30.0, 29.99, -5.0, 0.0], [80.0, -80.0, 3.0, 2.0]])
    for temperature in (1e-5, 1e-3, 0.01, 0.02):
        probs = sampler.probabilities(logits, [SamplingParams(temperature=temperature)] * 2)
        assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(2))
        assert probs.argmax(-1).tolist() == [0, 0]
    cold = sampler.probabilities(logits, [SamplingParams(temperature=0.02)] * 2)
    assert cold[0, 0] == pytest.approx(1 / (1 + math.exp(-0.5)), rel=1e-5)  # exp(-0.01 / 0.02)


@pytest.mark.parametrize("seed", [2 ** 64 - 1, -(2 ** 63), -1, 0])
def test_every_seed_torch_takes_is_accepted(llm, seed):
    params = SamplingParams(n=2, max_tokens=4, seed=seed, ignore_eos=True)  # seed + 1 wraps past 2**64 - 1
    first, again = (llm.generate("Hi", params)[0] for _ in range(2))
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]


@pytest.mark.parametrize("seed", [2 ** 64, 2 ** 70, -(2 ** 63) - 1, 1.5, True])
def test_seeds_outside_torchs_range_are_refused(seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[-2\*\*63, 2\*\*64 - 1\]"):
        SamplingParams(seed=seed)


def test_logit_bias_is_added_before_sampling(llm):
    prompt = "Once upon a time"
    greedy = llm.generate(prompt, SamplingParams(max_tokens=8, **GREEDY))[0].token_ids
    banned = llm.generate(prompt, SamplingParams(max_tokens=8, logit_bias={t: -100 for t in greedy}, **GREEDY))[0]
    assert not set(banned.token_ids) & set(greedy)
    forced = llm.generate(prompt, SamplingParams(max_tokens=5, logit_bias={7: 100}, seed=0, ignore_eos=True))[0]
    assert forced.token_ids == [7] * 5
    # the reported logprobs stay the model's own (vLLM's raw logprobs), not the biased ones
    scored = llm.generate(prompt, SamplingParams(max_tokens=1, logit_bias={7: 100}, logprobs=0, **GREEDY))[0]
    assert scored.token_ids == [7] and scored.outputs[0].logprobs[0][7].logprob < -1  # biased: about 0


def test_min_tokens_masks_eos_and_stop_ids_until_reached(llm):
    eos = next(iter(llm.eos_token_ids))
    # EOS pushed to the top: without min_tokens the first token ends the request
    params = dict(temperature=0.0, max_tokens=10, logit_bias={eos: 100})
    assert llm.generate("Hi", SamplingParams(**params))[0].token_ids == [eos]
    out = llm.generate("Hi", SamplingParams(min_tokens=3, **params))[0]
    assert len(out.token_ids) == 4 and out.token_ids[-1] == eos and eos not in out.token_ids[:3]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason is None  # EOS: None, as vLLM
    first = llm.generate("Hi", SamplingParams(max_tokens=10, temperature=0.0))[0].token_ids[0]
    stop = dict(temperature=0.0, max_tokens=10, stop_token_ids=[first], logit_bias={first: 50})
    assert llm.generate("Hi", SamplingParams(**stop))[0].token_ids == [first]
    late = llm.generate("Hi", SamplingParams(min_tokens=3, **stop))[0]
    assert first not in late.token_ids[:3] and late.token_ids[3:] == [first]
    assert late.finish_reason == "stop" and late.outputs[0].stop_reason == first


def test_min_tokens_ignores_stop_strings_inside_its_text(llm):
    ids = llm.encode(" the sea and the sea and more")
    full = llm.tokenizer.decode(ids)
    first = full.index("sea")
    second = full.index("sea", first + 1)
    inside = next(k for k in range(1, len(ids)) if "sea" in llm.tokenizer.decode(ids[:k]))  # tokens to the first

    def emitted(min_tokens: int) -> tuple[str, int, str | None]:
        checker = StopChecker(llm.tokenizer, SamplingParams(stop=["sea"], min_tokens=min_tokens), set())
        text = ""
        for count, token in enumerate(ids, start=1):
            delta, reason = checker.push(token)
            text += delta
            if reason:
                return text, count, checker.stop_reason
        return text, len(ids), None

    assert emitted(0)[0] == full[:first]
    text, count, reason = emitted(inside)
    assert text == full[:second] and count > inside and reason == "sea"


def test_speculative_decoding_routes_biased_requests_plainly(llm, model_path):
    spec = LLM(model=model_path, dtype="float32", speculative_config={"model": model_path,
                                                                       "num_speculative_tokens": 3})
    prompts = ["Once upon a time", "def add(a, b):", "Numbers 0 1 2 3"]
    params = [SamplingParams(max_tokens=8, logit_bias={7: 5.0}, **GREEDY),
              SamplingParams(max_tokens=8, min_tokens=4, stop_token_ids=[7], logit_bias={7: 100}, temperature=0.0),
              SamplingParams(max_tokens=8, **GREEDY)]
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    assert expected[1][4:] == [7]
    assert [o.token_ids for o in spec.generate(prompts, params)] == expected
    assert spec.engine.drafter.num_proposed > 0


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                                  "frequency_penalty"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_floats_are_refused(name, value):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})


@pytest.mark.parametrize("kwargs, words", [
    ({"logit_bias": {3: float("nan")}}, "logit_bias values"),
    ({"logit_bias": {3: float("inf")}}, "logit_bias values"),
    ({"logit_bias": {3: 100.5}}, r"logit_bias values must be in \[-100, 100\]"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias keys"),
    ({"logit_bias": {"3": 1.0}}, "logit_bias keys"),
    ({"min_tokens": 5, "max_tokens": 4}, r"min_tokens \(5\) must be <= max_tokens \(4\)"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"n": 0}, r"n must be an integer in \[1, 16\]"),
    ({"n": 17}, r"n must be an integer in \[1, 16\]"),
    ({"n": 2, "best_of": 3}, "best_of"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"spaces_between_special_tokens": False}, "spaces_between_special_tokens"),
])
def test_meaningless_values_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(**kwargs)


def test_unknown_sampling_arguments_are_named():
    with pytest.raises(TypeError, match="unsupported arguments bad_words, tempreature.*logit_bias"):
        SamplingParams(tempreature=0.5, bad_words=["x"])
    assert SamplingParams(n=2, best_of=2, min_tokens=1, presence_penalty=0.5, spaces_between_special_tokens=True).n == 2


def test_logit_bias_outside_the_vocabulary_is_refused(llm):
    vocab = llm.config.vocab_size
    with pytest.raises(ValueError, match=f"logit_bias token ids \\[{vocab}\\] are outside the vocabulary"):
        llm.generate("Hi", SamplingParams(logit_bias={vocab: 1.0}))


def test_constructor_refuses_what_it_cannot_honour(model_path):
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        LLM(model=model_path, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="swap_spcae"):
        LLM(model=model_path, swap_spcae=4)
    with pytest.raises(ValueError, match="max_model_len must be an integer in \\[2, 512\\]"):
        LLM(model=model_path, max_model_len=4096)
    with pytest.raises(ValueError, match="lora_request"):
        LLM(model=model_path).generate("Hi", lora_request=object())


def test_max_model_len_bounds_requests(model_path):
    short = LLM(model=model_path, max_model_len=16, dtype=torch.float32)
    out = short.generate([[3] * 12], SamplingParams(max_tokens=50, **GREEDY))[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    assert short.dtype == torch.float32
