"""Saving a run into a checkpoint, evaluating it on held-out data, and resuming from the newest one.

Only the main process writes (weights, optimizer, config, log); every process takes part in the collectives
(held-out loss, RNG states), so a checkpoint holds the RNG state of each process.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
import yaml

from tinylm.train import checkpoint as ckpt
from tinylm.train import fsdp
from tinylm.train.config import save_config
from tinylm.train.lora import MergedView, lora_modules, save_adapter
from tinylm.train.setup import autocast

# Keys that may change between a run and its resumption without changing what it computes.
_FREE_KEYS = {("checkpoint", "resume"), ("train", "progress"), ("train", "log_every"), ("train", "threads"),
              ("train", "micro_batch_size"), ("train", "eval_batches"), ("train", "peak_flops"), ("train", "device"),
              # how the same step is computed (rounding aside): a run may resume with other speed options or ranks
              ("train", "loss_chunk"), ("train", "compile"), ("train", "activation_checkpointing"),
              ("train", "parallel"), ("train", "prefetch")}


def prepare_out_dir(tr) -> None:
    """Remove half-written checkpoints, then resume from the newest complete one (if resuming)."""
    out_dir = tr.config.out_dir
    if tr.dist.main:
        ckpt.remove_temporaries(out_dir)
    tr.dist.barrier()
    found = ckpt.latest_checkpoint(out_dir)
    if found is not None and not tr.config.checkpoint.resume:
        raise ckpt.CheckpointError(f"{out_dir} already holds checkpoints; set checkpoint.resume: true to continue "
                                   "that run, or choose another checkpoint.out_dir")
    if found is None:
        if tr.dist.main:
            (out_dir / "log.jsonl").unlink(missing_ok=True)
        return
    restore(tr, found)
    if tr.dist.main:
        _truncate_log(out_dir / "log.jsonl", tr.progress.step)


def latest(tr) -> Path | None:
    return ckpt.latest_checkpoint(tr.config.out_dir)


class _StateView:
    """What export_hf_folder reads of a model (config, state_dict), over a state gathered whole from FSDP shards."""

    def __init__(self, config, state: dict) -> None:
        self.config, self._state = config, state

    def state_dict(self) -> dict:
        return self._state


def save(tr) -> Path:
    rngs = tr.dist.gather_objects(ckpt.rng_state())
    held_out = evaluate(tr)
    p = tr.progress
    whole = None
    if fsdp.is_sharded(tr.model):  # every process gathers, tensor by tensor; the main one writes
        whole = (_StateView(tr.model.config, fsdp.full_state(tr.model, tr.dist.main)),
                 fsdp.full_optimizer_state(tr.optimizer, tr.dist.main))
    if tr.dist.main:
        path = ckpt.write_atomically(tr.config.out_dir, p.step, partial(_write, tr, rngs, held_out, whole))
        tr.log.write({"event": "checkpoint", "step": p.step, "tokens": p.tokens, "path": str(path), **held_out})
    tr.dist.barrier()
    return tr.config.out_dir / ckpt.checkpoint_name(p.step)


def _write(tr, rngs: list[dict], held_out: dict, whole, folder: Path) -> None:
    """`whole`: (model view, optimizer state) gathered from FSDP shards, or None (the model and optimizer as they are)."""
    config, p = tr.config, tr.progress
    model, optimizer_state = whole if whole is not None else (tr.model, None)
    (folder / "trainer").mkdir()
    ckpt.save_optimizer(tr.optimizer, tr.param_names, folder / "trainer", optimizer_state)
    save_config(config, folder / "train_config.yaml")
    if config.lora is not None:
        base = str(Path(config.model.path).resolve()) if config.model.path else None
        save_adapter(tr.model, folder / "adapter", config.lora.r, config.lora.alpha, config.lora.dropout, base)
    if config.lora is None or config.lora.merge_on_export:
        from tinylm.weights.export import export_hf_folder

        export_hf_folder(MergedView(tr.model) if config.lora else model, folder, tokenizer=tr.tokenizer)
    state = {"step": p.step, "tokens": p.tokens, "samples": p.step * config.train.global_batch_size,
             "skipped_steps": p.skipped, "max_steps": tr.max_steps, "mode": config.mode,
             "loss": p.losses[-1] if p.losses else None, "world_size": tr.dist.world, **held_out, "rng": rngs}
    (folder / "trainer" / "state.json").write_text(json.dumps(state) + "\n")  # last: marks the folder complete


def restore(tr, folder: Path) -> None:
    state = ckpt.read_state(folder)
    _check_same_run(tr.config, folder)
    if tr.config.lora is not None:
        _restore_adapter(tr.model, folder / "adapter")
    else:
        _restore_weights(tr.model, folder)
    params = [p for group in tr.optimizer.param_groups for p in group["params"]]
    ckpt.load_optimizer(tr.optimizer, tr.param_names, folder / "trainer",
                        place=lambda index, value: fsdp.shard_like(value, params[index]))
    rngs = state["rng"]
    ckpt.set_rng_state(rngs[tr.dist.rank] if tr.dist.rank < len(rngs) else rngs[0])
    tr.progress.step, tr.progress.tokens = state["step"], state["tokens"]
    tr.progress.skipped = state.get("skipped_steps", 0)


def _restore_weights(model, folder: Path) -> None:
    from tinylm.weights import name_maps, safetensors_io

    config = model.config
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    current = model.state_dict()
    shapes = {name: tuple(t.shape) for name, t in current.items()}  # a DTensor's shape is the whole tensor's
    tensors = safetensors_io.load_checkpoint(folder, shapes, optional, rename=lambda stored: None if
                                             name_maps.is_computed_buffer(stored) else
                                             name_maps.to_module_name(config.model_type, stored))
    tensors = {name: fsdp.shard_like(t, current[name]) if name in current else t for name, t in tensors.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)  # copies into the optimizer's parameters
    if [m for m in missing if m not in optional] or unexpected:
        raise ckpt.CheckpointError(f"{folder}: weights do not fit the model ({missing[:3]}, {unexpected[:3]})")


def _restore_adapter(model, folder: Path) -> None:
    from safetensors.torch import load_file

    from tinylm.weights.lora_files import peft_key

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    with torch.no_grad():
        for name, module in lora_modules(model).items():
            for part in ("lora_A", "lora_B"):
                key = peft_key(model.config.model_type, name, part)
                if key not in tensors:
                    raise ckpt.CheckpointError(f"{folder}: adapter has no {key}")
                getattr(module, part).weight.copy_(tensors[key])


def _check_same_run(config, folder: Path) -> None:
    saved = yaml.safe_load((folder / "train_config.yaml").read_text())
    current = config.to_dict()
    for section in sorted(set(saved) | set(current)):
        old, new = saved.get(section), current.get(section)
        if not isinstance(old, dict) or not isinstance(new, dict):
            if old != new:
                raise _mismatch(folder, section, old, new)
            continue
        for key in sorted(set(old) | set(new)):
            if (section, key) not in _FREE_KEYS and old.get(key) != new.get(key):
                raise _mismatch(folder, f"{section}.{key}", old.get(key), new.get(key))


def _mismatch(folder: Path, key: str, old, new) -> ckpt.CheckpointError:
    return ckpt.CheckpointError(f"cannot resume from {folder}: {key} was {old!r}, the config now says {new!r}; "
                                "use another checkpoint.out_dir, or restore the setting")


def _truncate_log(path: Path, step: int) -> None:
    """Drop records of steps after the checkpoint (a crashed run logged them; they will be run again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept) + json.dumps({"event": "resumed", "step": step}) + "\n")


