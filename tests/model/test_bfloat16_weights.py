"""A GGUF file or a 16-bit checkpoint run by dtype "auto" on a CPU without native bfloat16 computes in float32 and
stores its float linear weights in bfloat16 (tinylm/llm_loading.py resolve_weight_dtype, tinylm/model/invariant.py
store_compact): every product is bitwise the float32 product of the weight rounded to bfloat16 once, so its logits and
tokens are exactly those of a float32 model holding the rounded weights. (A GGUF file's Q4_0-Q8_0 and Q4_K-Q6_K
weights keep their blocks instead, exactly: test_block_weights.py; the files here are written in F32.) Checked on every
host by pretending the CPU has no native bfloat16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tinylm
from tests.helpers import assert_compiled_gives_eager_tokens, assert_same_model
from tinylm import kernels, llm_loading
from tinylm.llm_loading import resolve_weight_dtype

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs tinylm's kernels (a C++ compiler)")


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(llm_loading, "native_bf16", lambda device: False)


def test_only_auto_on_a_gguf_file_without_native_bfloat16_narrows_weights(monkeypatch, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(llm_loading, "native_bf16", lambda device: False)
    assert resolve_weight_dtype("auto", gguf, "cpu", None) == torch.bfloat16
    assert resolve_weight_dtype("float32", gguf, "cpu", None) is None  # asked for float32: float32 weights
    assert resolve_weight_dtype("auto", gguf, "cpu", "int4") is None  # a policy decides the layers' formats
    assert resolve_weight_dtype("auto", tmp_path, "cpu", None) is None  # a folder: its own dtype
    assert resolve_weight_dtype("auto", gguf, "cuda", None) is None
    monkeypatch.setattr(llm_loading, "native_bf16", lambda device: True)
    assert resolve_weight_dtype("auto", gguf, "cpu", None) is None  # computes in bfloat16 there


def test_sixteen_bit_checkpoints_compute_in_float32_on_bfloat16_weights(monkeypatch, tmp_path):
    for stored, narrowed in (("bfloat16", torch.bfloat16), ("float16", torch.bfloat16), ("float32", None)):
        (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": stored}))
        monkeypatch.setattr(llm_loading, "native_bf16", lambda device: False)
        assert resolve_weight_dtype("auto", tmp_path, "cpu", None) == narrowed
        assert llm_loading.resolve_dtype("auto", tmp_path, "cpu") == "float32"
        monkeypatch.setattr(llm_loading, "native_bf16", lambda device: True)
        assert resolve_weight_dtype("auto", tmp_path, "cpu", None) is None
        assert llm_loading.resolve_dtype("auto", tmp_path, "cpu") == ("bfloat16" if stored != "float32" else stored)


def test_a_bfloat16_checkpoint_keeps_its_weights_exactly(no_native_bf16, tmp_path):
    """Stored in bfloat16, computed in float32: the weights are the checkpoint's own values (no rounding), so the
    logits are bitwise those of the checkpoint loaded in float32."""
    from safetensors.torch import load_file, save_file

    from tinylm.tiny import make_tiny

    folder = make_tiny("qwen3", tmp_path / "qwen3", seed=2)
    tensors = {name: t.to(torch.bfloat16) for name, t in load_file(folder / "model.safetensors").items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    (folder / "SHA256SUMS").unlink(missing_ok=True)  # rewritten files: no manifest
    llm = tinylm.load(folder, compile=False)
    assert llm.dtype == torch.float32 and llm.model.lm_head.weight.dtype == torch.bfloat16
    exact = tinylm.load(folder, dtype="float32", compile=False)
    ids = torch.tensor([[5, 77, 300, 12, 9, 101, 44, 2]])
    with torch.no_grad():
        assert torch.equal(llm.model(ids).logits, exact.model(ids).logits)


def rounded_float32_model(path: Path):
    """The float32 model with every linear weight but the MoE routers' rounded to bfloat16 and back (the reference)."""
    llm = tinylm.load(path, dtype="float32", compile=False)
    with torch.no_grad():
        for name, module in llm.model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith(("mlp.gate", "shared_expert_gate")):
                module.weight.data = module.weight.data.to(torch.bfloat16).float()
    return llm


def test_an_explicit_float32_keeps_float32_weights(no_native_bf16, default_llm):
    assert default_llm.model.lm_head.weight.dtype == torch.float32
    assert default_llm.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe", "qwen3_next"])
def test_every_gguf_family_with_bfloat16_weights_is_its_rounded_float32_model(no_native_bf16, family, tmp_path):
    """Tiny models of each family llama.cpp has, written as GGUF: attention, MoE experts (kept float32), DeltaNet's
    projections; the engine's tokens too (prefill and decode steps)."""
    from tinylm.tiny import make_tiny
    from tinylm.weights.gguf_writer import convert_hf_to_gguf

    path = convert_hf_to_gguf(make_tiny(family, tmp_path / family, seed=3), tmp_path / f"{family}.gguf", "f32")
    llm = tinylm.load(path, compile=False)
    assert llm.dtype == torch.float32 and llm.model.model.layers[0].mlp is not None
    linear = {name: m.weight.dtype for name, m in llm.model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert sum(dtype == torch.bfloat16 for dtype in linear.values()) >= 3 * llm.config.num_hidden_layers
    assert all(dtype == torch.float32 for name, dtype in linear.items() if name.endswith(("mlp.gate", "expert_gate")))
    reference = rounded_float32_model(path)
    assert_same_model(llm, reference)


def test_compiled_decode_with_bfloat16_weights_gives_the_eager_tokens(no_native_bf16, tmp_path):
    from tinylm.tiny import make_tiny
    from tinylm.weights.gguf_writer import convert_hf_to_gguf

    path = convert_hf_to_gguf(make_tiny("llama", tmp_path / "llama", seed=5), tmp_path / "llama.gguf", "f32")
    llm = tinylm.load(path, compile=False)
    assert llm.model.lm_head.weight.dtype == torch.bfloat16
    assert_compiled_gives_eager_tokens(llm)
    assert llm.model.lm_head.weight.dtype == torch.bfloat16  # fused projections keep the stored dtype
    fused = [m for m in llm.model.modules() if isinstance(m, torch.nn.Linear) and m.out_features > 64]
    assert fused and all(m.weight.dtype == torch.bfloat16 for m in fused)


def test_the_cli_gives_tinylm_load_its_own_auto_where_auto_means_float32(monkeypatch):
    """chat, serve, generate and bench load through cli_args.load_dtype: on a CPU without native bfloat16 their
    --dtype auto reaches tinylm.load as "auto" (so GGUF files get bfloat16 weights); elsewhere the CLI's choice."""
    from argparse import Namespace

    from tinylm import cli_args

    monkeypatch.setattr(cli_args, "native_bf16", lambda device: False)
    assert cli_args.load_dtype(Namespace(dtype="auto", device="cpu")) == "auto"
    assert cli_args.load_dtype(Namespace(dtype="float32", device="cpu")) == "float32"
    assert cli_args.load_dtype(Namespace(dtype="auto", device="cuda")) == "bfloat16"
    monkeypatch.setattr(cli_args, "native_bf16", lambda device: True)
    assert cli_args.load_dtype(Namespace(dtype="auto", device="cpu")) == "bfloat16"
