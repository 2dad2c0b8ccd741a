"""Datasets as indexable rows, the order rows are visited in, and collation into padded tensors.

The order is a pure function of (seed, epoch): sample k of the run is `order.index(k)`, so a run resumed at any step
reads exactly the rows the uninterrupted run would have read, whatever the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tinylm.train.shards import TokenShards

IGNORE = -100


class PackedDataset:
    """Fixed-length rows cut from a token stream (documents joined by EOS, attention across them, as in GPT-2)."""

    def __init__(self, stream: TokenShards, seq_len: int, start: int = 0, stop: int | None = None) -> None:
        self.stream, self.seq_len = stream, seq_len
        total = len(stream) // seq_len
        self.start, self.stop = start, total if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> dict:
        begin = (self.start + i) * self.seq_len
        ids = self.stream.read(begin, begin + self.seq_len)
        return {"input_ids": ids, "labels": ids}

    def split(self, eval_fraction: float) -> tuple[PackedDataset, PackedDataset | None]:
        """The last `eval_fraction` of the rows held out (at least one row when the fraction is positive)."""
        if eval_fraction <= 0:
            return self, None
        held = max(1, round(len(self) * eval_fraction))
        cut = self.stop - held
        return (PackedDataset(self.stream, self.seq_len, self.start, cut),
                PackedDataset(self.stream, self.seq_len, cut, self.stop))


class ListDataset:
    """Rows already in memory (SFT conversations, DPO pairs)."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]

    def split(self, eval_fraction: float) -> tuple[ListDataset, ListDataset | None]:
        if eval_fraction <= 0:
            return self, None
        held = max(1, round(len(self.rows) * eval_fraction))
        return ListDataset(self.rows[:-held]), ListDataset(self.rows[-held:])


@dataclass
class SampleOrder:
    """Sample k of the run -> row index: a fresh permutation each epoch, seeded by (seed, epoch)."""

    size: int
    seed: int
    shuffle: bool = True

    def __post_init__(self) -> None:
        self._epoch, self._perm = -1, None

    def index(self, k: int) -> int:
        epoch, pos = divmod(k, self.size)
        if not self.shuffle:
            return pos
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return int(self._perm[pos])

    def epoch(self, k: int) -> float:
        return k / self.size


def rank_slice(first_sample: int, global_batch: int, rank: int, world: int) -> range:
    """The run-wide sample numbers this process reads for one step: its contiguous share of the global batch."""
    per_rank = global_batch // world
    start = first_sample + rank * per_rank
    return range(start, start + per_rank)


def collate_lm(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows of input_ids / labels (and position_ids when packed) into tensors.

    -> input_ids (B, T), labels (B, T) with IGNORE at padding, attention_mask (B, T) or None when nothing is padded,
    position_ids (B, T) when the rows carry them.
    """
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.as_tensor(np.asarray(row["input_ids"], dtype=np.int64))
        labels[i, :n] = torch.as_tensor(np.asarray(row["labels"], dtype=np.int64))
        mask[i, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": None if bool(mask.all()) else mask}
    if "position_ids" in rows[0]:
        pos = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            pos[i, :len(row["position_ids"])] = torch.as_tensor(row["position_ids"])
        batch["position_ids"] = pos
    return batch


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss: a label at position t+1 is predicted from position t (HF shift)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a batch, for tokens/s and checkpoint spacing."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()
