"""LLMEngine: requests in, tokens out, one `step()` at a time (continuous batching over a paged KV cache).

    engine = LLMEngine(model, tokenizer, eos_token_ids)
    engine.add_request("a", prompt_ids, SamplingParams(max_tokens=32))
    while engine.has_unfinished():
        for output in engine.step(): ...

Split as nano-vllm is: sequence (state of a request), block_manager (paged memory, prefix cache), scheduler (who
runs now), runner (the forward pass), sampler (pure functions) with logit_shaping (what a request's own history
does to its logits); with a draft model or prompt lookup, a decode step emits up to k + 1 tokens per sequence
(speculative.py, ngram.py). Not thread-safe: the async wrapper (tinylm/engine/async_engine.py) drives it from one
thread.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from tinylm.engine import sampler
from tinylm.engine.block_manager import BlockManager
from tinylm.engine.compile_cache import compile_by_default
from tinylm.engine.compiled import can_compile
from tinylm.engine.kv_pool import KVPool, pool_dtype
from tinylm.engine.logit_shaping import shape_logits
from tinylm.engine.lora import LoRAAdapters
from tinylm.engine.runner import ModelRunner
from tinylm.engine.scheduler import Scheduler
from tinylm.engine.sequence import Sequence, Status, StepOutput, TokenLogprob
from tinylm.engine.speculative import Speculation, make_drafter
from tinylm.engine.stop import StopChecker
from tinylm.engine.structured import GrammarCompiler, prefetch_masks
from tinylm.errors import ConfigError, ContextLengthError, TinyLMError
from tinylm.model.fuse import fuse_projections
from tinylm.model.gemv import use_gemv
from tinylm.model.invariant import invariant_supported, use_batch_invariant
from tinylm.sampling_params import SamplingParams


class QueueFullError(TinyLMError):
    """More requests are waiting than the engine was configured to queue (the server answers 429)."""


class EngineBusyError(TinyLMError):
    """The engine cannot be replaced or stepped now: it holds requests, or a server's thread steps it."""


@dataclass
class EngineConfig:
    block_size: int = 16
    kv_cache_bytes: int = 1 << 30  # memory budget for the paged K/V pool
    max_num_seqs: int = 64  # sequences in the running batch
    max_num_batched_tokens: int = 512  # tokens per step: bounds a prefill chunk's stall of running streams
    enable_prefix_caching: bool = True
    max_queue: int | None = None  # requests beyond max_num_seqs + this many in flight get QueueFullError
    # decode steps through torch.compile (compiled.py): on unless TINYLM_COMPILE=0 (compile_cache.py); eager fallback
    compile: bool = field(default_factory=compile_by_default)
    num_speculative_tokens: int = 3  # drafts per step when the engine has a draft model (engine/speculative.py)
    # Speculate only while a step's verification (k + 1 rows per sequence) has at most this many rows: a larger
    # decode batch already gets its tokens at the cost of one weight read, and its rows would leave the few-row
    # kernels (tinylm/kernels) for compute-bound products.
    speculative_max_rows: int = 16
    # "auto": K/V kept in the model's dtype; "int8": one int8 code per value and a scale per row (kv_pool.py),
    # half the memory and the bytes a decode step reads, at a small cost in accuracy (BENCHMARKS.md)
    kv_cache_dtype: str = "auto"
    # vLLM's max_model_len: the context requests may use, at most the model's max_position_embeddings (None: all)
    max_model_len: int | None = None
    # A request's tokens and logprobs the same bits whatever shares its batch, however its prompt is chunked, and
    # whether a position is decoded or scored (tinylm/model/invariant.py); off gives the library products' last
    # few percent. Falls back with one warning where the kernels cannot run (no C++ compiler, GPU, float16).
    batch_invariant: bool = True


