"""Fixed-size KV blocks under a memory budget, with prefix caching (vLLM's design, simplified).

The KV pool holds `num_blocks` blocks of `block_size` token slots. A sequence owns a list of blocks (its block
table); token t of the sequence lives in slot `block_ids[t // block_size] * block_size + t % block_size`.

Prefix caching: a block whose slots are all filled by prompt or output tokens gets a hash of (parent block's
hash, its token ids), so equal hashes mean equal token prefixes and therefore equal K/V. When a sequence frees its
blocks, hashed blocks stay in the cache (reference count 0) until their memory is needed; a new sequence whose
prompt starts with the same tokens takes them instead of recomputing them. Block 0 is reserved: padding in a
gathered batch points at it.
"""

from __future__ import annotations

from collections import OrderedDict

from tinylm.engine.sequence import Sequence


class NoFreeBlocks(Exception):
    """Raised inside the scheduler when the pool is exhausted; it answers by preempting or waiting."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks; raise the cache memory budget")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block id, for every hashed block (in use or evictable)
        self.free: list[int] = list(range(num_blocks - 1, 0, -1))  # never-hashed free blocks; block 0 reserved
        self.evictable: OrderedDict[int, None] = OrderedDict()  # hashed blocks with no user, least recent first
        self.hits = 0  # prompt tokens served from the prefix cache (for /metrics)

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / (self.num_blocks - 1)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks `seq` must add to hold its first num_computed + num_new_tokens tokens."""
        total = seq.num_computed + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_ids))

    def match_prefix(self, seq: Sequence) -> None:
        """Take the cached blocks that hold the start of a new sequence's prompt; mark those tokens computed.

        The last prompt token is always recomputed (its logits start generation), so a prompt that is cached in
        full reuses all blocks but its last one.
        """
        if not self.enable_prefix_caching or seq.block_ids or seq.wants_prompt_logprobs:
            return
        tokens = seq.all_token_ids
        usable = (len(tokens) - 1) // self.block_size
        parent = _root(seq)
        for index in range(usable):
            parent = _hash(parent, tokens[index * self.block_size:(index + 1) * self.block_size])
            block = self.cached.get(parent)
            if block is None:
                break
            self._take(block)
            seq.block_ids.append(block)
        seq.num_computed = len(seq.block_ids) * self.block_size
        self.hits += seq.num_computed

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give `seq` the blocks for its next `num_new_tokens` tokens, or raise NoFreeBlocks (nothing changed)."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > self.num_free:
            raise NoFreeBlocks
        for _ in range(needed):
            seq.block_ids.append(self._pop_free())

    def mark_computed(self, seq: Sequence, num_new_tokens: int) -> None:
        """After a forward pass: advance num_computed and hash the blocks that became full."""
        first_full = seq.num_computed // self.block_size
        seq.num_computed += num_new_tokens
        if not self.enable_prefix_caching:
            return
        tokens = seq.all_token_ids
        for index in range(first_full, seq.num_computed // self.block_size):
            parent = self.block_hash[seq.block_ids[index - 1]] if index else _root(seq)
            block = seq.block_ids[index]
            digest = _hash(parent, tokens[index * self.block_size:(index + 1) * self.block_size])
            if self.block_hash[block] is None and digest not in self.cached:
                self.block_hash[block] = digest
                self.cached[digest] = block

    def free_sequence(self, seq: Sequence) -> None:
        """Release every block of `seq`: hashed ones stay cached (newest last in the eviction order)."""
        for block in reversed(seq.block_ids):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self.block_hash[block] is not None:
                    self.evictable[block] = None
                else:
                    self.free.append(block)
        seq.block_ids = []
        seq.num_computed = 0

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def reset_prefix_cache(self) -> None:
        for block in list(self.evictable):
            self._forget(block)
            self.free.append(block)
        self.evictable.clear()

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            self.evictable.pop(block, None)
        self.ref_counts[block] += 1

    def _pop_free(self) -> int:
        if self.free:
            block = self.free.pop()
        else:  # evict the least recently freed cached block
            block, _ = self.evictable.popitem(last=False)
            self._forget(block)
        self.ref_counts[block] = 1
        return block

    def _forget(self, block: int) -> None:
        digest = self.block_hash[block]
        if digest is not None and self.cached.get(digest) == block:
            del self.cached[digest]
        self.block_hash[block] = None


def _root(seq: Sequence):
    """The parent of a sequence's first block: the same tokens under another LoRA adapter have other K/V."""
    return ("lora", seq.lora_id) if seq.lora_id else None


def _hash(parent, tokens: list[int]) -> int:
    return hash((parent, tuple(tokens)))
