"""The training loop shared by pretraining, SFT and DPO.

One step = one global batch (train.global_batch_size rows, whatever the number of processes): each process takes
its contiguous share, in micro-batches; every micro-batch's loss *sum* is divided by the step's global count (label
tokens or pairs, summed over processes), so the gradient is the global-batch mean however the batch is split.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinylm.errors import TinyLMError
from tinylm.train import fsdp, run_state
from tinylm.train.config import TrainConfig
from tinylm.train.data import SampleOrder, count_tokens, rank_slice
from tinylm.train.dist import Dist, init_distributed, shutdown
from tinylm.train.lora import apply_lora
from tinylm.train.loader import Prefetcher
from tinylm.train.metrics import RunLog, flops_per_token, measured_peak_flops, mfu
from tinylm.train.preemption import StopSignals
from tinylm.train.setup import autocast, build_model, build_optimizer, load_reference, lr_at, resolve_precision
from tinylm.train.speed import apply_speed_options
from tinylm.train.tasks import build_task


class TrainingError(TinyLMError, RuntimeError):
    """A run that had to stop (non-finite losses or gradients): the message names the last good checkpoint."""


@dataclass
class Progress:
    step: int = 0  # steps taken (skipped ones included): the data position is step x global batch
    tokens: int = 0
    skipped: int = 0
    bad_in_a_row: int = 0
    losses: list[float] = field(default_factory=list)  # every step's loss in this process's run (for tests, logs)


@dataclass
class TrainResult:
    out_dir: Path
    last_checkpoint: Path | None
    step: int
    losses: list[float]
    stopped_by: str | None = None  # "SIGTERM" / "SIGINT" when a signal stopped the run early (checkpoint saved)


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.dist: Dist = init_distributed(config.train.device)
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        torch.manual_seed(config.train.seed + self.dist.rank)  # LoRA dropout differs per process, as in DDP
        self.model, self.tokenizer = build_model(config, self.dist.device)
        if config.lora is not None:
            lo = config.lora
            apply_lora(self.model, lo.r, lo.alpha, lo.dropout, lo.target_modules, seed=config.train.seed)
        reference = load_reference(config, self.dist.device) if config.mode == "dpo" else None
        self.task = build_task(config, self.model, self.tokenizer, reference, self.dist)
        t = config.train
        self.task.notes += apply_speed_options(self.model, t.compile, t.activation_checkpointing)
        self.sharded = self.dist.enabled and t.parallel == "fsdp"
        if self.sharded:  # before the optimizer: sharding replaces the parameters by DTensors
            fsdp.shard(self.task.objective, self.model)
            self.task.notes.append(fsdp.describe(self.model, self.dist.world))
        self.optimizer, self.param_names = build_optimizer(self.model, config.optim)
        self.precision = resolve_precision(t.precision, self.dist.device)
        self.order = SampleOrder(len(self.task.train), t.seed, config.data.shuffle)
        self.max_steps = self._max_steps()
        self.progress = Progress()
        self.objective = self._wrap(self.task.objective)
        self.loader = Prefetcher(self._micro_batches, self.dist.device, enabled=t.prefetch)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.peak = (t.peak_flops or measured_peak_flops(self.dist.device, dtype)) * self.dist.world
        self.flops_token = flops_per_token(self.model, config.data.seq_len)
        self.stop = StopSignals(announce=self.dist.main)

    def _max_steps(self) -> int:
        t, d = self.config.train, self.config.data
        if t.max_steps is not None:
            return t.max_steps
        return math.ceil(t.max_tokens / (t.global_batch_size * d.seq_len))

    def _wrap(self, objective):
        if not self.dist.enabled or self.sharded:  # FSDP2 shards the module in place: no wrapper
            return objective
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.dist.local_rank] if self.dist.device.type == "cuda" else None
        # MoE experts a micro-batch does not route to get no gradient: DDP must be told to look for them
        return DistributedDataParallel(objective, device_ids=ids, find_unused_parameters=self.model.config.num_experts > 0)

    # --- the loop

    def run(self, stop_after: int | None = None) -> TrainResult:
        """Train to max_steps (or stop after `stop_after` steps, saving a checkpoint to resume from).

        SIGTERM / SIGINT during the run stop it after the step in progress, with a checkpoint saved (see
        preemption.py); the result's `stopped_by` then names the signal.
        """
        try:
            with self.stop.handlers():
                return self._run(stop_after)
        finally:
            # DDP's reducer holds the process group: destroyed after it (when the Trainer goes), its gloo
            # teardown could wait forever on a peer that had already exited (a worker stuck right after the last
            # checkpoint, about 1 run in 12 of tests/train/test_ddp.py; py-spy showed it in train()'s return)
            self.objective = self.task.objective
            self.loader.close()
            shutdown(self.dist)

    def _run(self, stop_after: int | None) -> TrainResult:
        config = self.config
        run_state.prepare_out_dir(self)
        self.log = RunLog(config.out_dir / "log.jsonl" if self.dist.main else None, self.max_steps,
                          self.progress.step, config.train.progress)
        for note in self.task.notes:
            self.log.write({"event": "note", "message": note})
        last = run_state.latest(self)
        end = min(self.max_steps, stop_after) if stop_after is not None else self.max_steps
        every = config.checkpoint.every_tokens
        stopped_by = None
        while self.progress.step < end and stopped_by is None:
            tokens_before = self.progress.tokens
            self._step()
            crossed = every is not None and tokens_before // every != self.progress.tokens // every
            finished = self.progress.step == end  # the same on every rank, as `crossed` (tokens are all-reduced)
            stopped_by = None if finished else self._agreed_stop()
            if crossed or finished or stopped_by:
                last = run_state.save(self)
                if not (finished or stopped_by):  # a signal during a periodic save: stop at it, not one step on
                    stopped_by = self._agreed_stop()
        if stopped_by:
            self.log.write({"event": "stopped", "signal": stopped_by, "step": self.progress.step, "path": str(last)})
        self.log.close()
        return TrainResult(config.out_dir, last, self.progress.step, self.progress.losses, stopped_by)

    def _agreed_stop(self) -> str | None:
        """The stop signal seen by any process, the same answer on every process (one tiny all-reduce when
        distributed): ranks may get the signal at different steps but must stop after the same one, to save one
        checkpoint together. Ranks that saw different signals report the larger number (SIGTERM over SIGINT)."""
        signum = self.dist.max_int(self.stop.signum or 0)
        return signal.Signals(signum).name if signum else None

    def _step(self) -> None:
        config, dist, p = self.config, self.dist, self.progress
        started = time.perf_counter()
        lr = lr_at(p.step, config.optim, self.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = self.loader.get(p.step)
        count = dist.all_reduce_sum([float(sum(self.task.count(b) for b in batches))])[0]
        totals = self._accumulate(batches, max(count, 1.0))
        loss_sum, tokens, *metrics = dist.all_reduce_sum(totals)
        loss = loss_sum / max(count, 1.0)
        grad_norm = self._clip()
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        p.step += 1
        p.tokens += int(tokens)
        p.losses.append(loss)
        record = {"step": p.step, "tokens": p.tokens, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "epoch": round(self.order.epoch(p.step * config.train.global_batch_size), 4)}
        record.update({name: v / max(count, 1.0) for name, v in zip(self.task.objective.metric_names, metrics)})
        elapsed = max(time.perf_counter() - started, 1e-9)
        record.update(tokens_per_s=tokens / elapsed, mfu=mfu(self.flops_token, tokens / elapsed, self.peak))
        self._after_step(record, finite)

    def _micro_batches(self, step: int) -> list[dict]:
        t = self.config.train
        numbers = rank_slice(step * t.global_batch_size, t.global_batch_size, self.dist.rank, self.dist.world)
        rows = [self.task.train[self.order.index(k)] for k in numbers]
        return [self.task.collate(rows[i:i + t.micro_batch_size]) for i in range(0, len(rows), t.micro_batch_size)]

    def _accumulate(self, batches: list[dict], count: float) -> list[float]:
        """Forward and backward every micro-batch; -> [loss sum, tokens, metric sums...] of this process."""
        loss_sum, tokens, metrics = 0.0, 0, None
        scale = self.dist.world / count  # DDP averages gradients over processes; undo that to get a global mean
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            inputs = self.loader.to_device(batch)
            with self._gradient_sync(last):
                with autocast(self.precision, self.dist.device):
                    part, extra = self.objective(**inputs)
                (part * scale).backward()
            loss_sum += part.item()
            tokens += count_tokens(batch)
            metrics = extra.detach().double() if metrics is None else metrics + extra.detach().double()
        return [loss_sum, float(tokens), *metrics.tolist()]

    def _gradient_sync(self, last: bool):
        """Gradients are reduced over processes after the step's last micro-batch only."""
        if not self.dist.enabled:
            return nullcontext()
        if self.sharded:
            self.objective.set_requires_gradient_sync(last)
            return nullcontext()
        return nullcontext() if last else self.objective.no_sync()

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        limit = self.config.optim.grad_clip or float("inf")
        return fsdp.total_norm(torch.nn.utils.clip_grad_norm_(params, limit))

    def _after_step(self, record: dict, finite: bool) -> None:
        p, config = self.progress, self.config
        if finite:
            p.bad_in_a_row = 0
            if p.step % config.train.log_every == 0 or p.step == self.max_steps:
                self.log.step(record)
            return
        p.skipped += 1
        p.bad_in_a_row += 1
        self.log.write({"event": "skipped_step", **record})
        if p.bad_in_a_row >= config.train.max_bad_steps:
            last = run_state.latest(self)
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
            self.log.close()
            raise TrainingError(
                f"stopped at step {p.step}: {p.bad_in_a_row} steps in a row had a non-finite loss or gradient "
                f"(loss {record['loss']}, grad norm {record['grad_norm']}); {where}; lower optim.lr or check the data")


def train(config: TrainConfig, stop_after: int | None = None) -> TrainResult:
    return Trainer(config).run(stop_after=stop_after)
