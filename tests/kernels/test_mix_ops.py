"""Gated DeltaNet's whole token mixing (tinylm/kernels/deltanet_mix.cpp) and a mixture-of-experts block's routed
experts (tinylm/kernels/invariant_experts.cpp) as one C++ call each: the PyTorch forms' results (float32
tolerance; bfloat16 within its roundings), and the same bits for a row alone or in a batch, padded or not, and
for a prompt fed whole, in pieces or token by token (batch invariance)."""

from __future__ import annotations

import pytest
import torch

from tinylm import kernels
from tinylm.model.deltanet import mix_tokens
from tinylm.model.moe import invariant_experts

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs tinylm's C++ kernels")

K_HEADS, K_DIM, V_HEADS, V_DIM, TAPS = 2, 16, 4, 24, 4  # D_v not a multiple of the vector width
CHANNELS = 2 * K_HEADS * K_DIM + V_HEADS * V_DIM


def mix_inputs(batch=3, steps=13, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    tensors = dict(qkv=randn(batch, steps, CHANNELS), z=randn(batch, steps, V_HEADS, V_DIM), b=randn(batch, steps, V_HEADS),
                   a=randn(batch, steps, V_HEADS), conv_state=randn(batch, CHANNELS, TAPS - 1),
                   recurrent_state=torch.randn(batch, V_HEADS, K_DIM, V_DIM, generator=gen) * 0.1)
    params = dict(conv_weight=randn(CHANNELS, 1, TAPS, scale=0.5), A_log=randn(V_HEADS, scale=0.3),
                  dt_bias=randn(V_HEADS, scale=0.3), norm_weight=1 + randn(V_DIM, scale=0.1))
    return tensors, params


def fused(t, p, lengths=None):
    return torch.ops.tinylm.invariant_deltanet_mix(
        t["qkv"], t["z"], t["b"], t["a"], t["conv_state"], t["recurrent_state"], lengths, p["conv_weight"],
        p["A_log"], p["dt_bias"], p["norm_weight"], 1e-6, K_HEADS, K_DIM)


def pytorch(t, p):
    return mix_tokens(t["qkv"], t["z"], t["b"], t["a"], t["conv_state"], t["recurrent_state"], None, None,
                      p["conv_weight"], p["A_log"], p["dt_bias"], p["norm_weight"], 1e-6, K_HEADS, K_DIM, True)


def rows(t, index):
    return {name: value[index] for name, value in t.items()}


def test_deltanet_mix_equals_the_pytorch_form():
    t, p = mix_inputs()
    for got, want in zip(fused(t, p), pytorch(t, p)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    t, p = mix_inputs(dtype=torch.bfloat16)
    out, conv, state = fused(t, p)
    want_out, want_conv, want_state = pytorch(t, p)
    assert torch.equal(conv, want_conv)  # the last inputs, moved
    torch.testing.assert_close(state, want_state, rtol=0.05, atol=0.05)
    torch.testing.assert_close(out.float(), want_out.float(), rtol=0.05, atol=0.05)
    assert not torch.equal(out, torch.zeros_like(out))


def test_deltanet_mix_row_bits_alone_padded_and_in_pieces():
    t, p = mix_inputs(dtype=torch.bfloat16)
    out, conv, state = fused(t, p)
    alone = fused(rows(t, slice(1, 2)), p)
    assert all(torch.equal(a, whole[1:2]) for a, whole in zip(alone, (out, conv, state)))
    first = fused(rows(t, (slice(None), slice(0, 5))) | {"conv_state": t["conv_state"],
                                                        "recurrent_state": t["recurrent_state"]}, p)
    rest = {name: t[name][:, 5:] for name in ("qkv", "z", "b", "a")}
    second = fused(rest | {"conv_state": first[1], "recurrent_state": first[2]}, p)
    assert torch.equal(torch.cat([first[0], second[0]], dim=1), out)
    assert torch.equal(second[1], conv) and torch.equal(second[2], state)
    step = fused({name: t[name][:, 5:6] for name in ("qkv", "z", "b", "a")}
                 | {"conv_state": first[1], "recurrent_state": first[2]}, p)  # a decode step
    assert torch.equal(step[0], out[:, 5:6])
    # row 0 padded after its first 5 tokens: its outputs and states are those of its 5 real tokens alone
    lengths = torch.tensor([5, 13, 13])
    padded = fused(t, p, lengths)
    assert torch.equal(padded[0][0, :5], first[0][0]) and torch.equal(padded[0][1:], out[1:])
    assert torch.equal(padded[1][0], first[1][0]) and torch.equal(padded[2][0], first[2][0])
    assert torch.equal(padded[0][0, 5:], torch.zeros_like(padded[0][0, 5:]))


def moe_inputs(tokens=9, experts=5, width=40, inner=24, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=gen).to(dtype)
    logits = torch.randn(tokens, experts, generator=gen).to(dtype)
    gate_up = (torch.randn(experts, 2 * inner, width, generator=gen) * 0.2).to(dtype)
    down = (torch.randn(experts, width, inner, generator=gen) * 0.2).to(dtype)
    return x, logits, gate_up, down


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k,normalize", [(1, True), (2, True), (3, False)])
def test_experts_equal_the_pytorch_form(dtype, top_k, normalize):
    x, logits, gate_up, down = moe_inputs(dtype=dtype)
    got = torch.ops.tinylm.invariant_moe_experts(x, logits, gate_up, down, top_k, normalize)
    want = invariant_experts(x, logits, gate_up, down, top_k, normalize)
    tolerance = 1e-5 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
    assert not torch.equal(got, torch.zeros_like(got))


def test_experts_row_bits_whatever_shares_the_call():
    x, logits, gate_up, down = moe_inputs(tokens=17)
    together = torch.ops.tinylm.invariant_moe_experts(x, logits, gate_up, down, 2, True)
    for i in (0, 8, 16):
        alone = torch.ops.tinylm.invariant_moe_experts(x[i:i + 1], logits[i:i + 1], gate_up, down, 2, True)
        assert torch.equal(alone, together[i:i + 1])
    with pytest.raises(RuntimeError, match="top_k"):
        torch.ops.tinylm.invariant_moe_experts(x, logits, gate_up, down, 6, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sigmoid_gate_equals_the_pytorch_form(dtype):
    from tinylm.model.opaque_ops import sigmoid_gate

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 40, generator=gen).to(dtype)
    wide, narrow = torch.randn(7, 3, 40, generator=gen).to(dtype), torch.randn(7, 3, 1, generator=gen).to(dtype)
    for gate in (wide, narrow):
        got = torch.ops.tinylm.invariant_sigmoid_gate(gate.reshape(-1, gate.shape[-1]), x.reshape(-1, 40))
        tolerance = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.view(x.shape), sigmoid_gate(gate, x), rtol=tolerance, atol=tolerance)
        alone = torch.ops.tinylm.invariant_sigmoid_gate(gate.reshape(-1, gate.shape[-1])[5:6], x.reshape(-1, 40)[5:6])
        assert torch.equal(alone, got[5:6])