class LLMEngine:
    def __init__(self, model, tokenizer, eos_token_ids: set[int], config: EngineConfig | None = None,
                 draft_model=None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.config = config = config or EngineConfig()
        model_config = model.config
        self.context = model_context(model_config.max_position_embeddings, config.max_model_len)
        self.vocab_size = model_config.vocab_size
        device = model.lm_head.weight.device
        dtype = pool_dtype(config.kv_cache_dtype, model.dtype)
        self.hybrid = model_config.has_linear_layers
        num_blocks = max(2, config.kv_cache_bytes // KVPool.bytes_per_block(model_config, config.block_size, dtype))
        self.pool = KVPool(model_config, num_blocks, config.block_size, config.max_num_seqs, dtype, device)
        # Prefix reuse needs the recurrent state at the prefix end, which paged K/V alone cannot give: off for hybrids
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching and not self.hybrid)
        self.scheduler = Scheduler(self.blocks, self.pool, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.hybrid)
        compile_decode, why_not = can_compile(model) if config.compile else (False, "")
        if why_not:
            warnings.warn(f"not compiling: {why_not}", RuntimeWarning, stacklevel=2)
        if compile_decode:
            fuse_projections(model)  # fewer, larger matmuls in the compiled step (inference only: see fuse.py)
        if config.batch_invariant:
            make_invariant(model)
        if compile_decode and not getattr(model, "batch_invariant", False):
            use_gemv(model)  # batch-1 products as reductions Inductor streams at memory speed (see gemv.py)
        self.loras = LoRAAdapters(model)
        self.runner = ModelRunner(model, self.pool, self.blocks, compile_decode, self.loras)
        self.drafter = None if draft_model is None else make_drafter(draft_model, model, config)
        self.speculation = None if self.drafter is None else Speculation(
            self.drafter, self.runner, self.blocks, config.num_speculative_tokens, config.speculative_max_rows)
        self.requests: dict[str, Sequence] = {}
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size, self.eos_token_ids)
        # The AsyncEngine stepping this engine from its thread while one does (async_engine.py): the engine is not
        # thread-safe, so it has one at most, and nobody else steps it meanwhile
        self.driver = None

    def warmup(self, background: bool = False) -> None:
        """Compile the decode graphs now (a no-op unless EngineConfig.compile): a server does it before it is ready.
        background: the batched graphs are built on another thread once the batch-1 ones are (compiled.py)."""
        for runner in (self.runner, self.drafter and self.drafter.runner):
            if runner and runner.compiled is not None:
                runner.compiled.warmup(background=background)

    @property
    def compiling(self) -> bool:
        """Whether a decode graph is still being built in the background (batched steps run eagerly meanwhile)."""
        runners = (self.runner, self.drafter and self.drafter.runner)
        return any(runner and runner.compiled is not None and runner.compiled.building for runner in runners)

    @property
    def capacity_tokens(self) -> int:
        return (self.blocks.num_blocks - 1) * self.blocks.block_size

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt_logprobs: int | None = None, constraint_gate: int | None = None,
                    lora_id: int = 0) -> Sequence:
        """Queue a request. Raises ValueError/ContextLengthError for bad input and QueueFullError when full.
        prompt_logprobs (the server's echo) defaults to params.prompt_logprobs (the Python API's). constraint_gate:
        a token (a reasoning model's `</think>`) before which params.structured_outputs does not apply. lora_id: a
        loaded adapter's id (load_lora), 0 for the base model."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate(prompt_token_ids, params)
        if lora_id and lora_id not in self.loras.ids.values():
            raise ValueError(f"no LoRA adapter with id {lora_id} is loaded")
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        device = self.model.lm_head.weight.device
        seq = Sequence(request_id, list(prompt_token_ids), params, StopChecker(self.tokenizer, params, stop_ids),
                       generator=sampler.make_generator(params.seed, device),
                       max_new=min(params.max_tokens, self.context - len(prompt_token_ids)),
                       prompt_logprobs=params.prompt_logprobs if prompt_logprobs is None else prompt_logprobs)
        if params.structured_outputs is not None:
            seq.constraint = self.grammars.constraint(params.structured_outputs, constraint_gate)
        seq.lora_id = lora_id
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def validate(self, ids: list[int], params: SamplingParams) -> None:
        """The checks add_request makes, callable from any thread (reads only): ValueError, ContextLengthError,
        QueueFullError."""
        self.check_input(ids, params)
        self.check_room(len(self.requests))

    def check_input(self, ids: list[int], params: SamplingParams) -> None:
        """The request's own checks (reads only): ValueError, ContextLengthError."""
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1})")
        biased = sorted(t for t in params.logit_bias or {} if t >= self.vocab_size)
        if biased:
            raise ValueError(f"logit_bias token ids {biased[:5]} are outside the vocabulary (0..{self.vocab_size - 1})")
        if params.structured_outputs is not None:
            self.grammars.compile(params.structured_outputs)  # ConstraintError (a ValueError) naming the problem
        if len(ids) >= self.context:
            raise ContextLengthError(f"the prompt has {len(ids)} tokens; the model's context is {self.context} "
                                     "tokens (at least one must be left to generate)")
        needed = min(len(ids) + params.max_tokens, self.context)
        if needed > self.capacity_tokens:
            raise ContextLengthError(f"the request needs {needed} tokens of KV cache; the cache holds "
                                     f"{self.capacity_tokens} (raise the cache memory budget)")

    def load_lora(self, name: str, path) -> int:
        """Serve the PEFT adapter at `path` as `name` (its id for add_request). The engine must be idle or driven
        by this thread: adapters change the model's layers. Compiled engines fuse the projections adapters touch."""
        if self.runner.compiled is not None:
            raise ConfigError("LoRA adapters are served by the eager engine: load it with --no-compile (compile=False)")
        return self.loras.load(name, path)

    def unload_lora(self, name: str) -> int:
        """Stop serving adapter `name` (ValueError while requests use it, or when it is not loaded)."""
        if name not in self.loras.ids:
            raise ValueError(f"no LoRA adapter named {name!r} is loaded")
        users = sum(seq.lora_id == self.loras.ids[name] for seq in self.requests.values())
        if users:
            raise ValueError(f"LoRA adapter {name!r} is in use by {users} running requests")
        return self.loras.unload(name)

    def check_room(self, in_flight: int, incoming: int = 1) -> None:
        """QueueFullError when `incoming` more requests would leave more than max_queue of them waiting for one
        of the max_num_seqs batch slots. Counting every request in flight (not the scheduler's waiting list) keeps
        the answer the same however requests and engine steps interleave."""
        limit = self.config.max_queue
        if limit is not None and in_flight + incoming > self.config.max_num_seqs + limit:
            raise QueueFullError(f"the queue is full ({self.config.max_num_seqs} requests running and {limit} "
                                 "waiting); retry later")

    def abort(self, request_id: str) -> bool:
        """Cancel a request wherever it is (queued, in prefill, decoding) and free its memory at once."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, "abort"
        if self.drafter is not None:
            self.drafter.release(request_id)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def step(self) -> list[StepOutput]:
        """Run one scheduled batch; return the new token (or prompt logprobs) of every request that produced one."""
        step = self.scheduler.schedule()
        outputs: list[StepOutput] = []
        if step.decode:
            outputs += self._decode(step.decode)
        for group in self._prefill_groups(step.prefill):
            outputs += self._run_prefill(group)
        return outputs

    def _decode(self, seqs: list[Sequence]) -> list[StepOutput]:
        """One new token per sequence, or up to k + 1 for those that speculate (engine/speculative.py)."""
        plain, verified = self.speculation.split(seqs) if self.speculation else (seqs, [])
        outputs = []
        if plain:
            masks = prefetch_masks([seq.constraint for seq in plain], self.vocab_size)  # while the model runs
            logits = self.runner.forward([(seq, 1) for seq in plain])
            outputs += self._after_forward(plain, [1] * len(plain), logits, masks)
        return outputs + (self.speculation.step(verified, self._append) if verified else [])

    def _prefill_groups(self, prefill: list[tuple[Sequence, int]]) -> list[list[tuple[Sequence, int]]]:
        """Chunks that can share one padded forward; prompt logprobs need every position: those run alone. (DeltaNet
        layers move a row's padding after its real tokens, so padding neither decays nor writes their states.)"""
        alone = [[item] for item in prefill if item[0].wants_prompt_logprobs]
        together = [item for item in prefill if not item[0].wants_prompt_logprobs]
        return alone + ([together] if together else [])

    def _run_prefill(self, group: list[tuple[Sequence, int]]) -> list[StepOutput]:
        seqs = [seq for seq, _ in group]
        if seqs[0].wants_prompt_logprobs:
            seq, n = group[0]
            logits = self.runner.forward(group, all_logits=True)[0]  # (n, V)
            _record_prompt_logprobs(seq, logits, n)
            return self._after_forward(seqs, [n], logits[-1:])
        return self._after_forward(seqs, [n for _, n in group], self.runner.forward(group))

    def _after_forward(self, seqs: list[Sequence], counts: list[int], logits: torch.Tensor,
                       masks=None) -> list[StepOutput]:
        """Advance each sequence's computed tokens; sample for those whose every token is now computed. masks: a
        decode step's structured-output masks, computed during its forward (every row is then ready)."""
        ready = []
        for row, (seq, n) in enumerate(zip(seqs, counts)):
            self.blocks.mark_computed(seq, n)
            if seq.num_uncomputed == 0:
                ready.append(row)
        if not ready:
            return []
        if len(ready) < len(seqs):  # rows still in prefill produced no token yet
            logits = logits.index_select(0, torch.tensor(ready, device=logits.device))
        masks = masks.result() if masks is not None else None
        return self._sample([seqs[r] for r in ready], logits, masks if len(ready) == len(seqs) else None)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, masks=None) -> list[StepOutput]:
        """logits (B, V) float32 at each sequence's last token -> one new token per sequence."""
        params = [seq.params for seq in seqs]
        # logit_bias, the min_tokens ban and penalties (logit_shaping.py), then temperature and the filters;
        # logprobs are those of the model's own distribution, before any of them
        shaped = shape_logits(logits, seqs, self.vocab_size, masks)
        tokens = sampler.sample(shaped, params, [seq.generator for seq in seqs])
        entries = sampler.logprob_entries(logits, tokens, [p.logprobs for p in params])
        return [self._append(seq, token, entry) for seq, token, entry in zip(seqs, tokens.tolist(), entries)]

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> StepOutput:
        seq.output_token_ids.append(token)
        if seq.constraint is not None:
            seq.constraint.accept(token)
        text, reason = seq.stop.push(token)
        if reason is None and seq.constraint is not None and seq.constraint.done:  # the grammar allows no more
            text, reason = text + seq.stop.finish(), "stop"
        if reason is None and len(seq.output_token_ids) >= seq.max_new:
            text, reason = text + seq.stop.finish(), "length"
        first = len(seq.output_token_ids) == 1 and seq.prompt_logprobs is not None
        prompt_logprobs = seq.prompt_logprob_values if first else None
        if reason is not None:
            self._finish(seq, reason)
        return StepOutput(seq.request_id, token, text, logprob, reason, len(seq.prompt_token_ids),
                          len(seq.output_token_ids), prompt_logprobs, seq.stop.stop_reason if reason else None)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.scheduler.remove(seq)
        self.requests.pop(seq.request_id, None)
        if self.drafter is not None:
            self.drafter.release(seq.request_id)


