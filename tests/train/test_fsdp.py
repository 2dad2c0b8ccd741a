"""FSDP2 (`train.parallel: fsdp`) under `torchrun --nproc_per_node=2` on CPU (gloo): the losses of one process with
the same global batch; consolidated checkpoints (the same Hugging Face folder a single process exports) that a
single process resumes from exactly."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file

from tinylm.train import checkpoint as ckpt
from tinylm.train import train
from tinylm.train.metrics import read_log

STEPS, EVERY = 6, 3


def _losses(out_dir) -> list[float]:
    return [r["loss"] for r in read_log(out_dir / "log.jsonl") if "event" not in r]


def _same_folder(got, want, atol: float) -> None:
    """The same files, config and tokenizer byte for byte, the same tensors (names, shapes, dtypes), close values."""
    names = lambda folder: sorted(p.name for p in folder.iterdir() if p.is_file())  # noqa: E731
    assert names(got) == names(want)
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (got / name).read_bytes() == (want / name).read_bytes(), name
    a, b = load_file(str(got / "model.safetensors")), load_file(str(want / "model.safetensors"))
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
    assert max((a[k] - b[k]).abs().max().item() for k in a) < atol


def test_fsdp_two_processes_match_one_and_resume_on_one(tmp_path, h, copy_data):
    # one process: 2 micro-batches of 4; two FSDP processes: 2 micro-batches of 2 each (gradient sync on the last)
    sections = dict(train={"max_steps": STEPS}, checkpoint={"every_tokens": EVERY * 8 * 60})
    single = h.pretrain_config(tmp_path, copy_data, out="one", **sections)
    sharded = h.pretrain_config(tmp_path, copy_data, out="fsdp", **{
        **sections, "train": {"max_steps": STEPS, "micro_batch_size": 2, "parallel": "fsdp"}})
    expected = train(single).losses
    proc = h.torchrun(sharded, tmp_path, "pretrain")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _losses(sharded.out_dir)
    assert len(got) == STEPS
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-5, (got, expected)
    note = next(r["message"] for r in read_log(sharded.out_dir / "log.jsonl")
                if r.get("event") == "note" and r["message"].startswith("FSDP2"))
    local, total = (int(n.replace(",", "")) for n in note.split("holds ")[1].split(" parameter")[0].split(" of "))
    assert note.startswith("FSDP2 over 2 processes") and local < 0.6 * total  # sharded, not replicated

    # consolidated checkpoints: the folder one process writes, optimizer state included
    assert [p.name for p in ckpt.list_checkpoints(sharded.out_dir)] == \
        [p.name for p in ckpt.list_checkpoints(single.out_dir)]
    for step in (EVERY, STEPS):
        name = ckpt.checkpoint_name(step)
        _same_folder(sharded.out_dir / name, single.out_dir / name, atol=1e-5)
        got_opt = load_file(str(sharded.out_dir / name / "trainer" / "optimizer.safetensors"))
        want_opt = load_file(str(single.out_dir / name / "trainer" / "optimizer.safetensors"))
        assert got_opt.keys() == want_opt.keys()
        assert all(torch.allclose(got_opt[k], want_opt[k], atol=1e-6) for k in got_opt)
    state = ckpt.read_state(sharded.out_dir / ckpt.checkpoint_name(STEPS))
    assert state["world_size"] == 2

    # resume the FSDP run from its step-3 checkpoint in one process (world 1: nothing to shard): exact
    shutil.rmtree(sharded.out_dir / ckpt.checkpoint_name(STEPS))
    result = train(sharded)
    assert result.step == STEPS and len(result.losses) == STEPS - EVERY
    assert max(abs(a - b) for a, b in zip(result.losses, expected[EVERY:])) < 1e-5, (result.losses, expected)
    _same_folder(result.last_checkpoint, single.out_dir / ckpt.checkpoint_name(STEPS), atol=1e-5)
    assert json.loads((result.last_checkpoint / "trainer" / "state.json").read_text())["world_size"] == 1
