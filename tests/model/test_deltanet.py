"""Gated DeltaNet pieces: the chunked and recurrent delta rule agree (and match transformers' kernels), a prompt
fed in pieces equals one pass, and the causal conv's rolling state is exact (hand-set weights)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_next import modeling_qwen3_next as ref

from tinylm.config import ModelConfig
from tinylm.model.cache import make_cache
from tinylm.model.deltanet import GatedDeltaNet
from tinylm.model.delta_rule import CHUNK_SIZE, causal_conv1d, chunk_gated_delta_rule, recurrent_gated_delta_rule

H_K, H_V, D_K, D_V = 2, 4, 8, 6  # two value heads per key head, unequal head sizes: catches mixed-up axes


def _inputs(seq: int, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, H_K, D_K, generator=gen)
    k = torch.randn(batch, seq, H_K, D_K, generator=gen)
    v = torch.randn(batch, seq, H_V, D_V, generator=gen)
    g = -torch.rand(batch, seq, H_V, generator=gen) * 0.5  # log decay <= 0
    beta = torch.rand(batch, seq, H_V, generator=gen)
    state = torch.randn(batch, H_V, D_K, D_V, generator=gen)
    return q, k, v, g, beta, state


@pytest.mark.parametrize("seq", [1, 7, CHUNK_SIZE, 100, 2 * CHUNK_SIZE + 3])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_recurrent(seq, with_state):
    q, k, v, g, beta, state = _inputs(seq)
    initial = state if with_state else None
    out_c, state_c = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=initial)
    out_r, state_r = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=initial)
    assert out_c.shape == (2, seq, H_V, D_V) and state_c.shape == (2, H_V, D_K, D_V)
    assert torch.allclose(out_c, out_r, atol=1e-5), (out_c - out_r).abs().max()
    assert torch.allclose(state_c, state_r, atol=1e-5), (state_c - state_r).abs().max()


@pytest.mark.parametrize("with_state", [False, True])
def test_delta_rule_matches_transformers_kernels(with_state):
    q, k, v, g, beta, state = _inputs(100, seed=1)
    initial = state if with_state else None
    kwargs = dict(initial_state=initial, output_final_state=True, use_qk_l2norm_in_kernel=True)
    ref_c = ref.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, **kwargs)
    ref_r = ref.torch_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, **kwargs)
    for ours, theirs in ((chunk_gated_delta_rule(q, k, v, g, beta, initial), ref_c),
                         (recurrent_gated_delta_rule(q, k, v, g, beta, initial), ref_r)):
        assert torch.allclose(ours[0], theirs[0], atol=1e-6) and torch.allclose(ours[1], theirs[1], atol=1e-6)


def test_prompt_in_pieces_equals_one_pass():
    q, k, v, g, beta, _ = _inputs(150, seed=2)
    full, full_state = chunk_gated_delta_rule(q, k, v, g, beta)
    outs, state = [], None
    for start, end in ((0, 50), (50, 51), (51, 150)):  # a chunk, a 1-token piece, a piece crossing chunk edges
        piece = [t[:, start:end] for t in (q, k, v, g, beta)]
        rule = recurrent_gated_delta_rule if end - start == 1 else chunk_gated_delta_rule
        out, state = rule(*piece, initial_state=state)
        outs.append(out)
    assert torch.allclose(torch.cat(outs, dim=1), full, atol=1e-5)
    assert torch.allclose(state, full_state, atol=1e-5)


def _hand_conv(channels: int = 3, kernel: int = 4):
    """weight[c] = (1000, 100, 10, 1) * (c + 1): each output is the window's digits, oldest first."""
    digits = torch.tensor([10.0 ** (kernel - 1 - j) for j in range(kernel)])
    return (digits[None] * torch.arange(1, channels + 1.0)[:, None])[:, None, :]  # (C, 1, K)


