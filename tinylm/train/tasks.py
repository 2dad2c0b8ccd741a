"""The three modes as one shape: train/eval rows, a collate function, and an objective module that returns a
loss *sum* (plus metric sums), with `count(batch)` giving the units the sum is averaged over (label tokens or pairs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from tinylm.train import chat, data, preference, shards
from tinylm.train.config import TrainConfig
from tinylm.train.fused_loss import linear_cross_entropy_sum, shifted_labels
from tinylm.train.lora import adapters_disabled
from tinylm.train.losses import dpo_loss, lm_loss_sum, sequence_logps


class LMObjective(nn.Module):
    """Next-token loss for pretraining and SFT: forward(batch) -> (loss sum, no extra metrics).

    With loss_chunk > 0 and a plain nn.Linear head, the head and the loss run fused in chunks of that many tokens
    (fused_loss.py): the (B, T, V) logits never exist. A LoRA-wrapped or quantized head takes the plain path."""

    metric_names: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, loss_chunk: int = 0, compiled: bool = False) -> None:
        super().__init__()
        self.model = model
        self.loss_chunk, self.compiled = loss_chunk, compiled

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        head = self.model.lm_head
        if self.loss_chunk and type(head) is nn.Linear:
            hidden = self.model.hidden_states(input_ids, attention_mask, position_ids)  # (B, T, C)
            loss = linear_cross_entropy_sum(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias,
                                            shifted_labels(labels), self.loss_chunk, self.compiled)
        else:
            logits = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
            loss = lm_loss_sum(logits, labels)
        return loss, torch.zeros(0, device=input_ids.device)


class DPOObjective(nn.Module):
    """Sigmoid DPO on a batch of pairs (chosen rows then rejected rows, as collate_pairs builds it)."""

    metric_names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                    "logps/chosen", "logps/rejected")

    def __init__(self, model: nn.Module, reference: nn.Module | None, beta: float, label_smoothing: float) -> None:
        super().__init__()
        self.model = model
        self._reference = [reference]  # a list keeps the frozen copy out of the module tree (and out of DDP)
        self.beta, self.label_smoothing = beta, label_smoothing

    def forward(self, input_ids, attention_mask, completion_mask):
        logps = sequence_logps(self.model(input_ids, attention_mask=attention_mask).logits, input_ids, completion_mask)
        with torch.no_grad():
            ref_logps = sequence_logps(self._reference_logits(input_ids, attention_mask), input_ids, completion_mask)
        half = input_ids.shape[0] // 2
        losses, chosen_r, rejected_r = dpo_loss(logps[:half], logps[half:], ref_logps[:half], ref_logps[half:],
                                                self.beta, self.label_smoothing)
        metrics = torch.stack([chosen_r.sum(), rejected_r.sum(), (chosen_r > rejected_r).float().sum(),
                               (chosen_r - rejected_r).sum(), logps[:half].detach().sum(),
                               logps[half:].detach().sum()])
        return losses.sum(), metrics

    def _reference_logits(self, input_ids, attention_mask):
        reference = self._reference[0]
        if reference is not None:
            return reference(input_ids, attention_mask=attention_mask).logits
        with adapters_disabled(self.model):
            return self.model(input_ids, attention_mask=attention_mask).logits


@dataclass
class Task:
    train: object  # indexable rows
    eval: object | None
    collate: callable
    count: callable  # batch -> units of the loss mean (label tokens, or pairs)
    objective: nn.Module
    notes: list[str] = field(default_factory=list)


def build_task(config: TrainConfig, model: nn.Module, tokenizer, reference, dist) -> Task:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if config.mode == "pretrain":
        train, evaluation = _pretrain_rows(config, tokenizer, model.config.vocab_size, dist)
        return Task(train, evaluation, partial(data.collate_lm, pad_id=pad), data.count_label_tokens,
                    LMObjective(model, config.train.loss_chunk, config.train.compile))
    if config.mode == "sft":
        train, evaluation, notes = _sft_rows(config, tokenizer)
        return Task(train, evaluation, partial(data.collate_lm, pad_id=pad), data.count_label_tokens,
                    LMObjective(model, config.train.loss_chunk, config.train.compile), notes)
    train, evaluation = _dpo_rows(config, tokenizer)
    objective = DPOObjective(model, reference, config.dpo.beta, config.dpo.label_smoothing)
    return Task(train, evaluation, partial(preference.collate_pairs, pad_id=pad),
                lambda batch: batch["input_ids"].shape[0] // 2, objective)


def _pretrain_rows(config: TrainConfig, tokenizer, vocab_size: int, dist):
    d = config.data
    cache = Path(d.cache_dir) if d.cache_dir else config.out_dir / "token_cache"

    def stream(files: list[str]) -> shards.TokenShards:
        if dist.main:  # one process tokenizes; the others open its shards
            shards.build_shards(files, tokenizer, cache, d.text_field, vocab_size, d.shard_tokens)
        dist.barrier()
        return shards.TokenShards(shards.build_shards(files, tokenizer, cache, d.text_field, vocab_size,
                                                      d.shard_tokens))

    train = data.PackedDataset(stream(d.train), d.seq_len)
    if d.eval:
        evaluation = data.PackedDataset(stream(d.eval), d.seq_len)
    else:
        train, evaluation = train.split(d.eval_fraction)
    if len(train) == 0:
        raise shards.DataError(f"data.train holds fewer tokens than one sequence of data.seq_len={d.seq_len}")
    return train, evaluation


def _sft_rows(config: TrainConfig, tokenizer):
    d, notes = config.data, []

    def rows_of(files: list[str]) -> list[dict]:
        rows = []
        for path in files:
            found, dropped = chat.sft_rows(path, tokenizer, d.seq_len)
            rows += found
            if dropped:
                notes.append(f"{path}: {dropped} conversations had no assistant token within data.seq_len")
        return chat.pack_rows(rows, d.seq_len) if d.packing else rows

    train = data.ListDataset(rows_of(d.train))
    evaluation = data.ListDataset(rows_of(d.eval)) if d.eval else None
    if evaluation is None:
        train, evaluation = train.split(d.eval_fraction)
    if len(train) == 0:
        raise shards.DataError("data.train holds no conversation with an assistant turn")
    return train, evaluation, notes


def _dpo_rows(config: TrainConfig, tokenizer):
    d = config.data

    def rows_of(files: list[str]) -> list[dict]:
        return [row for path in files
                for row in preference.preference_rows(path, tokenizer, config.dpo.max_prompt_length, d.seq_len)]

    train = data.ListDataset(rows_of(d.train))
    evaluation = data.ListDataset(rows_of(d.eval)) if d.eval else None
    if evaluation is None:
        train, evaluation = train.split(d.eval_fraction)
    if len(train) == 0:
        raise shards.DataError("data.train holds no preference pair")
    return train, evaluation
