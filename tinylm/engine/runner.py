"""The model runner: turns a group of scheduled sequences into one padded forward pass over the paged cache.

Rows are left-padded to the group's longest chunk T and their contexts right-aligned to the longest context S,
so one mask (causal AND real key) serves every row and the last position of every row is its newest token.
"""

from __future__ import annotations

import numpy as np
import torch

from tinylm.engine.block_manager import BlockManager
from tinylm.engine.compiled import CompiledDecode
from tinylm.engine.kv_pool import KVPool, PagedBatch
from tinylm.engine.lora import LoRAAdapters
from tinylm.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model, pool: KVPool, blocks: BlockManager, compile_decode: bool = False,
                 loras: LoRAAdapters | None = None) -> None:
        self.model = model
        self.loras = loras  # the engine's LoRA adapters (engine/lora.py): each row's is set before a forward
        self.pool = pool
        self.blocks = blocks
        self.device = model.lm_head.weight.device
        self.batch_invariant = getattr(model, "batch_invariant", False)  # use_batch_invariant ran on it
        self.compiled = CompiledDecode(model, pool) if compile_decode else None

    @torch.inference_mode()
    def forward(self, rows: list[tuple[Sequence, int]], all_logits: bool = False) -> torch.Tensor:
        """rows: (sequence, number of its uncomputed tokens to run now). Returns float32 logits, (B, T, V) for
        every position when `all_logits` (left-padded like the input), else (B, V) at each row's last token."""
        ids, positions, write_mask = self._inputs(rows)
        batch, steps = ids.shape
        contexts = np.array([seq.num_computed + n for seq, n in rows])
        width = int(contexts.max())
        table = self._block_table(rows)
        gather, valid = self._gather_slots(table, contexts, width)
        write_slots = self._slots_of(table, positions, write_mask)
        ids, positions, gather = (torch.from_numpy(a).to(self.device) for a in (ids, positions, gather))
        write_slots = torch.from_numpy(write_slots).to(self.device)
        state_rows = None
        if self.pool.conv or any(seq.state_slot is not None for seq, _ in rows):
            state_rows = torch.tensor([seq.state_slot for seq, _ in rows], device=self.device)
        if self.compiled is not None and steps == 1 and not all_logits:
            # batch 1 has no padding; larger batches always pass the mask: two graphs in all, not three
            mask = None if batch == 1 else torch.from_numpy(valid).to(self.device)
            logits = self.compiled(ids, positions, mask, write_slots, gather, state_rows)
            if logits is not None:
                return logits
        # No padding anywhere (batch 1, or rows of equal context): SDPA's unmasked path, and one graph fewer
        key_mask = None if valid.all() else torch.from_numpy(valid).to(self.device)
        new_tokens = None if write_mask.all() else torch.from_numpy(write_mask).to(self.device)
        cache = PagedBatch(self.pool, write_slots, new_tokens, gather, state_rows, length=width - steps,
                           batch_invariant=self.batch_invariant)
        if self.loras is not None:
            self.loras.set_rows(self._token_adapters(rows, steps))
        out = self.model(ids, attention_mask=key_mask, position_ids=positions, cache=cache,
                         logits_to_keep=0 if all_logits else 1)
        logits = out.logits.float()
        return logits if all_logits else logits[:, -1]

    def _token_adapters(self, rows: list[tuple[Sequence, int]], steps: int) -> torch.Tensor | None:
        """(B * T,) each token's LoRA adapter id, padding included (its rows are never read), or None when every
        row runs the base model."""
        ids = [seq.lora_id for seq, _ in rows]
        if not any(ids):
            return None
        return torch.tensor(ids, device=self.device).repeat_interleave(steps)

    # Inputs are built with numpy (a microsecond an operation, a few for torch's): at batch 1 a tiny model's
    # decode step takes ~0.3 ms, and preparing its inputs with ~25 torch calls took a quarter of it.
    @staticmethod
    def _inputs(rows: list[tuple[Sequence, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B, T) token ids, positions and a real-token mask, left-padded."""
        steps = max(n for _, n in rows)
        ids = np.zeros((len(rows), steps), dtype=np.int64)
        positions = np.zeros((len(rows), steps), dtype=np.int64)
        mask = np.zeros((len(rows), steps), dtype=bool)
        for row, (seq, n) in enumerate(rows):
            start = seq.num_computed
            ids[row, steps - n:] = seq.all_token_ids[start:start + n]
            positions[row, steps - n:] = np.arange(start, start + n)
            mask[row, steps - n:] = True
        return ids, positions, mask

    @staticmethod
    def _block_table(rows: list[tuple[Sequence, int]]) -> np.ndarray:
        """(B, max_blocks) block ids, padded with block 0."""
        longest = max(len(seq.block_ids) for seq, _ in rows)
        table = np.zeros((len(rows), longest), dtype=np.int64)
        for row, (seq, _) in enumerate(rows):
            table[row, :len(seq.block_ids)] = seq.block_ids
        return table

    def _gather_slots(self, table: np.ndarray, contexts: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, S) slots of each row's context right-aligned (padding -> slot 0), and the (B, S) real-key mask."""
        size = self.blocks.block_size
        key_pos = np.arange(width)[None] - (width - contexts)[:, None]  # (B, S), negative = padding
        valid = key_pos >= 0
        key_pos = np.maximum(key_pos, 0)
        slots = np.take_along_axis(table, key_pos // size, axis=1) * size + key_pos % size
        return np.where(valid, slots, 0), valid

    def _slots_of(self, table: np.ndarray, positions: np.ndarray, write_mask: np.ndarray) -> np.ndarray:
        """(N,) slots of the real new tokens, row-major (the order `rows[write_mask]` yields them)."""
        size = self.blocks.block_size
        slots = np.take_along_axis(table, positions // size, axis=1) * size + positions % size
        return slots[write_mask]
