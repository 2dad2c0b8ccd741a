"""Sparse MoE with hand-set router weights: each token reaches exactly the experts the router picks, with the
router's weights, and the shared expert is added behind its sigmoid gate."""

from __future__ import annotations

import math

import pytest
import torch

from tinylm.config import ModelConfig
from tinylm.model.moe import SparseMoE

# Router weight 10 * I (3 experts, hidden 4): a token's logits are 10 * its first three features.
TOKENS = torch.tensor([
    [1.0, 0.5, 0.0, 0.3],  # logits (10, 5, 0): expert 0, then 1
    [0.0, 0.2, 0.9, -0.4],  # (0, 2, 9): expert 2, then 1
    [0.1, 0.8, 0.0, 0.7],  # (1, 8, 0): expert 1, then 0
    [0.6, 0.0, 0.4, 0.0],  # (6, 0, 4): expert 0, then 2
])
ROUTES = [[0, 1], [2, 1], [1, 0], [0, 2]]  # read off the comments above, not computed by the code under test


def _moe(top_k: int, normalize: bool, shared: int) -> SparseMoE:
    config = ModelConfig(model_type="qwen3_next", vocab_size=8, hidden_size=4, intermediate_size=8,
                         num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=4,
                         max_position_embeddings=8, num_experts=3, num_experts_per_tok=top_k, moe_intermediate_size=6,
                         norm_topk_prob=normalize, shared_expert_intermediate_size=shared)
    torch.manual_seed(0)
    moe = SparseMoE(config)
    with torch.no_grad():
        for param in moe.parameters():
            param.copy_(torch.randn(param.shape))
        moe.gate.weight.copy_(10 * torch.eye(3, 4))
        if shared:
            moe.shared_expert_gate.weight.copy_(torch.tensor([[0.0, 0.0, 0.0, 2.0]]))  # gate logit = 2 * feature 3
    return moe


def _softmax_row(logits: list[float]) -> list[float]:
    total = sum(math.exp(v) for v in logits)
    return [math.exp(v) / total for v in logits]


def _expected(moe: SparseMoE, top_k: int, normalize: bool) -> torch.Tensor:
    rows = []
    for token, route in zip(TOKENS, ROUTES):
        probs = _softmax_row((10 * token[:3]).tolist())
        chosen = route[:top_k]
        weights = [probs[e] for e in chosen]
        if normalize:
            weights = [w / sum(weights) for w in weights]
        row = sum(w * moe.experts[e](token[None])[0] for w, e in zip(weights, chosen))
        if moe.has_shared:
            row = row + torch.sigmoid(torch.tensor(2 * token[3].item())) * moe.shared_expert(token[None])[0]
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("top_k,normalize", [(1, True), (1, False), (2, True), (2, False)])
@pytest.mark.parametrize("shared", [0, 5])
def test_tokens_go_where_the_router_says(top_k, normalize, shared):
    moe = _moe(top_k, normalize, shared)
    seen: dict[int, list[torch.Tensor]] = {e: [] for e in range(3)}
    hooks = [expert.register_forward_hook(lambda _m, args, _out, e=e: seen[e].append(args[0]))
             for e, expert in enumerate(moe.experts)]
    with torch.no_grad():
        out = moe(TOKENS[None])[0]
        for hook in hooks:
            hook.remove()
        expected = _expected(moe, top_k, normalize)
    assert torch.allclose(out, expected, atol=1e-6), (out - expected).abs().max()
    for e in range(3):  # each expert ran once, on exactly the tokens routed to it
        inputs = torch.cat(seen[e]) if seen[e] else torch.empty(0, 4)
        rows = sorted(i for i in range(4) for x in inputs if torch.equal(TOKENS[i], x))
        assert rows == [i for i, route in enumerate(ROUTES) if e in route[:top_k]]


def test_shared_expert_is_gated_not_plain_added():
    moe = _moe(1, True, 5)
    with torch.no_grad():
        out = moe(TOKENS[None])[0]
        moe.shared_expert_gate.weight.zero_()  # sigmoid(0) = 1/2: the shared part halves
        half = moe(TOKENS[None])[0]
        routed = torch.stack([moe.experts[r[0]](t[None])[0] for t, r in zip(TOKENS, ROUTES)])
        shared = moe.shared_expert(TOKENS)
    assert torch.allclose(half, routed + 0.5 * shared, atol=1e-6)
    assert not torch.allclose(out, routed + shared, atol=1e-3)
