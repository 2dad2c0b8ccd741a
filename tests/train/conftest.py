"""Helpers for the training tests: small data files and configs for tiny models (one thread: the machine is shared)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tinylm.train.config import TrainConfig, config_from_dict

REPO = Path(__file__).resolve().parents[2]


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


def torchrun(config: TrainConfig, tmp_path: Path, mode: str, *extra: str, nproc: int = 2,
             timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N -m tinylm.cli train MODE CONFIG [extra...]`, one thread a process."""
    path = tmp_path / f"{mode}-{config.out_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "tinylm.cli", "train", mode, str(path), *extra]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM lets torchrun stop its workers (a SIGKILL left them running, waiting on each other, for good);
        # the group kill is the fallback
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s; its output:\n{out[-1500:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


@pytest.fixture
def h():
    """The helpers above (test files cannot import conftest under --import-mode=importlib)."""
    from types import SimpleNamespace

    return SimpleNamespace(write_copy_task=write_copy_task, pretrain_config=pretrain_config,
                           conversations=conversations, write_jsonl=write_jsonl, torchrun=torchrun)
