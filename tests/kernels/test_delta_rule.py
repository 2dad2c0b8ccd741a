"""Gated DeltaNet's recurrence in C++ (tinylm/kernels/delta_rule.cpp): the PyTorch loop's results (float32
tolerance), bitwise the same for a sequence alone or in a batch and for a prompt fed whole or in pieces (batch
invariance), and out of the way where gradients are needed (it has no backward)."""

from __future__ import annotations

import pytest
import torch

from tinylm import kernels
from tinylm.model import delta_rule

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs tinylm's C++ kernels")


def inputs(batch=3, steps=29, k_heads=2, v_heads=4, k_dim=32, v_dim=40, seed=0):
    """q, k (B, T, H_k, D_k), v (B, T, H_v, D_v), g <= 0 and beta in [0, 1] (B, T, H_v), a state (B, H_v, D_k, D_v)
    (D_v not a multiple of the vector width: the partial last strip too)."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, steps, k_heads, k_dim, generator=gen) for _ in range(2))
    v = torch.randn(batch, steps, v_heads, v_dim, generator=gen)
    g = -torch.rand(batch, steps, v_heads, generator=gen) * 2
    beta = torch.rand(batch, steps, v_heads, generator=gen)
    state = torch.randn(batch, v_heads, k_dim, v_dim, generator=gen)
    return q, k, v, g, beta, state


def rule(q, k, v, g, beta, state):
    return delta_rule.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state)


def test_equals_the_pytorch_loop(monkeypatch):
    args = inputs()
    assert delta_rule.kernels_take(*args)  # the C++ loop, not the fallback
    out, state = rule(*args)
    monkeypatch.setattr(delta_rule, "kernels_take", lambda *tensors: False)
    want_out, want_state = rule(*args)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, want_state, rtol=1e-5, atol=1e-5)
    assert not torch.equal(out, torch.zeros_like(out))


def test_same_bits_alone_together_and_in_pieces():
    q, k, v, g, beta, state = inputs()
    out, final = rule(q, k, v, g, beta, state)
    alone = rule(q[1:2], k[1:2], v[1:2], g[1:2], beta[1:2], state[1:2])
    assert torch.equal(alone[0], out[1:2]) and torch.equal(alone[1], final[1:2])
    first = rule(q[:, :11], k[:, :11], v[:, :11], g[:, :11], beta[:, :11], state)
    second = rule(q[:, 11:], k[:, 11:], v[:, 11:], g[:, 11:], beta[:, 11:], first[1])
    assert torch.equal(torch.cat([first[0], second[0]], dim=1), out) and torch.equal(second[1], final)
    step = rule(q[:, 11:12], k[:, 11:12], v[:, 11:12], g[:, 11:12], beta[:, 11:12], first[1])  # a decode step
    assert torch.equal(step[0], out[:, 11:12])


def test_gradients_go_through_the_pytorch_loop():
    q, k, v, g, beta, state = inputs(batch=1, steps=5)
    v.requires_grad_(True)
    out, _ = rule(q, k, v, g, beta, state)
    out.sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0


def test_refuses_bad_shapes_in_one_line():
    q, k, v, g, beta, state = (t.transpose(1, 2).contiguous() if t.dim() == 4 and i < 3 else t
                               for i, t in enumerate(inputs(batch=1, steps=3, k_heads=4)))
    g, beta = g.transpose(1, 2).contiguous(), beta.transpose(1, 2).contiguous()  # (B, H, T): the op's layout
    out, _ = torch.ops.tinylm.gated_delta_rule(q, k, v, g, beta, state)
    assert out.shape == v.shape
    with pytest.raises(RuntimeError, match=r"state \(B, H, D_k, D_v\)"):
        torch.ops.tinylm.gated_delta_rule(q, k, v, g, beta, state[:, :1])
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.tinylm.gated_delta_rule(q.double(), k, v, g, beta, state)