def evaluate(tr) -> dict:
    """Held-out loss (and DPO reward metrics) over up to train.eval_batches micro-batches per process."""
    rows, t, dist = tr.task.eval, tr.config.train, tr.dist
    if rows is None or len(rows) == 0:
        return {}
    total = len(rows) if t.eval_batches is None else min(len(rows), t.eval_batches * t.micro_batch_size * dist.world)
    mine = list(range(dist.rank, total, dist.world))
    objective = tr.task.objective
    sums = None
    tr.model.eval()
    with torch.no_grad(), autocast(tr.precision, dist.device):
        for i in range(0, len(mine), t.micro_batch_size):
            batch = tr.task.collate([rows[j] for j in mine[i:i + t.micro_batch_size]])
            loss, extra = objective(**{k: v.to(dist.device) for k, v in batch.items() if v is not None})
            part = [loss.item(), float(tr.task.count(batch)), *extra.double().tolist()]
            sums = part if sums is None else [a + b for a, b in zip(sums, part)]
    tr.model.train()
    width = 2 + len(objective.metric_names)
    loss, count, *metrics = dist.all_reduce_sum(sums or [0.0] * width)
    result = {"eval_loss": loss / max(count, 1.0)}
    result.update({f"eval_{name}": v / max(count, 1.0) for name, v in zip(objective.metric_names, metrics)})
    return result
