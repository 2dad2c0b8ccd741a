"""Resume is exact (fp32, CPU), a checkpoint write killed half way leaves the previous checkpoint to resume from, and
non-finite steps are skipped, then stop the run with a clear message."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from tinylm.train import TrainingError, train
from tinylm.train import checkpoint as ckpt
from tinylm.train.metrics import read_log
from tinylm.train.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def long_epoch_data(tmp_path, h):
    # 900 documents of 20 tokens = 300 rows of 60: an epoch is 37.5 steps of 8 rows, so both resume points (13, 27)
    # fall inside epoch 0 and the run crosses into epoch 1 (a reshuffle) at step 38.
    return h.write_copy_task(tmp_path / "copy.jsonl", rows=900)


def _straight(tmp_path, h, data, **sections):
    return train(h.pretrain_config(tmp_path, data, out="straight", **sections)).losses


def test_resume_twice_within_an_epoch_is_exact(tmp_path, h, long_epoch_data):
    expected = _straight(tmp_path, h, long_epoch_data)
    config = h.pretrain_config(tmp_path, long_epoch_data, out="resumed")
    first = train(config, stop_after=13)
    second = train(config, stop_after=27)
    third = train(config)
    assert (first.step, second.step, third.step) == (13, 27, 40)
    resumed = first.losses + second.losses + third.losses
    assert len(resumed) == 40
    assert max(abs(a - b) for a, b in zip(resumed, expected)) <= 1e-6
    state = ckpt.read_state(third.last_checkpoint)
    assert state["step"] == 40 and state["samples"] == 320 and state["tokens"] == 40 * 8 * 60
    log = read_log(config.out_dir / "log.jsonl")
    assert [r["step"] for r in log if "loss" in r and "event" not in r] == list(range(1, 41))
    assert [r["step"] for r in log if r.get("event") == "resumed"] == [13, 27]


def test_lora_dropout_resume_is_exact(tmp_path, h, long_epoch_data):
    """Under LoRA with dropout the RNG state matters: the resumed run must draw the same dropout masks."""
    lora = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    base = h.pretrain_config(tmp_path, long_epoch_data, out="base", train={"max_steps": 2})
    train(base)
    model_path = str(base.out_dir / ckpt.checkpoint_name(2))
    sections = dict(model={"path": model_path, "family": None, "tokenizer": None}, lora=lora,
                    train={"max_steps": 20})
    expected = _straight(tmp_path, h, long_epoch_data, **sections)
    config = h.pretrain_config(tmp_path, long_epoch_data, out="lora", **sections)
    resumed = train(config, stop_after=9).losses + train(config).losses
    assert max(abs(a - b) for a, b in zip(resumed, expected)) <= 1e-6
    assert len(resumed) == 20


def test_kill_during_checkpoint_write_resumes_from_previous(tmp_path, h, copy_data):
    tokens_per_step = 8 * 60
    config = h.pretrain_config(tmp_path, copy_data, out="crash", train={"max_steps": 30},
                               checkpoint={"every_tokens": 10 * tokens_per_step})
    config_file = tmp_path / "crash.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    # The process SIGKILLs itself inside the write of checkpoint 20: after every file is written, before the rename.
    script = textwrap.dedent(f"""
        import os, signal, sys
        from tinylm.train import checkpoint
        def die(tmp):
            if "0000020" in tmp.name:
                os.kill(os.getpid(), signal.SIGKILL)
        checkpoint._before_rename = die
        from tinylm.cli import main
        sys.exit(main(["train", "pretrain", {str(config_file)!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    names = sorted(p.name for p in config.out_dir.iterdir())
    assert "checkpoint-0000010" in names and "checkpoint-0000020" not in names
    assert any(n.startswith(ckpt.TMP_PREFIX + "0000020") for n in names)
    assert (config.out_dir / next(n for n in names if n.startswith(ckpt.TMP_PREFIX)) / "model.safetensors").is_file()
    assert ckpt.latest_checkpoint(config.out_dir).name == "checkpoint-0000010"

    resumed = train(config)  # same config: picks up checkpoint 10, removes the half-written folder
    assert not any(p.name.startswith(ckpt.TMP_PREFIX) for p in config.out_dir.iterdir())
    expected = _straight(tmp_path, h, copy_data, train={"max_steps": 30})
    assert len(resumed.losses) == 20
    assert max(abs(a - b) for a, b in zip(resumed.losses, expected[10:])) <= 1e-6
    log = read_log(config.out_dir / "log.jsonl")
    assert [r["step"] for r in log if r.get("event") == "resumed"] == [10]
    assert [r["step"] for r in log if r.get("event") == "checkpoint"] == [10, 20, 30]


def _poison(monkeypatch, steps: set[int], where: str):
    original = Trainer._accumulate

    def accumulate(self, batches, count):
        totals = original(self, batches, count)
        if self.progress.step + 1 in steps:
            if where == "loss":
                totals[0] = math.nan
            else:
                next(p for p in self.model.parameters() if p.grad is not None).grad.fill_(math.inf)
        return totals

    monkeypatch.setattr(Trainer, "_accumulate", accumulate)


def test_one_bad_step_is_skipped(tmp_path, h, copy_data, monkeypatch):
    _poison(monkeypatch, {7}, "grad")
    config = h.pretrain_config(tmp_path, copy_data, train={"max_steps": 10})
    trainer = Trainer(config)
    before = {}

    original_step = trainer.optimizer.step

    def step(*args, **kwargs):
        before[trainer.progress.step] = True
        return original_step(*args, **kwargs)

    trainer.optimizer.step = step
    result = trainer.run()
    assert result.step == 10 and 6 not in before and len(before) == 9  # no optimizer step for step 7 (index 6)
    skipped = [r for r in read_log(config.out_dir / "log.jsonl") if r.get("event") == "skipped_step"]
    assert [r["step"] for r in skipped] == [7] and skipped[0]["grad_norm"] == "inf"
    assert ckpt.read_state(result.last_checkpoint)["skipped_steps"] == 1


def test_bad_steps_in_a_row_stop_the_run(tmp_path, h, copy_data, monkeypatch):
    _poison(monkeypatch, {6, 7, 8, 9, 10}, "loss")
    config = h.pretrain_config(tmp_path, copy_data, train={"max_steps": 20, "max_bad_steps": 3},
                               checkpoint={"every_tokens": 4 * 8 * 60})
    with pytest.raises(TrainingError) as info:
        train(config)
    message = str(info.value)
    assert "3 steps in a row" in message and "checkpoint-0000004" in message and "\n" not in message
    assert [p.name for p in ckpt.list_checkpoints(config.out_dir)] == ["checkpoint-0000004"]
    weights = json.loads((config.out_dir / "checkpoint-0000004" / "trainer" / "state.json").read_text())
    assert weights["step"] == 4
    from tinylm.loading import load_model

    model = load_model(config.out_dir / "checkpoint-0000004").model
    assert all(torch.isfinite(p).all() for p in model.parameters())
