"""A GGUF file's Q4_0-Q8_0 and Q4_K-Q6_K weights kept as blocks (tinylm/model/block_linear.py) when dtype
"auto" computes in float32 on a CPU without native bfloat16: every such layer's product is bitwise the float32 product
of the weight gguf-py dequantizes, so logits and tokens are exactly those of the float32 model (`dtype="float32"`), for
the default model and tiny models of every family; fused and compiled too. Checked on every host by pretending the
CPU has no native bfloat16."""

from __future__ import annotations

import pytest
import torch

import tinylm
from tests.helpers import assert_compiled_gives_eager_tokens, assert_same_model
from tinylm import SamplingParams, kernels, llm_loading
from tinylm.model.block_linear import BlockEmbedding, BlockLinear

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs tinylm's kernels (a C++ compiler)")


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(llm_loading, "native_bf16", lambda device: False)


def block_layers(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, BlockLinear)]


def test_the_default_model_runs_on_its_blocks_as_its_float32_model(no_native_bf16, smollm2_gguf):
    llm = tinylm.load(smollm2_gguf, compile=False)
    # its own float32 reference: the session's shared default_llm may be attached to a test server's engine
    default_llm = tinylm.load(smollm2_gguf, dtype="float32", compile=False)
    model = llm.model
    assert llm.dtype == torch.float32
    assert isinstance(model.lm_head, BlockLinear) and model.lm_head.bits == 8  # the Q8_0 tied embedding / head
    assert isinstance(model.model.embed_tokens, BlockEmbedding)
    assert len(block_layers(model)) == 7 * model.config.num_hidden_layers + 1  # every Q4_1 projection, the head
    stored = sum(t.numel() * t.element_size() for t in model.buffers())
    assert stored < 120e6  # ~111 MB: 540 MB as float32, 270 MB as bfloat16
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345], [1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(logits, default_llm.model(ids).logits)
        assert torch.equal(model(ids[:1]).logits[0], logits[0])  # batch invariant
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = ["The capital of France is", "1, 2, 3,"]
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == [o.outputs[0].token_ids for o in default_llm.generate(prompts, params)]


def test_an_explicit_float32_or_batch_invariance_off_keeps_float_layers(no_native_bf16, smollm2_gguf):
    assert not block_layers(tinylm.load(smollm2_gguf, dtype="float32", compile=False).model)
    assert not block_layers(tinylm.load(smollm2_gguf, compile=False, batch_invariant=False).model)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe", "qwen3_next"])
def test_every_family_on_blocks_is_its_float32_model(no_native_bf16, family, qtype, tmp_path):
    """Tiny models of each family written as quantized GGUF (llama's permuted q/k rows, qwen2's biases, MoE experts
    kept float, DeltaNet's projections): logits, and the engine's tokens (prefill and decode steps)."""
    from tinylm.tiny import make_tiny
    from tinylm.weights.gguf_writer import convert_hf_to_gguf

    path = convert_hf_to_gguf(make_tiny(family, tmp_path / family, seed=3), tmp_path / f"{family}.gguf", qtype)
    llm = tinylm.load(path, compile=False)
    names = block_layers(llm.model)
    assert len(names) >= 2 * llm.config.num_hidden_layers and not any(".experts." in n for n in names)
    embedding = llm.model.model.embed_tokens  # tied (qwen2, qwen3, qwen3_next) or its own blocks (llama, qwen3_moe)
    assert isinstance(embedding, BlockEmbedding) and hasattr(embedding, "table") != llm.config.tie_word_embeddings
    reference = tinylm.load(path, dtype="float32", compile=False)
    with torch.no_grad():  # routed experts are stacked float layers: stored in bfloat16 (test_bfloat16_weights.py)
        for name, module in reference.model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".experts." in name:
                module.weight.data = module.weight.data.to(torch.bfloat16).float()
    assert_same_model(llm, reference)


Q4_K_M = {"blk.0.attn_v.weight": "Q6_K", "blk.0.ffn_down.weight": "Q6_K", "token_embd.weight": "Q6_K"}


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q4_K_M"])
def test_k_quant_and_5_bit_files_on_blocks_are_their_float32_model(no_native_bf16, qtype, tmp_path):
    """Q4_K (256 columns, 8 sub-blocks of 32 with 6-bit scales and mins) as 4-bit blocks with float32 scales d * sc and
    mins -dmin * m, Q5_K and Q5_1 as 8-bit codes with mins, Q6_K as 8-bit codes with a scale per 16 columns, Q5_0 as
    codes q - 16, and a Q4_K_M-like mix (Q4_K with Q6_K v / down / embedding: q/k/v are then not fused): random
    blocks of a one-layer llama file (q/k rows permuted) give the logits and tokens of the float32 model gguf-py
    dequantizes, bitwise."""
    from gguf import GGMLQuantizationType as QType

    from tests.weights.conftest import write_tiny

    path = tmp_path / f"{qtype}.gguf"
    mix = {name: QType[kind] for name, kind in Q4_K_M.items()} if qtype == "Q4_K_M" else None
    write_tiny(path, arch="llama", qtype=QType[qtype.removesuffix("_M")], seed=3, qtypes=mix)
    llm = tinylm.load(path, compile=False)
    assert len(block_layers(llm.model)) == 8  # 7 projections and the head, tied to the embedding
    reference = tinylm.load(path, dtype="float32", compile=False)
    ids = torch.tensor([[5, 77, 200, 12, 9, 101, 44, 2], [17, 250, 3, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        assert torch.equal(llm.model(ids).logits, reference.model(ids).logits)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(ids.tolist(), params)]
    assert got == [o.outputs[0].token_ids for o in reference.generate(ids.tolist(), params)]
    from tinylm.model.fuse import fuse_projections  # as the compiled step runs them: joined where forms agree

    assert fuse_projections(llm.model) == (1 if mix else 2)  # the mix: gate/up only (its v is Q6_K, q/k Q4_K)
    with torch.no_grad():
        assert torch.equal(llm.model(ids).logits, reference.model(ids).logits)


def test_compiled_fused_decode_on_blocks_gives_the_eager_tokens(no_native_bf16, tmp_path):
    from tinylm.tiny import make_tiny
    from tinylm.weights.gguf_writer import convert_hf_to_gguf

    path = convert_hf_to_gguf(make_tiny("llama", tmp_path / "llama", seed=5), tmp_path / "llama.gguf", "q4_1")
    llm = tinylm.load(path, compile=False)
    assert_compiled_gives_eager_tokens(llm)
    fused = [m for m in llm.model.modules() if isinstance(m, BlockLinear) and m.out_features > 64]
    assert fused and llm.model.model.layers[0].self_attn.qkv_proj is not None  # q/k/v joined on their blocks


def test_a_block_layers_float32_weight_is_never_built(no_native_bf16, smollm2_gguf, monkeypatch):
    """The loader reads Q4_0-Q8_0 and Q4_K-Q6_K weights straight into BlockLinear layers: none of them is
    dequantized (a 1.1B-parameter Q4_1 file would otherwise hold ~4.4 GB of float32 weights at the peak), and the file's
    memory map is closed once the model is loaded."""
    from tinylm.weights import gguf

    dequantized = []
    read = gguf.GGUFFile.read
    monkeypatch.setattr(gguf.GGUFFile, "read", lambda self, name: dequantized.append(name) or read(self, name))
    model = tinylm.load(smollm2_gguf, compile=False).model
    on_blocks = {f"{name}.weight" for name in block_layers(model)} | {"model.embed_tokens.weight"}
    assert dequantized and not on_blocks & set(dequantized)  # norms (F32) are read; no Q4_1 / Q8_0 weight is
    assert set(dequantized) | on_blocks >= {n for n in model.state_dict() if n.endswith(".weight")}
    assert not gguf._LAST_OPENED


def test_a_nan_scale_in_the_blocks_is_refused_at_load(no_native_bf16, tmp_path, monkeypatch):
    """check_finite covers the blocks' float32 scales and mins as it covers float weights: a NaN scale would make
    every product of its rows NaN."""
    from tinylm.errors import WeightsError
    from tinylm.tiny import make_tiny
    from tinylm.weights import gguf_blocks
    from tinylm.weights.gguf_writer import convert_hf_to_gguf

    path = convert_hf_to_gguf(make_tiny("llama", tmp_path / "llama", seed=5), tmp_path / "llama.gguf", "q4_1")
    read = gguf_blocks.read_blocks

    def corrupt(file, keep):
        found = read(file, keep)
        found["model.layers.1.mlp.up_proj.weight"].scales[3, 0] = float("nan")
        return found

    monkeypatch.setattr(gguf_blocks, "read_blocks", corrupt)
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.mlp\.up_proj\.scales holds NaN"):
        tinylm.load(path, compile=False)
    assert block_layers(tinylm.load(path, compile=False, check_finite=False).model)


def test_where_blocks_would_be_widened_by_scalar_code_the_weights_are_bfloat16(no_native_bf16, smollm2_gguf,
                                                                                monkeypatch):
    """On CPUs where the kernel has no vector widening (ARM builds), bfloat16 weights read faster than blocks."""
    assert torch.ops.tinylm.invariant_blocks_vectorized() in (True, False)
    monkeypatch.setattr(llm_loading, "blocks_pay", lambda: False)
    model = tinylm.load(smollm2_gguf, compile=False).model
    assert not block_layers(model) and model.lm_head.weight.dtype == torch.bfloat16


def test_lora_adapters_serve_on_block_layers(no_native_bf16, tmp_path):
    """An adapter of q_proj / down_proj served on a model whose projections are blocks: the tokens of the float32
    model with the adapter merged into its weights (scaling alpha / r = 2)."""
    import json

    from safetensors.torch import save_file

    from tinylm import LoRARequest
    from tinylm.tiny import make_tiny
    from tinylm.weights.gguf_writer import convert_hf_to_gguf
    from tinylm.weights.lora_files import peft_key

    path = convert_hf_to_gguf(make_tiny("llama", tmp_path / "llama", seed=7), tmp_path / "llama.gguf", "q4_1")
    llm = tinylm.load(path, compile=False)
    reference = tinylm.load(path, dtype="float32", compile=False)
    generator, tensors = torch.Generator().manual_seed(0), {}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = reference.model.get_submodule(name)
        a = torch.randn(4, layer.in_features, generator=generator) * 0.1
        b = torch.randn(layer.out_features, 4, generator=generator) * 0.5
        tensors[peft_key("llama", name, "lora_A")], tensors[peft_key("llama", name, "lora_B")] = a, b
        with torch.no_grad():
            layer.weight += (b @ a) * 2.0
        assert isinstance(llm.model.get_submodule(name), BlockLinear)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(tensors, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[5, 77, 300, 12], [17, 260, 3]]
    served = [o.outputs[0].token_ids
              for o in llm.generate(prompts, params, lora_request=LoRARequest("a", 1, str(adapter)))]
    assert served == [o.outputs[0].token_ids for o in reference.generate(prompts, params)]
    assert served != [o.outputs[0].token_ids for o in llm.generate(prompts, params)]  # the adapter changed something