def make_invariant(model) -> None:
    """use_batch_invariant where this model can run it, else one warning (the engine runs, not invariant). Again
    after fuse_projections: the fused layers are new nn.Linear."""
    supported, why_not = invariant_supported(model)
    if supported:
        use_batch_invariant(model)
    else:
        warnings.warn(f"batch-invariant inference is off: {why_not}", RuntimeWarning, stacklevel=3)


def model_context(positions: int, max_model_len: int | None) -> int:
    """The context requests may use: the model's positions, or vLLM's max_model_len when it is set (not more)."""
    if max_model_len is None:
        return positions
    if not isinstance(max_model_len, int) or not 1 < max_model_len <= positions:
        raise ValueError(f"max_model_len must be an integer in [2, {positions}] (the model's context), got "
                         f"{max_model_len!r}")
    return max_model_len


def _record_prompt_logprobs(seq: Sequence, logits: torch.Tensor, n: int) -> None:
    """logits (n, V) of the chunk ending at seq.num_computed + n: they score prompt tokens start+1 .. start+n."""
    start = seq.num_computed
    if start == 0:
        seq.prompt_logprob_values = [None]  # the first token has no context to be scored from
    targets = seq.prompt_token_ids[start + 1:start + n + 1]
    if targets:
        chosen = torch.tensor(targets, device=logits.device)
        seq.prompt_logprob_values += sampler.logprob_entries(logits[:len(targets)], chosen,
                                                             [seq.prompt_logprobs] * len(targets))
    seq.prompt_logprobs_done = start + n >= len(seq.prompt_token_ids)
