"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step has a token budget (`max_num_batched_tokens`). Running sequences that are decoding take one token each,
first; then sequences still in their prompt take chunks of what is left (chunked prefill: a long prompt is spread
over several steps, so it never stalls the streams already running), then waiting sequences are admitted in
arrival order while blocks, rows and budget last. When a decoding sequence needs a block and none is free, the
most recently admitted sequence is preempted: its blocks are freed (full ones stay in the prefix cache) and it goes
back to the front of the queue, to be recomputed later (vLLM's recompute preemption). Memory never runs out.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tinylm.engine.block_manager import BlockManager, NoFreeBlocks
from tinylm.engine.kv_pool import KVPool
from tinylm.engine.sequence import Sequence, Status


@dataclass
class ScheduledStep:
    decode: list[Sequence] = field(default_factory=list)  # one token each
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens in this chunk)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    def __init__(self, blocks: BlockManager, pool: KVPool, max_num_seqs: int, max_num_batched_tokens: int,
                 hybrid: bool) -> None:
        self.blocks = blocks
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.hybrid = hybrid  # DeltaNet layers need a state slot per running sequence
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted) and release everything it holds."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        budget = self.max_num_batched_tokens
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or seq.num_uncomputed != 1:
                continue
            if self._reserve_or_preempt(seq, step):
                step.decode.append(seq)
                budget -= 1
        for seq in self.running:
            if budget > 0 and seq.num_uncomputed > 1 and self._try_allocate(seq, min(seq.num_uncomputed, budget)):
                step.prefill.append((seq, min(seq.num_uncomputed, budget)))
                budget -= step.prefill[-1][1]
        while budget > 0 and self.waiting and len(self.running) < self.max_num_seqs:
            chunk = self._admit(self.waiting[0], budget)
            if not chunk:
                break
            seq = self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            step.prefill.append((seq, chunk))
            budget -= chunk
        return step

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Give a waiting sequence its prefix-cache hits, a state slot and blocks for its first chunk; 0 if not."""
        if self.hybrid:
            seq.state_slot = self.pool.take_state_slot()
            if seq.state_slot is None:
                return 0
        else:
            self.blocks.match_prefix(seq)
        chunk = min(seq.num_uncomputed, budget)
        if not self._try_allocate(seq, chunk):
            self._release(seq)
            return 0
        return chunk

    def _reserve_or_preempt(self, seq: Sequence, step: ScheduledStep) -> bool:
        """Room for one more token of `seq`, preempting the newest other sequences if needed. False: `seq` itself
        was preempted (it was the newest)."""
        while not self._try_allocate(seq, 1):
            victim = self.running[-1]
            self._preempt(victim, step)
            if victim is seq:
                return False
        return True

    def _try_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        try:
            self.blocks.allocate(seq, num_tokens)
            return True
        except NoFreeBlocks:
            return False

    def _preempt(self, seq: Sequence, step: ScheduledStep) -> None:
        self.running.remove(seq)
        if seq in step.decode:
            step.decode.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        step.preempted.append(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free_sequence(seq)
        self.pool.release_state_slot(seq.state_slot)
        seq.state_slot = None
