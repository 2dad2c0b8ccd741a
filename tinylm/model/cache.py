"""A contiguous, preallocated state cache for incremental forward calls (the serving engine has its own, paged).

The contract the model relies on (the serving engine's paged cache implements the same methods):
- `length`: tokens already stored for every row; `advance(n)` once every layer has written n more.
- `new_tokens` (optional): a (B, T) mask of the real new tokens, or None; where a cache does not give it, the
  model reads it from the attention mask's last T columns (right for this cache, not for a paged one whose rows
  continue different contexts with left-padded chunks).
- attention layers: `update(layer_idx, k, v) -> (k_all, v_all)`.
- Gated DeltaNet layers: `linear_state(layer_idx) -> (conv_state, recurrent_state)` or None before the first
  write, and `set_linear_state(layer_idx, conv_state, recurrent_state)` with
  conv_state (B, conv_dim, kernel-1) in the model's dtype: the last kernel-1 conv inputs, and
  recurrent_state (B, H_v, D_k, D_v) float32: the delta-rule memory.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per attention layer K and V of shape (B, H_kv, max_len, D), positions [0, length) filled; per DeltaNet
    layer its (conv_state, recurrent_state). `kv_layers` (default: all) are the layers that hold K/V."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", kv_layers: list[int] | None = None) -> None:
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        kv = set(range(num_layers) if kv_layers is None else kv_layers)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) if i in kv else None for i in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) if i in kv else None for i in range(num_layers)]
        self.conv_states: list[torch.Tensor | None] = [None] * num_layers
        self.recurrent_states: list[torch.Tensor | None] = [None] * num_layers
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

    def linear_state(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(conv_state (B, conv_dim, kernel-1), recurrent_state (B, H_v, D_k, D_v) float32), or None if unset."""
        if self.conv_states[layer_idx] is None:
            return None
        return self.conv_states[layer_idx], self.recurrent_states[layer_idx]

    def set_linear_state(self, layer_idx: int, conv_state: torch.Tensor, recurrent_state: torch.Tensor) -> None:
        self.conv_states[layer_idx] = conv_state
        self.recurrent_states[layer_idx] = recurrent_state

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (finished sequences dropped from the batch), K/V and DeltaNet states alike."""
        for tensors in (self.keys, self.values, self.conv_states, self.recurrent_states):
            tensors[:] = [None if t is None else t[rows] for t in tensors]


def make_cache(config, batch_size: int, max_len: int, dtype: torch.dtype,
               device: torch.device | str = "cpu") -> KVCache:
    """The cache a model of `config` needs: K/V only for its softmax-attention layers (DeltaNet layers keep
    fixed-size states instead)."""
    kv_layers = [i for i in range(config.num_hidden_layers) if config.layer_type(i) == "full_attention"]
    return KVCache(config.num_hidden_layers, batch_size, config.num_key_value_heads, config.head_dim, max_len,
                   dtype, device, kv_layers=kv_layers)
