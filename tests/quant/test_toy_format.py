"""A quantization format added in one class and one scheme name, here in the test, with nothing else changed: a
model quantized with it loads, fuses q/k/v and gate/up, splits its MLPs into chunks, generates the tokens of the
float model holding its dequantized weights, and saves and loads back to the same logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import tinylm
from tinylm.model.fuse import concat_biases, fuse_projections
from tinylm.quant.checkpoint import save_quantized
from tinylm.quant.chunked import ChunkedMLP
from tinylm.quant.formats import QuantFormat, check_scales, expect, register, required
from tinylm.quant.policy import QuantPolicy

TOY = "int8-toy"
GREEDY = tinylm.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
IDS = torch.tensor([[5, 17, 99, 300, 2, 64, 128, 7], [9, 8, 7, 6, 5, 4, 3, 2]])


def absmax_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> q (N, K) int8 and one float32 scale for the whole tensor: w ~ q * scale."""
    scale = (weight.float().abs().max() / 127).clamp(min=1e-10)
    return (weight.float() / scale).round().clamp(-127, 127).to(torch.int8), scale


@register(TOY)
class ToyInt8Linear(QuantFormat):
    """Per-tensor absmax int8, run by dequantizing: y = x @ (q * scale)^T + bias. The tensor's one scale is kept
    per row, (N,), so that layers joined by fusion keep theirs. Saved as `toy_q` and `toy_scale`."""

    state_names = ("toy_q", "toy_scale")

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.dtype = dtype
        self.register_buffer("q", q)  # (N, K) int8
        self.register_buffer("scales", scales.float())  # (N,) float32
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), self.bias)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scales[:, None]

    @classmethod
    def quantize(cls, weight, bias, spec) -> ToyInt8Linear:
        q, scale = absmax_int8(weight[:])
        return cls(q, scale.expand(q.shape[0]), bias, spec.dtype)

    def state(self) -> dict[str, torch.Tensor]:
        return {"toy_q": self.q, "toy_scale": self.scales}

    @classmethod
    def from_state(cls, state, bias, spec) -> ToyInt8Linear:
        q, scales = required(state, spec.name, "toy_q", "toy_scale")
        expect(spec.name, "toy_q", q, spec.shape, torch.int8)
        check_scales(spec.name, scales, *spec.shape)
        return cls(q, scales, bias, spec.dtype)

    def split_rows(self, bounds) -> list[ToyInt8Linear]:
        return [ToyInt8Linear(self.q[a:b], self.scales[a:b], _part(self.bias, a, b), self.dtype) for a, b in bounds]

    def split_cols(self, bounds) -> list[ToyInt8Linear]:
        biases = [self.bias] + [None] * (len(bounds) - 1)
        return [ToyInt8Linear(self.q[:, a:b], self.scales, bias, self.dtype) for (a, b), bias in zip(bounds, biases)]

    @classmethod
    def concat_rows(cls, layers: list[ToyInt8Linear]) -> ToyInt8Linear:
        return cls(torch.cat([m.q for m in layers]), torch.cat([m.scales for m in layers]), concat_biases(layers),
                   layers[0].dtype)


def _part(bias: torch.Tensor | None, a: int, b: int) -> torch.Tensor | None:
    return None if bias is None else bias[a:b]


# Every linear layer in the toy format (MoE routers aside, none here); the embedding and tied head stay float.
POLICY = QuantPolicy("toy", default=TOY, embedding="float")

@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return tiny_folder("qwen2", 3)  # tied head, q/k/v biases


def _dequantized_float_model(folder):
    """The float model whose linear layers hold the toy format's dequantized weights (the embedding untouched)."""
    llm = tinylm.load(folder)
    for name, module in llm.model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            q, scale = absmax_int8(module.weight.detach())
            module.weight.data = q.float() * scale
    return llm


def test_a_format_defined_in_a_test_loads_fuses_generates_and_saves(tiny, tmp_path):
    toy = tinylm.load(tiny, quantize=POLICY)
    layer = toy.model.model.layers[0]
    assert type(layer.self_attn.q_proj) is ToyInt8Linear and type(layer.mlp.down_proj) is ToyInt8Linear
    reference = _dequantized_float_model(tiny)
    torch.testing.assert_close(toy.forward(IDS).logits, reference.forward(IDS).logits, rtol=1e-5, atol=1e-5)

    # saved before fusing (a fused model is never saved): its own tensor names, and the same logits back
    folder = save_quantized(toy.model, tmp_path / "toy", POLICY, toy.tokenizer)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as saved:
        names = set(saved.keys())
    assert {"model.layers.0.self_attn.q_proj.toy_q", "model.layers.0.self_attn.q_proj.toy_scale"} <= names
    assert "model.layers.0.self_attn.q_proj.weight" not in names
    again = tinylm.load(folder)
    assert type(again.model.model.layers[0].mlp.up_proj) is ToyInt8Linear
    assert torch.equal(again.forward(IDS).logits, toy.forward(IDS).logits)

    # fused q/k/v and gate/up (what a compiled engine does; an eager one, compile=False, does not fuse)
    expected = reference.generate(["Once upon a time", [1, 2, 3]], GREEDY)
    assert fuse_projections(toy.model) == 2 * toy.config.num_hidden_layers
    assert type(layer.self_attn.qkv_proj) is ToyInt8Linear and not hasattr(layer.self_attn, "q_proj")
    assert [r.token_ids for r in toy.generate(["Once upon a time", [1, 2, 3]], GREEDY)] == \
        [r.token_ids for r in expected]


def test_a_format_defined_in_a_test_splits_into_mlp_chunks(tiny):
    whole = tinylm.load(tiny, quantize=POLICY).forward(IDS).logits
    chunked = tinylm.load(tiny, quantize=QuantPolicy("toy", default=TOY, embedding="float", mlp_chunk=64))
    mlp = chunked.model.model.layers[0].mlp
    assert isinstance(mlp, ChunkedMLP) and len(mlp.down_chunks) == 2
    torch.testing.assert_close(chunked.forward(IDS).logits, whole, rtol=1e-5, atol=1e-5)
