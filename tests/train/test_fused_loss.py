"""The chunked linear + cross-entropy equals the plain loss on materialized logits: values and gradients (hidden
states, weight, bias), float32 tolerance, with -100 labels, over several chunks and with a ragged last chunk."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinylm.train.fused_loss import linear_cross_entropy_sum, shifted_labels


def _case(seed: int, n: int = 37, c: int = 16, v: int = 101, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, c, generator=g, requires_grad=True)
    weight = (torch.randn(v, c, generator=g) * 0.3).requires_grad_(True)
    b = (torch.randn(v, generator=g) * 0.1).requires_grad_(True) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.3] = -100  # about a third ignored
    return hidden, weight, b, labels


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("chunk", [1, 8, 1024])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_equal_plain_cross_entropy(chunk, bias):
    hidden, weight, b, labels = _case(0, bias=bias)
    assert (labels == -100).any() and (labels != -100).any()
    plain = F.cross_entropy(F.linear(hidden, weight, b).float(), labels, ignore_index=-100, reduction="sum")
    fused = linear_cross_entropy_sum(hidden, weight, b, labels, chunk=chunk)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-5)
    weight_out = torch.tensor(0.37)  # a non-unit upstream gradient (the trainer divides by the global count)
    for got, want in zip(_grads(fused * weight_out, (hidden, weight, b)), _grads(plain * weight_out, (hidden, weight, b))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # ignored rows get exactly no gradient
    d_hidden = _grads(linear_cross_entropy_sum(hidden, weight, b, labels, chunk=chunk), (hidden,))[0]
    assert d_hidden[labels == -100].abs().max() == 0


def test_tied_weight_gradient_adds_to_the_embedding_gradient():
    """The output head shares its weight with the embedding (QED-75M, SmolLM2): both gradients must add up."""
    torch.manual_seed(1)
    embed = torch.nn.Embedding(50, 8)
    ids = torch.randint(0, 50, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100

    def loss(fused: bool):
        hidden = torch.tanh(embed(ids)).reshape(-1, 8)  # (B*T, C)
        target = shifted_labels(labels)
        if fused:
            return linear_cross_entropy_sum(hidden, embed.weight, None, target, chunk=5)
        return F.cross_entropy(F.linear(hidden, embed.weight), target, ignore_index=-100, reduction="sum")

    got, want = _grads(loss(True), (embed.weight,))[0], _grads(loss(False), (embed.weight,))[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_shifted_labels_follow_the_hugging_face_shift():
    labels = torch.tensor([[5, 6, -100, 7], [1, 2, 3, 4]])
    assert shifted_labels(labels).tolist() == [6, -100, 7, -100, 2, 3, 4, -100]


def test_no_grad_and_all_ignored():
    hidden, weight, b, labels = _case(2)
    with torch.no_grad():
        plain = F.cross_entropy(F.linear(hidden, weight, b), labels, ignore_index=-100, reduction="sum")
        torch.testing.assert_close(linear_cross_entropy_sum(hidden, weight, b, labels, chunk=4), plain)
    nothing = linear_cross_entropy_sum(hidden, weight, b, torch.full_like(labels, -100))
    assert nothing.item() == 0.0
    nothing.backward()
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_bf16_autocast_is_close_to_the_plain_autocast_loss():
    hidden, weight, b, labels = _case(3, n=64, c=32, v=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy(F.linear(hidden, weight, b).float(), labels, ignore_index=-100, reduction="sum")
        fused = linear_cross_entropy_sum(hidden, weight, b, labels, chunk=16)
    torch.testing.assert_close(fused, plain, rtol=1e-3, atol=1e-2)
    got = _grads(fused, (hidden, weight, b))
    want = _grads(plain, (hidden, weight, b))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=5e-2, atol=5e-3)


def test_compiled_softmax_gradient_gives_the_same_values_and_gradients():
    """train.compile runs the per-chunk softmax and its gradient as one torch.compile kernel (ragged last chunk:
    dynamic shapes)."""
    hidden, weight, b, labels = _case(4)
    plain = F.cross_entropy(F.linear(hidden, weight, b), labels, ignore_index=-100, reduction="sum")
    fused = linear_cross_entropy_sum(hidden, weight, b, labels, chunk=8, compiled=True)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-5)
    for got, want in zip(_grads(fused, (hidden, weight, b)), _grads(plain, (hidden, weight, b))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
