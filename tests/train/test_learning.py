"""A tiny model learns: on a copy task the loss falls below what any model that does not copy can reach."""

from __future__ import annotations

import math

from tinylm.tiny import build_tokenizer
from tinylm.train import train

DIGITS = 8


def test_tiny_llama_learns_to_copy(tmp_path, h):
    data = h.write_copy_task(tmp_path / "copy.jsonl", rows=2000, digits=DIGITS)
    # "> d1 .. d8 | d1 .. d8" + EOS: every digit is one token (" 3"), so a document is 1 + 8 + 2 + 8 + 1 = 20 tokens
    # and rows of 60 tokens hold exactly three documents.
    tokenizer = build_tokenizer()
    assert len(tokenizer.encode("> 1 2 3 4 5 6 7 8 | 1 2 3 4 5 6 7 8")) + 1 == 20
    config = h.pretrain_config(tmp_path, data, optim={"lr": 1e-2, "warmup_steps": 10},
                             train={"max_steps": 120, "global_batch_size": 16, "micro_batch_size": 16})
    losses = train(config).losses
    # Both halves random to a model that does not copy: 16 digits x ln 10 per 20 tokens (everything else is fixed);
    # a model that copies pays only for the first half: 8 x ln 10 / 20.
    no_copy_floor = 16 * math.log(10) / 20  # 1.84
    copy_floor = 8 * math.log(10) / 20  # 0.92
    final = sum(losses[-10:]) / 10
    assert losses[0] > 5.5  # starts near ln(512): chance over the vocabulary
    assert copy_floor - 0.05 < final < 0.75 * no_copy_floor, (final, losses[::10])
