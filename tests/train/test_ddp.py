"""`torchrun --nproc_per_node=2` (gloo, CPU) gives the losses of one process with the same global batch; the
checkpoints and the log are written once."""

from __future__ import annotations

from tinylm.train import checkpoint as ckpt
from tinylm.train import train
from tinylm.train.config import config_from_dict
from tinylm.train.metrics import read_log


def _losses(config) -> list[float]:
    return [r["loss"] for r in read_log(config.out_dir / "log.jsonl") if "event" not in r]


def _compare(single, ddp, tmp_path, mode, torchrun):
    expected = train(single).losses
    proc = torchrun(ddp, tmp_path, mode)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _losses(ddp)
    assert len(got) == len(expected)
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-5, (got, expected)
    assert [p.name for p in ckpt.list_checkpoints(ddp.out_dir)] == [p.name for p in ckpt.list_checkpoints(single.out_dir)]
    state = ckpt.read_state(ckpt.latest_checkpoint(ddp.out_dir))
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # every process's RNG state, written by rank 0
    return got


def test_pretrain_two_processes_match_one(tmp_path, h, copy_data):
    # global batch 8: one process does 2 micro-batches of 4; two processes do 2 micro-batches of 2 each
    single = h.pretrain_config(tmp_path, copy_data, out="one", train={"max_steps": 6},
                               checkpoint={"every_tokens": 3 * 8 * 60})
    ddp = h.pretrain_config(tmp_path, copy_data, out="two", train={"max_steps": 6, "micro_batch_size": 2},
                            checkpoint={"every_tokens": 3 * 8 * 60})
    _compare(single, ddp, tmp_path, "pretrain", h.torchrun)
    # The shared token cache was built once; every rank read from it
    assert len(list((tmp_path / "cache").glob("tokens-*"))) == 1


def test_sft_accumulation_split_does_not_change_the_loss(tmp_path, h, tiny_folder):
    """Rows of different lengths: the loss is a mean over the global batch's assistant tokens, so splitting the
    batch into more micro-batches (as more processes do) changes nothing. In-process: the cross-process sum is the
    same code path with an all-reduce added (covered by the torchrun test above)."""
    model = tiny_folder("qwen2", seed=0)
    data = h.write_jsonl(tmp_path / "chat.jsonl", h.conversations() * 4)

    def run(out: str, micro: int):
        return train(config_from_dict({
            "mode": "sft", "model": {"path": str(model)}, "data": {"train": [str(data)], "seq_len": 96},
            "optim": {"lr": 5e-3}, "checkpoint": {"out_dir": str(tmp_path / out)},
            "train": {"max_steps": 4, "global_batch_size": 4, "micro_batch_size": micro, "precision": "fp32",
                      "progress": False, "threads": 1}})).losses

    whole, split = run("whole", 4), run("split", 1)
    assert max(abs(a - b) for a, b in zip(whole, split)) < 1e-5
    assert split[-1] < split[0]
