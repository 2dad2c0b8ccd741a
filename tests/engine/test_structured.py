"""Structured outputs inside the engine: every constrained reply matches its constraint on random tiny models
(which would write anything), under speculative decoding, on a Gated DeltaNet hybrid, an MoE and a quantized
model; a draft cannot smuggle a refused token past verification; a reasoning gate frees the text before it."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import run_engine
import tinylm
from tinylm.engine.engine import EngineConfig, LLMEngine
from tinylm.engine.ngram import NGRAM
from tinylm.engine.structured import ConstraintError
from tinylm.sampling_params import GuidedDecodingParams, SamplingParams, StructuredOutputsParams

WORDS = r"[a-z]{2,6}( [a-z]{2,6}){2}"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["n", "ok"],
          "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}}}


def words(temperature: float = 0.0, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=40, temperature=temperature, seed=3,
                          structured_outputs=StructuredOutputsParams(regex=WORDS), **kwargs)


@pytest.fixture(scope="module")
def target(tiny_folder):
    return tiny_folder("llama", 2)


def _texts(llm, engine, prompts, params) -> list[str]:
    run = run_engine(engine, [llm.encode(p) for p in prompts], params)
    return [llm.tokenizer.decode(tokens) for tokens in run.tokens]


PROMPTS = ["Once upon a time", "The capital of France is", "def add(a, b):", "Hi"]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_replies_match_their_regex(target, temperature):
    llm = tinylm.load(target)
    for text in _texts(llm, llm.engine, PROMPTS, words(temperature)):
        assert re.fullmatch(WORDS, text), text


@pytest.mark.parametrize("draft", ["self", NGRAM])
def test_speculation_keeps_constrained_greedy_tokens(target, draft):
    """The draft proposes what the unconstrained model would write; verification masks every position, so the
    tokens are those of plain constrained decoding (and still match)."""
    plain_llm = tinylm.load(target)
    plain = _texts(plain_llm, plain_llm.engine, PROMPTS, words())
    draft_model = NGRAM if draft == NGRAM else tinylm.load(target).model
    engine = LLMEngine(plain_llm.model, plain_llm.tokenizer, plain_llm.eos_token_ids,
                       EngineConfig(num_speculative_tokens=4, speculative_max_rows=64), draft_model=draft_model)
    assert _texts(plain_llm, engine, PROMPTS, words()) == plain
    if draft == "self":
        assert engine.drafter.num_proposed > engine.drafter.num_accepted  # some drafts were refused by the mask


@pytest.mark.parametrize("arch,quantize", [("qwen3_next", None), ("qwen3_moe", None), ("llama", "int8"),
                                           ("qwen2", "int4")])
def test_json_schema_holds_on_every_kind_of_model(tiny_folder, arch, quantize):
    llm = tinylm.load(tiny_folder(arch, 5), quantize=quantize)
    params = SamplingParams(max_tokens=40, temperature=0.8, seed=1,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
    for output in llm.generate(PROMPTS[:2], params, use_tqdm=False):
        reply = json.loads(output.outputs[0].text)
        assert set(reply) == {"n", "ok"} and 0 <= reply["n"] <= 99 and isinstance(reply["ok"], bool)


def test_choice_and_grammar_through_the_python_api(target):
    llm = tinylm.load(target)
    old_name = SamplingParams(max_tokens=8, temperature=0.9, seed=2,
                              guided_decoding=GuidedDecodingParams(choice=["alpha", "beta"]))
    assert llm.generate("Pick:", old_name, use_tqdm=False)[0].outputs[0].text in {"alpha", "beta"}
    lark = 'start: "x" NUM\nNUM: /[0-9]{2}/'
    params = SamplingParams(max_tokens=8, temperature=0.9, seed=2, structured_outputs=StructuredOutputsParams(grammar=lark))
    assert re.fullmatch(r"x[0-9]{2}", llm.generate("Pick:", params, use_tqdm=False)[0].outputs[0].text)


def test_bad_constraints_are_refused_before_queueing(target):
    llm = tinylm.load(target)
    for spec in (StructuredOutputsParams(regex="(["), StructuredOutputsParams(json={"type": "objectx"}),
                 StructuredOutputsParams(grammar="start: undefined_rule"), StructuredOutputsParams(json="{not json")):
        with pytest.raises(ConstraintError, match="invalid|not valid"):
            llm.engine.add_request("r", llm.encode("Hi"), SamplingParams(structured_outputs=spec))
        assert not llm.engine.has_unfinished()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])


def test_the_gate_frees_the_text_before_it(target):
    """A reasoning model's constraint starts after its end-of-thinking token: here a token pushed first by
    logit_bias stands for it; the reply is free up to it and matches the regex after it."""
    llm = tinylm.load(target)
    gate = llm.encode("!")[0]
    params = words(logit_bias={gate: 100.0})
    llm.engine.add_request("r", llm.encode("Hi"), params, constraint_gate=gate)
    tokens = []
    while llm.engine.has_unfinished():
        tokens += [out.token_id for out in llm.engine.step()]
    assert tokens[0] == gate
    assert re.fullmatch(WORDS, llm.tokenizer.decode(tokens[1:])), llm.tokenizer.decode(tokens)


def test_hostile_constraints_are_bounded(target):
    """Constraints built to blow up a compiler (exponential regex DFAs, a 20,000-value enum, deep nesting) compile
    within llguidance's limits or are refused with a message; none hangs the engine."""
    llm = tinylm.load(target)
    blowup = r"(a|b)*a(a|b){30}"
    params = SamplingParams(max_tokens=48, temperature=0, structured_outputs=StructuredOutputsParams(regex=blowup))
    text = llm.generate("x", params, use_tqdm=False)[0].outputs[0].text
    assert re.fullmatch("[ab]*", text) and (len(text) < 31 or text[-31] == "a")
    deep = {"type": "integer"}
    for _ in range(200):
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    with pytest.raises(ConstraintError, match="recursion"):
        llm.engine.grammars.compile(StructuredOutputsParams(json=deep))
    enum = StructuredOutputsParams(json={"enum": [f"v{i}" for i in range(20_000)]})
    reply = llm.generate("x", SamplingParams(max_tokens=16, temperature=0, structured_outputs=enum),
                         use_tqdm=False)[0].outputs[0].text
    assert re.fullmatch(r'"v[0-9]+"', reply)
