"""The model runner: turns a group of scheduled sequences into one padded forward pass over the paged cache.

Rows are left-padded to the group's longest chunk T and their contexts right-aligned to the longest context S,
so one mask (causal AND real key) serves every row and the last position of every row is its newest token.
"""

from __future__ import annotations

import torch

from tinylm.engine.block_manager import BlockManager
from tinylm.engine.compiled import CompiledDecode
from tinylm.engine.kv_pool import KVPool, PagedBatch
from tinylm.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model, pool: KVPool, blocks: BlockManager, compile_decode: bool = False) -> None:
        self.model = model
        self.pool = pool
        self.blocks = blocks
        self.device = model.lm_head.weight.device
        self.compiled = CompiledDecode(model, pool) if compile_decode else None

    @torch.inference_mode()
    def forward(self, rows: list[tuple[Sequence, int]], all_logits: bool = False) -> torch.Tensor:
        """rows: (sequence, number of its uncomputed tokens to run now). Returns float32 logits, (B, T, V) for
        every position when `all_logits` (left-padded like the input), else (B, V) at each row's last token."""
        ids, positions, write_mask = self._inputs(rows)
        batch, steps = ids.shape
        contexts = torch.tensor([seq.num_computed + n for seq, n in rows])
        width = int(contexts.max())
        table = self._block_table(rows)
        gather, valid = self._gather_slots(table, contexts, width)
        write_slots = self._slots_of(table, positions, write_mask)
        # No padding anywhere (batch 1, or rows of equal context): SDPA's unmasked path, and one graph fewer
        key_mask = None if bool(valid.all()) else valid.to(self.device)
        state_rows = None
        if self.pool.conv or any(seq.state_slot is not None for seq, _ in rows):
            state_rows = torch.tensor([seq.state_slot for seq, _ in rows], device=self.device)
        if self.compiled is not None and steps == 1 and not all_logits:
            # batch 1 has no padding; larger batches always pass the mask: two graphs in all, not three
            logits = self.compiled(ids.to(self.device), positions.to(self.device),
                                   None if batch == 1 else valid.to(self.device),
                                   write_slots.to(self.device), gather.to(self.device), state_rows)
            if logits is not None:
                return logits
        cache = PagedBatch(self.pool, write_slots.to(self.device),
                           None if bool(write_mask.all()) else write_mask.to(self.device),
                           gather.to(self.device), state_rows)
        cache.length = width - steps
        out = self.model(ids.to(self.device), attention_mask=key_mask,
                         position_ids=positions.to(self.device), cache=cache, logits_to_keep=0 if all_logits else 1)
        logits = out.logits.float()
        return logits if all_logits else logits[:, -1]

    @staticmethod
    def _inputs(rows: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T) token ids, positions and a real-token mask, left-padded."""
        steps = max(n for _, n in rows)
        ids, positions, mask = [], [], []
        for seq, n in rows:
            pad = steps - n
            start = seq.num_computed
            ids.append([0] * pad + seq.all_token_ids[start:start + n])
            positions.append([0] * pad + list(range(start, start + n)))
            mask.append([False] * pad + [True] * n)
        return torch.tensor(ids), torch.tensor(positions), torch.tensor(mask)

    @staticmethod
    def _block_table(rows: list[tuple[Sequence, int]]) -> torch.Tensor:
        """(B, max_blocks) block ids, padded with block 0."""
        longest = max(len(seq.block_ids) for seq, _ in rows)
        return torch.tensor([seq.block_ids + [0] * (longest - len(seq.block_ids)) for seq, _ in rows])

    def _gather_slots(self, table: torch.Tensor, contexts: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S) slots of each row's context right-aligned (padding -> slot 0), and the (B, S) real-key mask."""
        size = self.blocks.block_size
        key_pos = torch.arange(width)[None] - (width - contexts)[:, None]  # (B, S), negative = padding
        valid = key_pos >= 0
        key_pos = key_pos.clamp(min=0)
        slots = table.gather(1, key_pos // size) * size + key_pos % size
        return slots.masked_fill(~valid, 0), valid

    def _slots_of(self, table: torch.Tensor, positions: torch.Tensor, write_mask: torch.Tensor) -> torch.Tensor:
        """(N,) slots of the real new tokens, row-major (the order `rows[write_mask]` yields them)."""
        size = self.blocks.block_size
        slots = table.gather(1, positions // size) * size + positions % size
        return slots[write_mask]
