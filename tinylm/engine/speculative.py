"""Speculative decoding: a small draft model proposes k tokens, the target checks all of them in one forward pass.

The rule is Leviathan et al. 2023 (https://arxiv.org/abs/2211.17192), as vLLM's draft-model proposer applies it:
the target scores the row's last token and its k drafts together (k + 1 positions); draft j is kept with
probability min(1, p_j(d_j) / q_j(d_j)) (p: the target's distribution after temperature / top-k / top-p / min-p,
q: the draft's under the same settings); the first rejected one is replaced by a draw from max(0, p_j - q_j)
renormalized, and when all k are kept a bonus token is drawn from p_(k+1). The tokens are distributed exactly as
the target's own samples; greedy rows get exactly the target's argmax tokens. One step emits 1 to k+1 tokens.

Verifying is a decode batch. Row b with its last token at position n - 1 and drafts d_1..d_k becomes k + 1
one-token rows: row j writes the K/V of position n - 1 + j and attends to positions 0 .. n - 1 + j. Every layer
stores all rows' K/V before it attends (tinylm/engine/kv_pool.py), so row j sees the drafts before it, and the
verification runs through the same (compiled) decode graph as ordinary steps, with B * (k + 1) rows.

The draft has its own paged K/V pool and one shadow per sequence: the tokens in the draft's cache. After a
verification the shadow keeps the positions whose tokens were accepted; the next round feeds it the rest (the
corrected or bonus token, and the last draft when all were kept), the whole prompt the first time.

In the engine's decode step, `Speculation` picks the rows that draft (and how many tokens), runs the round
(propose -> verify -> emit) and leaves the rest to the plain decode path; `make_drafter` builds the proposer:
a DraftProposer here, or prompt lookup (tinylm/engine/ngram.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from tinylm.engine import sampler
from tinylm.engine.block_manager import BlockManager, NoFreeBlocks
from tinylm.engine.compiled import can_compile
from tinylm.engine.kv_pool import KVPool, pool_dtype
from tinylm.engine.logit_shaping import shapes_logits
from tinylm.engine.ngram import NGRAM, NgramProposer
from tinylm.engine.runner import ModelRunner
from tinylm.engine.sequence import Sequence, StepOutput, TokenLogprob
from tinylm.engine.structured import apply_masks, constraint_masks
from tinylm.errors import ConfigError
from tinylm.model.fuse import fuse_projections
from tinylm.model.gemv import use_gemv
from tinylm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tinylm.engine.engine import EngineConfig  # the engine imports this module: only for annotations


class View:
    """A sequence as the model runner and block manager see it: token ids, how many lead the cache, its blocks."""

    def __init__(self, tokens: list[int], num_computed: int, block_ids: list[int], lora_id: int = 0) -> None:
        self.all_token_ids = tokens
        self.num_computed = num_computed
        self.block_ids = block_ids
        self.state_slot = None  # drafts and targets of speculative decoding have no DeltaNet state
        self.lora_id = lora_id  # the target's rows run with the sequence's adapter (engine/lora.py)

    @property
    def num_uncomputed(self) -> int:
        return len(self.all_token_ids) - self.num_computed


def one_token_rows(view: View, count: int) -> list[tuple[View, int]]:
    """The next `count` uncomputed tokens of `view` as `count` rows of one token each (a decode batch)."""
    return [(View(view.all_token_ids, view.num_computed + j, view.block_ids, view.lora_id), 1) for j in range(count)]


def check_num_tokens(count: int) -> None:
    if count < 1:
        raise ValueError(f"num_speculative_tokens must be at least 1, got {count}")


def check_draft(target_config, draft_config) -> None:
    """ConfigError unless the draft can propose tokens for this target."""
    if draft_config.vocab_size != target_config.vocab_size:
        raise ConfigError(f"the draft model's vocabulary ({draft_config.vocab_size} tokens) differs from the "
                          f"target's ({target_config.vocab_size}); speculative decoding needs one tokenizer")
    for name, config in (("target", target_config), ("draft", draft_config)):
        if config.has_linear_layers:
            raise ConfigError(f"the {name} model has Gated DeltaNet layers, whose state cannot be rolled back "
                              "past rejected drafts: speculative decoding needs softmax-attention models")


def make_drafter(draft_model, target_model, config: EngineConfig) -> DraftProposer | NgramProposer:
    """LLMEngine's drafter for its draft_model: prompt lookup for "[ngram]", else a DraftProposer over the draft
    model, compiled (fused, batch-1 products as reductions) where the target is and the draft can be."""
    check_num_tokens(config.num_speculative_tokens)
    if isinstance(draft_model, str) and draft_model == NGRAM:
        return NgramProposer()
    check_draft(target_model.config, draft_model.config)
    compile_draft = config.compile and can_compile(draft_model)[0]
    if compile_draft:
        fuse_projections(draft_model)
        use_gemv(draft_model)
    return DraftProposer(draft_model, config.num_speculative_tokens, config.block_size, config.kv_cache_bytes,
                         config.max_num_seqs, compile_draft, config.kv_cache_dtype)


# The engine's append: records one token of a sequence (stop checks, finishing it) and returns its StepOutput
Append = Callable[[Sequence, int, TokenLogprob | None], StepOutput]


class Speculation:
    """Speculative decoding inside the engine's decode step: which rows draft how many tokens, then one round of
    propose (the drafter) -> verify (one decode batch of the target, `runner`) -> emit, for every such row."""

    def __init__(self, drafter: DraftProposer | NgramProposer, runner: ModelRunner, blocks: BlockManager,
                 num_tokens: int, max_rows: int) -> None:
        self.drafter = drafter
        self.runner = runner  # the target's
        self.blocks = blocks  # the target's
        self.num_tokens = num_tokens  # EngineConfig.num_speculative_tokens
        self.max_rows = max_rows  # EngineConfig.speculative_max_rows

    def split(self, seqs: list[Sequence]) -> tuple[list[Sequence], list[tuple[Sequence, int]]]:
        """(rows to decode plainly, (row, its draft count) to verify). While anyone speculates, rows without drafts
        join its verification (0 drafts: their own next token), so the weights are read once per step; rows whose
        logits the sampler shapes need the sampler, so they decode plainly."""
        fits = len(seqs) * (self.num_tokens + 1) <= self.max_rows
        counts = [self._draft_count(seq) for seq in seqs] if fits else [0] * len(seqs)
        together = any(counts)
        verified = [k > 0 or (together and not shapes_logits(seq)) for seq, k in zip(seqs, counts)]
        plain = [seq for seq, v in zip(seqs, verified) if not v]
        return plain, [(seq, k) for seq, k, v in zip(seqs, counts, verified) if v]

    def _draft_count(self, seq: Sequence) -> int:
        """Drafts worth proposing for `seq` (0: decode it plainly), with the target's blocks for them reserved.
        Verification samples from the model's own distribution: requests whose logits the sampler shapes
        (penalties, logit_bias, min_tokens not yet reached) decode plainly."""
        if shapes_logits(seq) or (seq.constraint is not None and not seq.constraint.verifies_drafts):
            return 0
        count = min(self.num_tokens, seq.max_new - len(seq.output_token_ids) - 1)
        if count <= 0:
            return 0
        try:
            self.blocks.allocate(seq, count + 1)
        except NoFreeBlocks:
            return 0
        return count

    def step(self, rows: list[tuple[Sequence, int]], append: Append) -> list[StepOutput]:
        """Draft, verify every draft of every row in one decode batch, emit what each row keeps."""
        seqs = [seq for seq, _ in rows]
        drafts, probs = self.drafter.propose(seqs, [k for _, k in rows])
        batch = []
        for seq, tokens in zip(seqs, drafts):
            view = View(seq.all_token_ids + tokens, seq.num_computed, seq.block_ids, seq.lora_id)
            batch += one_token_rows(view, len(tokens) + 1)
        logits = self.runner.forward(batch)  # (sum of k_i + 1, V)
        # structured outputs: each position is verified under its grammar's mask (after the drafts before it)
        allowed = apply_masks(logits, constraint_masks([seq.constraint for seq in seqs], logits.shape[-1], drafts))
        outputs, start = [], 0
        for seq, tokens, q in zip(seqs, drafts, probs):
            scores = logits[start:start + len(tokens) + 1]
            emitted = verify(allowed[start:start + len(tokens) + 1], tokens, q, seq.params, seq.generator)
            start += len(tokens) + 1
            self.drafter.num_proposed += len(tokens)
            self.drafter.num_accepted += len(emitted) - 1
            outputs += self._emit(seq, emitted, scores, append)
        return outputs

    def _emit(self, seq: Sequence, tokens: list[int], logits: torch.Tensor, append: Append) -> list[StepOutput]:
        """Append the verified tokens (logits (len(tokens), V): the target's raw scores for each) until the
        sequence finishes; then the cache holds the last token and the accepted drafts."""
        chosen = torch.tensor(tokens, device=logits.device)
        entries = sampler.logprob_entries(logits[:len(tokens)], chosen, [seq.params.logprobs] * len(tokens))
        outputs = []
        for token, entry in zip(tokens, entries):
            outputs.append(append(seq, token, entry))
            if seq.is_finished:
                return outputs
        self.blocks.mark_computed(seq, len(tokens))
        self.drafter.settle(seq, seq.num_computed)
        return outputs


class DraftProposer:
    """The draft model, its K/V pool and each sequence's shadow; proposes drafts and forgets rejected ones."""

    def __init__(self, model, num_tokens: int, block_size: int, cache_bytes: int, max_num_seqs: int,
                 compile_decode: bool, kv_cache_dtype: str = "auto") -> None:
        self.num_tokens = num_tokens
        self.context = model.config.max_position_embeddings  # drafts past it are not proposed
        dtype = pool_dtype(kv_cache_dtype, model.dtype)  # the target's choice, as in vLLM
        num_blocks = max(2, cache_bytes // KVPool.bytes_per_block(model.config, block_size, dtype))
        self.pool = KVPool(model.config, num_blocks, block_size, max_num_seqs, dtype, model.lm_head.weight.device)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(model, self.pool, self.blocks, compile_decode)
        self.shadows: dict[str, View] = {}
        self.num_proposed = 0  # drafts checked by the target so far
        self.num_accepted = 0  # of which kept

    def propose(self, seqs, counts: list[int]) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """Up to counts[i] draft tokens for seqs[i] (fewer when the draft's cache is full) and, for sampled rows,
        the draft's distributions q (k_i, V) they were drawn from (None for greedy rows)."""
        views = [self._shadow(seq) for seq in seqs]
        counts = [k if k and len(view.all_token_ids) + k <= self.context and self._reserve(view, k, views) else 0
                  for view, k in zip(views, counts)]
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        for step in range(max(counts, default=0)):
            active = [i for i, k in enumerate(counts) if k > step]
            logits = self._last_logits([views[i] for i in active])  # (len(active), V)
            params = [seqs[i].params for i in active]
            tokens, q = self._draw(logits, params, [seqs[i].generator for i in active])
            for row, i in enumerate(active):
                drafts[i].append(tokens[row])
                views[i].all_token_ids.append(tokens[row])
                if q is not None and not params[row].greedy:
                    probs[i].append(q[row])
        return drafts, [torch.stack(p) if p else None for p in probs]

    def settle(self, seq, num_valid: int) -> None:
        """After verification: the target's tokens up to `num_valid` are final; later draft positions are stale."""
        view = self.shadows.get(seq.request_id)
        if view is not None:
            view.num_computed = min(view.num_computed, num_valid)
            view.all_token_ids = seq.all_token_ids

    def release(self, request_id: str) -> None:
        view = self.shadows.pop(request_id, None)
        if view is not None:
            self.blocks.free_sequence(view)

    def _shadow(self, seq) -> View:
        view = self.shadows.get(seq.request_id)
        if view is None:
            view = self.shadows[seq.request_id] = View(seq.all_token_ids, 0, [])
        view.all_token_ids = seq.all_token_ids  # a fresh list: drafts are appended to it, not to the sequence
        return view

    def _reserve(self, view: View, count: int, keep: list[View]) -> bool:
        """Blocks for the view's uncomputed tokens and count - 1 drafts (the last draft is never fed to the draft
        model). When the pool is full, shadows of sequences outside this step are dropped first."""
        for _ in range(2):
            try:
                self.blocks.allocate(view, view.num_uncomputed + count - 1)
                return True
            except NoFreeBlocks:
                for request_id, other in list(self.shadows.items()):
                    if all(other is not v for v in keep):
                        self.release(request_id)
        return False

    def _last_logits(self, views: list[View]) -> torch.Tensor:
        """Feed each view its uncomputed tokens; (B, V) float32 logits at each one's last token. Up to k + 1
        tokens run as one-token rows of a decode batch (compiled where decode is); longer ones (the prompt, the
        first time) as one prefill forward."""
        short = [i for i, v in enumerate(views) if v.num_uncomputed <= self.num_tokens + 1]
        long = [i for i, v in enumerate(views) if v.num_uncomputed > self.num_tokens + 1]
        out: list[torch.Tensor | None] = [None] * len(views)
        if long:
            logits = self.runner.forward([(views[i], views[i].num_uncomputed) for i in long])
            for row, i in enumerate(long):
                out[i] = logits[row]
        if short:
            rows = [one_token_rows(views[i], views[i].num_uncomputed) for i in short]
            logits = self.runner.forward([row for group in rows for row in group])
            ends = torch.tensor([len(group) for group in rows]).cumsum(0) - 1
            for row, i in enumerate(short):
                out[i] = logits[ends[row]]
        for view in views:
            view.num_computed = len(view.all_token_ids)
        return torch.stack(out)

    @staticmethod
    def _draw(logits: torch.Tensor, params: list[SamplingParams], generators) -> tuple[list[int], torch.Tensor | None]:
        """Draft tokens (argmax for greedy rows, a draw from q otherwise) and q (B, V), None if all are greedy."""
        if all(p.greedy for p in params):
            return sampler.argmax(logits).tolist(), None
        q = sampler.probabilities(logits, params)
        drawn = sampler.draw(q, generators)
        greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        return torch.where(greedy, sampler.argmax(logits), drawn).tolist(), q


def verify(logits: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None, params: SamplingParams,
           generator: torch.Generator | None) -> list[int]:
    """The tokens one row emits: the accepted drafts, then a corrected or bonus token.

    logits (k + 1, V) float32: the target's at the row's last token and at each draft; drafts (k,);
    draft_probs (k, V): q, for sampled rows (None: drafts that were not sampled, as prompt lookup's)."""
    if params.greedy:
        best = sampler.argmax(logits).tolist()
        kept = 0
        while kept < len(drafts) and drafts[kept] == best[kept]:
            kept += 1
        return drafts[:kept] + [best[kept]]
    p = sampler.probabilities(logits, [params] * logits.shape[0])  # (k + 1, V)
    if draft_probs is None:  # drafts without a distribution (prompt lookup): q is one-hot at each draft
        draft_probs = torch.zeros(len(drafts), p.shape[-1], device=p.device)
        draft_probs[torch.arange(len(drafts)), torch.tensor(drafts, dtype=torch.long)] = 1.0
    uniform = torch.rand(len(drafts), generator=generator, device=logits.device)
    for j, token in enumerate(drafts):
        if uniform[j] * draft_probs[j, token] > p[j, token]:  # rejected: keep with probability min(1, p / q)
            residual = (p[j] - draft_probs[j]).clamp_min(0)
            residual = residual if float(residual.sum()) > 0 else p[j]
            return drafts[:j] + [int(sampler.draw((residual / residual.sum())[None], [generator]))]
    return drafts + [int(sampler.draw(p[-1:], [generator]))]
