"""The engine's cache memory: a paged K/V pool for softmax-attention layers and a slot pool for DeltaNet states.

`KVPool` owns the tensors; `PagedBatch` is the view one forward pass sees. It implements the cache contract of
tinylm/model/cache.py (`length`, `update`, `advance`, `linear_state`, `set_linear_state`), so the one decoder
runs unchanged on paged memory.

Layout: per attention layer, K and V are (num_slots, H_kv, D) with num_slots = num_blocks * block_size, so a
token's slot index addresses its K/V row directly. A forward over B rows with T new tokens each writes the new
rows (index_copy_) and gathers, for row b, the S slots of its whole context, right-aligned: (B, S, H_kv, D) viewed
as (B, H_kv, S, D). Right alignment (left padding) keeps every row's newest token at the same query position, so
the model's causal + key-padding mask (tinylm.model.transformer.build_attention_mask) is exactly right.

An int8 pool (EngineConfig.kv_cache_dtype="int8", as llama.cpp's q8_0 cache or vLLM's fp8 one) keeps each
(token, K/V head) row as D int8 codes and one float32 scale, absmax / 127 of that row: 68 bytes per 64-wide row
instead of bf16's 128, so twice the tokens per budget and half the bytes a decode step reads. Rows are quantized
when written; the attention kernel reads the codes and folds the scales into scores and weights; other paths
gather and dequantize to the model's dtype.
"""

from __future__ import annotations

import torch

from tinylm.config import ModelConfig
from tinylm.kernels.invariant import attend_key_ranges


KV_CACHE_DTYPES = ("auto", "int8")  # auto: the model's own dtype


def pool_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pool's storage dtype for EngineConfig.kv_cache_dtype; ValueError for a name it does not know."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, not {kv_cache_dtype!r}")
    return torch.int8 if kv_cache_dtype == "int8" else model_dtype


class KVPool:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, max_num_seqs: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.block_size = block_size
        self.device = device
        self.num_slots = num_blocks * block_size
        shape = (self.num_slots, config.num_key_value_heads, config.head_dim)
        layers = [i for i in range(config.num_hidden_layers) if config.layer_type(i) == "full_attention"]
        # torch.empty: the OS commits pages only as blocks are used. Every gathered slot is written before it is
        # read, except block 0, which padding points at: it must hold finite values (0 * NaN would poison SDPA).
        self.keys = {i: _empty_pool(shape, block_size, dtype, device) for i in layers}
        self.values = {i: _empty_pool(shape, block_size, dtype, device) for i in layers}
        # int8 pools: each row's scale, (num_slots, H_kv) float32 (no entries for other pools)
        scale_layers = layers if dtype == torch.int8 else []
        self.key_scales = {i: _empty_pool(shape[:2], block_size, torch.float32, device) for i in scale_layers}
        self.value_scales = {i: _empty_pool(shape[:2], block_size, torch.float32, device) for i in scale_layers}
        # DeltaNet states, one row per running sequence plus a scratch row (`scratch_state_slot`, never handed out:
        # the compiled step's warm-up writes there). Allocated on first write (their shapes come from the layer),
        # or up front by reserve_linear_state (a compiled step must see them from its first trace).
        self.max_num_seqs = max_num_seqs
        self.conv: dict[int, torch.Tensor] = {}  # layer -> (max_num_seqs + 1, conv_dim, kernel-1)
        self.recurrent: dict[int, torch.Tensor] = {}  # layer -> (max_num_seqs + 1, H_v, D_k, D_v) float32
        self.free_state_slots = list(range(max_num_seqs - 1, -1, -1))
        self.scratch_state_slot = max_num_seqs

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Pool bytes per block of `block_size` tokens; dtype torch.int8 counts the rows' float32 scales."""
        attention_layers = sum(config.layer_type(i) == "full_attention" for i in range(config.num_hidden_layers))
        per_row = config.head_dim * dtype.itemsize + (4 if dtype == torch.int8 else 0)
        per_token = 2 * attention_layers * config.num_key_value_heads * per_row
        return max(1, per_token * block_size)

    def take_state_slot(self) -> int | None:
        """A zeroed row of the DeltaNet state pool, or None when every row is in use."""
        if not self.free_state_slots:
            return None
        slot = self.free_state_slots.pop()
        with torch.inference_mode():  # the pools were created inside a forward pass, as inference tensors
            for pool in (*self.conv.values(), *self.recurrent.values()):
                pool[slot].zero_()
        return slot

    def release_state_slot(self, slot: int | None) -> None:
        if slot is not None:
            self.free_state_slots.append(slot)

    def reserve_linear_state(self, layer_idx: int, conv_row: tuple[int, ...], conv_dtype: torch.dtype,
                             recurrent_row: tuple[int, ...]) -> None:
        """Zeroed state pools for DeltaNet layer `layer_idx` unless it has them: conv rows (conv_dim, kernel-1)
        in the activations' dtype, recurrent rows (H_v, D_k, D_v) float32."""
        if layer_idx not in self.conv:
            rows = self.max_num_seqs + 1
            with torch.inference_mode():
                self.conv[layer_idx] = torch.zeros(rows, *conv_row, dtype=conv_dtype, device=self.device)
                self.recurrent[layer_idx] = torch.zeros(rows, *recurrent_row, dtype=torch.float32,
                                                        device=self.device)


