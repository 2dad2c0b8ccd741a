"""Compiled decode (torch.compile over the paged decode step) and fused projections change speed, not results:
greedy tokens equal the eager engine's, fused layers give the unfused logits, and a compiler failure falls back
to eager decoding with a warning instead of an error."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run_engine
import tinylm
from tinylm.engine.engine import EngineConfig, LLMEngine
from tinylm.model.fuse import fuse_projections
from tinylm.quant.apply import quantize_model
from tinylm.quant.policy import QuantPolicy

GREEDY = tinylm.SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
TEXTS = ["Once upon a time", "The capital of France is Paris. " * 3, "def add(a, b):", "Hi"]


@pytest.fixture(scope="module")
def tiny_dir(tiny_folder):
    return tiny_folder("qwen3", 3)


def _run(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    return run_engine(engine, prompts, GREEDY).tokens


def _generate(tiny_dir, compile_: bool, quantize=None, attention_kernel: bool = True,
              fallback: bool = False) -> list[list[int]]:
    # the library products' path (batch_invariant off): the compiled kernels these tests pick between
    llm = tinylm.load(tiny_dir, quantize=quantize, batch_invariant=False)
    engine = LLMEngine(llm.model, llm.tokenizer, llm.eos_token_ids,
                       EngineConfig(compile=compile_, batch_invariant=False))
    if engine.runner.compiled is not None:
        engine.runner.compiled.attention_kernel &= attention_kernel
    prompts = [llm.encode(t) for t in TEXTS]
    # batch 1 (its own graph), then a padded batch of 4 whose rows finish and join at different steps
    tokens = _run(engine, prompts[:1]) + _run(engine, prompts)
    assert not compile_ or engine.runner.compiled.failed == fallback  # decoded by the graphs unless told
    return tokens


@pytest.mark.parametrize("quantize", [None, "w8a8"])  # int8 compiled: tests/engine/test_batch_invariance.py
def test_compiled_decode_gives_eager_tokens(tiny_dir, quantize):
    eager = _generate(tiny_dir, False, quantize)
    compiled = _generate(tiny_dir, True, quantize)
    assert compiled == eager
    assert all(len(tokens) == GREEDY.max_tokens for tokens in compiled)


def test_compiled_decode_without_the_attention_kernel_gives_eager_tokens(tiny_dir):
    """Where tinylm's C++ kernels cannot be built, Inductor's own attention loops decode the same tokens."""
    assert _generate(tiny_dir, True, attention_kernel=False) == _generate(tiny_dir, False)


@pytest.mark.parametrize("policy", [None, "int8", "int4"])
def test_fused_projections_keep_logits(tiny_dir, policy):
    llm = tinylm.load(tiny_dir)
    if policy:
        quantize_model(llm.model, policy)
    ids = torch.tensor([llm.encode(TEXTS[1])])
    before = llm.forward(ids).logits
    assert fuse_projections(llm.model) == 2 * llm.config.num_hidden_layers  # q/k/v and gate/up per layer
    attention = llm.model.model.layers[0].self_attn
    assert attention.qkv_proj is not None and not hasattr(attention, "q_proj")
    torch.testing.assert_close(llm.forward(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_layers_of_different_schemes_stay_unfused(tiny_dir):
    llm = tinylm.load(tiny_dir)
    # q_proj in fp16, k/v and the MLP in int4: q/k/v cannot share one kernel, gate/up can
    policy = QuantPolicy("mixed", "int4", "int8", overrides=(("*.self_attn.q_proj", "fp16"),))
    quantize_model(llm.model, policy)
    ids = torch.tensor([llm.encode(TEXTS[1])])
    before = llm.forward(ids).logits
    assert fuse_projections(llm.model) == llm.config.num_hidden_layers
    layer = llm.model.model.layers[0]
    assert layer.self_attn.qkv_proj is None and layer.mlp.gate_up_proj is not None
    torch.testing.assert_close(llm.forward(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_compile_failure_falls_back_to_eager(tiny_dir, monkeypatch):
    eager = _generate(tiny_dir, False)

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(RuntimeWarning, match="decoding eagerly"):
        assert _generate(tiny_dir, True, fallback=True) == eager


@pytest.mark.parametrize("family", ["qwen3_next"])  # its MoE blocks too (top-1 of 2 experts, picked from stacks)
def test_hybrid_and_moe_models_compile_to_eager_tokens(tiny_folder, family):
    """Gated DeltaNet states (read and written in the pool by the graph) and experts picked from stacked weights
    decode the eager engine's tokens, at batch 1 and in a padded batch whose rows finish at different steps."""
    path = tiny_folder(family, 1)
    eager, compiled = _generate(path, False), _generate(path, True)
    assert compiled == eager
    assert all(len(tokens) == GREEDY.max_tokens for tokens in compiled)


def test_quantized_experts_decode_eagerly(load_tiny):
    llm = load_tiny("qwen3_moe", 1, quantize="int8")
    with pytest.warns(RuntimeWarning, match="mixture-of-experts"):
        engine = LLMEngine(llm.model, llm.tokenizer, llm.eos_token_ids, EngineConfig(compile=True))
    assert engine.runner.compiled is None
    assert len(_run(engine, [llm.encode("Hi there")])[0]) == GREEDY.max_tokens


