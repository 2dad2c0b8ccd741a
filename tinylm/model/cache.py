"""A contiguous, preallocated KV cache for the plain generation loop and incremental forward calls.

The serving engine keeps its own paged cache; attention only needs `update()` from either.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per layer K and V of shape (B, H_kv, max_len, D); positions [0, length) are filled."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0  # tokens already stored; advanced by `advance()` once every layer has written

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H_kv, T, D) after the filled part; return the whole filled K, V (B, H_kv, length+T, D)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions, cache holds {self.max_len}")
        self.keys[layer_idx][:, :, self.length:end] = k
        self.values[layer_idx][:, :, self.length:end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (finished sequences dropped from the batch)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