def _empty_pool(shape: tuple[int, ...], block_size: int, dtype: torch.dtype, device) -> torch.Tensor:
    pool = torch.empty(shape, dtype=dtype, device=device)
    pool[:block_size].zero_()
    return pool


class PagedBatch:
    """The cache one forward pass sees: B rows, T new tokens per row (left-padded), S context slots per row.

    write_slots (N,): pool slots of the N real new tokens, in row-major order of `write_mask` (B, T) bool;
    gather_slots (B, S): the slots of each row's context, right-aligned, padding pointing at slot 0 (block 0 is
    never handed out); state_rows (B,): each row's DeltaNet state slot (hybrid models only).
    """

    def __init__(self, pool: KVPool, write_slots: torch.Tensor, write_mask: torch.Tensor | None,
                 gather_slots: torch.Tensor, state_rows: torch.Tensor | None, *, length: int = 0,
                 attention_kernel: bool = False, batch_invariant: bool = False) -> None:
        self.pool = pool
        self.write_slots = write_slots
        self.write_mask = write_mask  # None: every (row, step) is a real token
        self.gather_slots = gather_slots.reshape(-1)
        self.batch, self.context = gather_slots.shape
        self.state_rows = state_rows
        self.length = length  # S - T: the context before the new tokens, the query offset the mask builder expects
        self.attention_kernel = attention_kernel  # the compiled decode step's, when tinylm.kernels are built
        # attention by tinylm::invariant_attention (decode_attention and prefill_attention): a row's result the same
        # whatever shares the batch and however its prompt is split (issue 21). The caller sets it only where
        # tinylm.kernels.available() (resolved once, outside compiled graphs: the call builds on first use)
        self.batch_invariant = batch_invariant

    @property
    def new_tokens(self) -> torch.Tensor | None:
        """The cache contract's name for write_mask (tinylm/model/cache.py): which new tokens are real."""
        return self.write_mask

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the real rows of k, v (B, H_kv, T, D); return every row's context K, V (B, H_kv, S, D)."""
        pool = self.pool  # an int8 pool has row scales per layer; others have none (get -> None)
        return (self._write_and_gather(pool.keys[layer_idx], k, pool.key_scales.get(layer_idx)),
                self._write_and_gather(pool.values[layer_idx], v, pool.value_scales.get(layer_idx)))

    def decode_attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: torch.Tensor | None) -> torch.Tensor | None:
        """One new token per row: store k, v (B, H_kv, 1, D) and attend q (B, H, 1, D) to each row's context
        with mask (B, 1, 1, S) bool or None, reading K/V in the pool (tinylm/kernels/decode_attention.cpp, or
        invariant_attention.cpp when `batch_invariant`). Returns (B, H, 1, D), or None where the kernel does not
        apply (the caller gathers and attends itself)."""
        pool = self.pool
        keys, values = pool.keys[layer_idx], pool.values[layer_idx]
        k_scales, v_scales = pool.key_scales.get(layer_idx), pool.value_scales.get(layer_idx)
        batch, heads, _, dim = q.shape
        if not (self.attention_kernel or self.batch_invariant) or dim % 16 or dim > 256:  # the kernels' head sizes
            return None
        self._store(layer_idx, k.reshape(batch, *keys.shape[1:]), v.reshape(batch, *keys.shape[1:]))
        valid = None if mask is None else mask.reshape(batch, self.context)
        slots = self.gather_slots.view(batch, self.context)
        q_rows = q.reshape(batch, heads, dim).float().contiguous()
        if self.batch_invariant:  # each row's keys from its own first one: (B,) starts, every row ends at S
            rows = torch.arange(batch, device=q.device)
            starts = rows * 0 if valid is None else self.context - valid.sum(dim=-1)
            out = torch.ops.tinylm.invariant_attention(q_rows, keys, values, slots, rows, starts,
                                                       torch.full_like(rows, self.context), dim ** -0.5,
                                                       k_scales, v_scales)
        else:
            out = torch.ops.tinylm.paged_attention(q_rows, keys, values, slots, valid, dim ** -0.5,
                                                   k_scales, v_scales)
        return out.to(v.dtype).view(batch, heads, 1, dim)

    def prefill_attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: torch.Tensor | None) -> torch.Tensor | None:
        """T new tokens per row (left-padded): store the real rows of k, v (B, H_kv, T, D), then attend each real
        query of q (B, H, T, D) to its own context up to itself, in the pool, with the operations decode uses
        (tinylm/kernels/invariant_attention.cpp): a prompt token scored here equals the same token decoded.
        mask (B, 1, T, S) bool (build_attention_mask: causal AND real key) or None (no padding, S == T).
        Returns (B, H, T, D), zeros at padding queries, or None where the kernel does not apply (head size)."""
        batch, heads, steps, dim = q.shape
        if not self.batch_invariant or dim % 16 or dim > 256:
            return None
        pool = self.pool
        keys, values = pool.keys[layer_idx], pool.values[layer_idx]
        self._store(layer_idx, self._real_rows(k), self._real_rows(v))
        # row b's context occupies slots [starts[b], S): the keys its newest query (the last column) may see
        # (a mask of one row stands for every row: build_attention_mask's plain causal mask over a shared length)
        starts = q.new_zeros(batch, dtype=torch.long) if mask is None else \
            (self.context - mask[:, 0, -1].sum(dim=-1)).expand(batch)
        ends = torch.arange(self.context - steps + 1, self.context + 1, device=q.device).expand(batch, steps)
        if self.write_mask is not None:  # padding queries attend nothing
            ends = torch.where(self.write_mask, ends, starts[:, None])
        return attend_key_ranges(q, keys, values, self.gather_slots.view(batch, self.context),
                                 starts[:, None].expand(batch, steps), ends,
                                 pool.key_scales.get(layer_idx), pool.value_scales.get(layer_idx))

    def _real_rows(self, new: torch.Tensor) -> torch.Tensor:
        """new (B, H_kv, T, D) -> its real tokens' rows (N, H_kv, D), row-major (write_slots' order)."""
        rows = new.transpose(1, 2)  # (B, T, H_kv, D)
        return rows.reshape(-1, *rows.shape[2:]) if self.write_mask is None else rows[self.write_mask]

    def _store(self, layer_idx: int, k_rows: torch.Tensor, v_rows: torch.Tensor) -> None:
        """k_rows, v_rows (N, H_kv, D) -> the pool at write_slots, as codes and row scales for an int8 pool."""
        pool = self.pool
        for flat, scales, rows in ((pool.keys[layer_idx], pool.key_scales.get(layer_idx), k_rows),
                                   (pool.values[layer_idx], pool.value_scales.get(layer_idx), v_rows)):
            if scales is None:
                flat.index_copy_(0, self.write_slots, rows.to(flat.dtype))
            else:
                codes, row_scales = quantize_rows(rows)
                flat.index_copy_(0, self.write_slots, codes)
                scales.index_copy_(0, self.write_slots, row_scales)

    def _write_and_gather(self, flat: torch.Tensor, new: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
        """new (B, H_kv, T, D) -> its real rows stored, every row's context (B, H_kv, S, D) in new's dtype
        (dequantized from an int8 pool, whose row scales (num_slots, H_kv) are `scales`)."""
        rows = new.transpose(1, 2)  # (B, T, H_kv, D)
        rows = rows.reshape(-1, *rows.shape[2:]) if self.write_mask is None else rows[self.write_mask]
        if scales is None:
            gathered = write_and_gather(flat, rows.to(flat.dtype), self.write_slots, self.gather_slots)
        else:
            codes, row_scales = quantize_rows(rows)
            gathered = write_and_gather(flat, codes, self.write_slots, self.gather_slots).float()
            gathered = gathered * write_and_gather(scales, row_scales, self.write_slots, self.gather_slots)[..., None]
            gathered = gathered.to(new.dtype)
        return gathered.view(self.batch, self.context, *flat.shape[1:]).transpose(1, 2)  # (B, H_kv, S, D)

    def advance(self, num_tokens: int) -> None:
        """The engine's block manager does the bookkeeping; nothing to do here."""

    def linear_state(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if layer_idx not in self.pool.conv:
            return None  # nothing written yet: every row starts from the zero state
        return self.pool.conv[layer_idx][self.state_rows], self.pool.recurrent[layer_idx][self.state_rows]

    def set_linear_state(self, layer_idx: int, conv_state: torch.Tensor, recurrent_state: torch.Tensor) -> None:
        self.pool.reserve_linear_state(layer_idx, conv_state.shape[1:], conv_state.dtype, recurrent_state.shape[1:])
        self.pool.conv[layer_idx].index_copy_(0, self.state_rows, conv_state)
        self.pool.recurrent[layer_idx].index_copy_(0, self.state_rows, recurrent_state)


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows (..., D) -> int8 codes (..., D) and float32 scales (...): code = round(x / scale), scale = absmax / 127,
    so every row keeps its largest value exactly and the rest within scale / 2."""
    scales = rows.float().abs().amax(dim=-1) / 127
    codes = torch.round(rows.float() / scales.clamp(min=1e-30)[..., None]).clamp(-127, 127).to(torch.int8)
    return codes, scales


def write_and_gather(pool: torch.Tensor, rows: torch.Tensor, write_slots: torch.Tensor,
                     gather_slots: torch.Tensor) -> torch.Tensor:
    """pool (num_slots, H_kv, D): store rows (N, H_kv, D) at write_slots (N,), return pool[gather_slots] (M, H_kv, D).

    Under torch.compile Inductor re-inplaces the write (the pool is mutated where it lies, not copied: a copy of
    the cache budget per layer would show as a 100x slower step) and fuses the gather into its consumers.
    """
    pool.index_copy_(0, write_slots, rows)
    return pool.index_select(0, gather_slots)