def test_conv_state_rolls_across_steps_hand_set():
    weight = _hand_conv()
    x = torch.arange(1.0, 10.0).repeat(1, 3, 1)  # (1, 3, 9): inputs 1..9 in every channel
    state, outs = None, []
    for t in range(9):  # one token at a time, as decoding feeds them
        out, state = causal_conv1d(x[:, :, t:t + 1], weight, state)
        outs.append(out)
    # Window at step t holds inputs t-2..t+1 (zeros before the start): e.g. step 3 sees 1, 2, 3, 4 -> 1234.
    windows = [sum(10.0 ** (3 - j) * (t + j - 2) for j in range(4) if t + j - 2 >= 1) for t in range(9)]
    expected = F.silu(torch.tensor(windows)[None, None] * torch.arange(1, 4.0)[None, :, None])
    assert torch.equal(torch.cat(outs, dim=-1), expected)
    assert torch.equal(state, x[:, :, -3:])  # the last kernel-1 inputs
    full, full_state = causal_conv1d(x, weight, None)  # one pass over the whole sequence agrees
    assert torch.allclose(full, expected) and torch.equal(full_state, state)


def test_conv_in_pieces_and_reference_conv_agree():
    gen = torch.Generator().manual_seed(3)
    x, weight = torch.randn(2, 5, 11, generator=gen), torch.randn(5, 1, 4, generator=gen)
    reference = F.silu(F.conv1d(x, weight, padding=3, groups=5)[:, :, :11])  # causal conv over the whole input
    outs, state = [], None
    for start, end in ((0, 2), (2, 3), (3, 8), (8, 11)):
        out, state = causal_conv1d(x[:, :, start:end], weight, state)
        outs.append(out)
    assert torch.allclose(torch.cat(outs, dim=-1), reference, atol=1e-6)
    lengths = torch.tensor([11, 6])  # row 1: 6 real inputs then padding -> its state ends at input 6
    _, padded_state = causal_conv1d(x, weight, None, lengths)
    assert torch.equal(padded_state[0], x[0, :, 8:]) and torch.equal(padded_state[1], x[1, :, 3:6])


def _layer(seed: int = 0) -> tuple[GatedDeltaNet, ModelConfig]:
    config = ModelConfig(model_type="qwen3_next", vocab_size=16, hidden_size=24, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=256, layer_types=["linear_attention"], linear_conv_kernel_dim=4,
                         linear_key_head_dim=D_K, linear_value_head_dim=D_V, linear_num_key_heads=H_K,
                         linear_num_value_heads=H_V)
    torch.manual_seed(seed)
    layer = GatedDeltaNet(config, 0)
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(torch.randn(param.shape) * 0.3)
    return layer, config


def test_deltanet_layer_token_by_token_equals_full_forward():
    layer, config = _layer()
    x = torch.randn(2, 70, 24)
    with torch.no_grad():
        full = layer(x)
        cache = make_cache(config, 2, 70, torch.float32)
        steps = [layer(x[:, :5], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(5, 70)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_padded_row_continuing_a_state_equals_unpadded():
    layer, config = _layer(1)
    x = torch.randn(2, 12, 24)
    with torch.no_grad():
        alone = []
        for row in range(2):
            cache = make_cache(config, 1, 12, torch.float32)
            alone.append(torch.cat([layer(x[row:row + 1, :8], cache=cache),
                                    layer(x[row:row + 1, 8:], cache=cache)], dim=1))
        # Batched: the second piece of row 1 is left-padded by 2 (its last 2 tokens are real, shifted right).
        cache = make_cache(config, 2, 12, torch.float32)
        first = layer(x[:, :8], cache=cache)
        second_in = torch.stack([x[0, 8:], torch.cat([torch.zeros(2, 24), x[1, 8:10]])])
        second = layer(second_in, pad_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]), cache=cache)
    assert torch.allclose(torch.cat([first[0], second[0]]), alone[0][0], atol=1e-5)
    assert torch.allclose(torch.cat([first[1], second[1, 2:]]), alone[1][0, :10], atol=1e-5)