def test_warmup_compiles_every_graph_before_requests(tiny_dir):
    from torch._dynamo.utils import counters

    llm = tinylm.load(tiny_dir)
    engine = LLMEngine(llm.model, llm.tokenizer, llm.eos_token_ids, EngineConfig(compile=True))
    torch._dynamo.reset()
    engine.warmup()
    compiled = engine.runner.compiled
    assert compiled._traced == {False, True} and not compiled.failed  # batch 1 and batched (compiled or loaded)
    graphs, loaded = counters["stats"]["unique_graphs"], compiled.loaded
    outputs = _run(engine, [llm.encode(t) for t in TEXTS])  # batch 4, then 3, 2, 1 as rows finish; growing S
    assert all(len(tokens) == GREEDY.max_tokens for tokens in outputs)
    assert counters["stats"]["unique_graphs"] == graphs and compiled.loaded == loaded  # no request paid for one


def test_float_weights_are_frozen_into_the_graphs_when_asked(tiny_dir, monkeypatch):
    """FREEZE_WEIGHTS (off by default: frozen graphs miss AOTAutograd's cache, so every start retraced them).
    Freezing needs Inductor's flag while dynamo traces, not only in the compile options (it was silently off):
    every weight of a float model becomes a constant, so neither graph takes one as an input."""
    import torch._inductor.freezing as freezing

    from tinylm.engine import compiled

    monkeypatch.setattr(compiled, "FREEZE_WEIGHTS", True)

    calls = []
    replace = freezing.replace_params_with_constants

    def spy(gm, flat_params, meta):
        kept = replace(gm, flat_params, meta)
        calls.append((len(flat_params), [i for i in kept if i < len(flat_params)]))
        return kept

    monkeypatch.setattr(freezing, "replace_params_with_constants", spy)
    llm = tinylm.load(tiny_dir)
    engine = LLMEngine(llm.model, llm.tokenizer, llm.eos_token_ids, EngineConfig(compile=True))
    torch._dynamo.reset()
    engine.warmup()
    assert len(calls) == 2 and all(count > 0 and not kept for count, kept in calls)
    assert torch._inductor.config.freezing is False  # the process-wide flag is left as it was


def test_each_engine_keeps_its_own_graphs(tiny_dir, tmp_path, monkeypatch):
    """Steps traced in the process (those that cannot be saved whole) are cached per engine: a second model
    compiled in the same process neither counts against the first one's recompile limit nor makes it recompile."""
    from tinylm.engine import saved_steps

    def not_saveable(*args):
        raise saved_steps.NotSaveable("as if the step had a graph break")

    monkeypatch.setattr(saved_steps, "path", lambda graph, key: tmp_path / f"{graph}.bin")  # none saved there
    monkeypatch.setattr(saved_steps, "compile", not_saveable)
    with torch._dynamo.config.patch(recompile_limit=2):  # exactly one engine's two graphs
        _compile_two_engines(tiny_dir)


def test_a_saved_step_serves_another_checkpoint_of_the_same_shape(tiny_folder, tmp_path, monkeypatch):
    """A saved step holds no weights: the engine that loads it decodes its own model's tokens (another seed's
    checkpoint of the same architecture), equal to that model's eager tokens."""
    from tinylm.engine import saved_steps

    folder = tmp_path / "steps"
    monkeypatch.setattr(saved_steps, "path", lambda graph, key: folder / f"{graph}-{key[:24]}.bin")
    tokens = []
    for seed, loaded in ((3, 0), (4, 2)):  # the first compiles and saves both steps, the second loads them
        llm = tinylm.load(tiny_folder("qwen3", seed))
        engine = LLMEngine(llm.model, llm.tokenizer, llm.eos_token_ids, EngineConfig(compile=True))
        engine.warmup()
        assert engine.runner.compiled.loaded == loaded and not engine.runner.compiled.failed
        prompts = [llm.encode(t) for t in TEXTS]
        eager = LLMEngine(llm.model, llm.tokenizer, llm.eos_token_ids, EngineConfig(compile=False))
        tokens.append(_run(engine, prompts))
        assert tokens[-1] == _run(eager, prompts)
    assert tokens[0] != tokens[1]  # two different models


def _compile_two_engines(tiny_dir) -> None:
    from torch._dynamo.utils import counters

    engines = []
    for dtype in ("float32", "bfloat16"):
        llm = tinylm.load(tiny_dir, dtype=dtype)
        engines.append((llm, LLMEngine(llm.model, llm.tokenizer, llm.eos_token_ids, EngineConfig(compile=True))))
    torch._dynamo.reset()
    for _, engine in engines:
        graphs = counters["stats"]["unique_graphs"]
        engine.warmup()
        assert counters["stats"]["unique_graphs"] == graphs + 2  # compiled, not refused by the limit
    graphs = counters["stats"]["unique_graphs"]
    for llm, engine in engines:
        assert all(len(t) == GREEDY.max_tokens for t in _run(engine, [llm.encode(t) for t in TEXTS]))
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_matches_sdpa(masked):
    from tinylm.model.attention import _decode_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 6, 1, 16), torch.randn(3, 2, 9, 16), torch.randn(3, 2, 9, 16)  # GQA: 3 heads per K/V
    mask = (torch.arange(9) < torch.tensor([[9], [4], [1]]))[:, None, None, :] if masked else None
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(_decode_attention(q, k, v, mask), expected, rtol=1e-5, atol=1e-5)
