"""Helpers for the training tests: small data files and configs for tiny models (one thread: the machine is shared)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tinylm.train.config import TrainConfig, config_from_dict


def write_copy_task(path: Path, rows: int, digits: int = 8, seed: int = 0) -> Path:
    """JSONL documents "> d1 .. dn | d1 .. dn": the second half copies the first (random) half."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(rows):
            d = " ".join(str(rng.randrange(10)) for _ in range(digits))
            handle.write(json.dumps({"text": f"> {d} | {d}"}) + "\n")
    return path


def pretrain_config(tmp: Path, data: Path, out: str = "run", **sections) -> TrainConfig:
    base = {
        "mode": "pretrain",
        "model": {"family": "llama", "tokenizer": "tiny"},
        "data": {"train": [str(data)], "seq_len": 60, "cache_dir": str(tmp / "cache")},
        "optim": {"lr": 3e-3, "warmup_steps": 5, "weight_decay": 0.0},
        "train": {"max_steps": 40, "global_batch_size": 8, "micro_batch_size": 4, "precision": "fp32",
                  "progress": False, "threads": 1},
        "checkpoint": {"out_dir": str(tmp / out)},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return config_from_dict(base)


@pytest.fixture
def copy_data(tmp_path) -> Path:
    return write_copy_task(tmp_path / "copy.jsonl", rows=200)


def conversations() -> list[dict]:
    return [
        {"messages": [{"role": "system", "content": "You are terse."},
                      {"role": "user", "content": "What is the capital of France?"},
                      {"role": "assistant", "content": "Paris."},
                      {"role": "user", "content": "And of Japan?"},
                      {"role": "assistant", "content": "Tokyo, \u6771\u4eac."}]},
        {"messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi there"}]},
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def h():
    """The helpers above (test files cannot import conftest under --import-mode=importlib)."""
    from types import SimpleNamespace

    return SimpleNamespace(write_copy_task=write_copy_task, pretrain_config=pretrain_config,
                           conversations=conversations, write_jsonl=write_jsonl)
