"""Decode steps through torch.compile: one graph for every batch size and context length.

A decode step (one new token per row) is where eager PyTorch loses most: about 20 small ops per layer (norms,
rotary, casts, residual adds, the SwiGLU product) each pay dispatcher and allocation costs that dwarf their work at
batch 1. Inductor fuses them into a few C++ loops; the matmuls run as extern calls, the new K/V rows are written
into the pool in place (index_copy_, reinplaced by Inductor, so the pool is never copied), and attention reads the
pool through tinylm's C++ kernel (tinylm/kernels; Inductor's own loops where it cannot be built). Gated DeltaNet
layers read and write their states in the pool's state rows (index_copy_ too; the rows are allocated before the
first trace), and mixture-of-experts blocks pick their experts' rows from stacked weights (tinylm/model/moe.py):
the TinyStories Qwen3-Gated-MoE hybrid's shape decodes 466 -> 2682 tok/s in float32
(`tinylm bench --shape qwen3-next --compile`).

The traced function takes only tensors; the paged view is built inside the graph, so the context length S and
the batch size B are symbolic (marked dynamic): no recompilation as sequences grow or join. Batch 1 gets its own
graph (PyTorch specializes sizes 0 and 1) and larger batches another, which always carries the key mask.
Prefill stays eager: it is matmul-bound, where compiling buys little and costs a graph per prompt shape.

If compiling fails (no C++ compiler, an op Inductor cannot lower), the engine warns once and decodes eagerly.
Each compiled step is saved whole and loaded by the next process in about a second, without tracing the model again
(tinylm/engine/saved_steps.py; compile_cache.py: where, and how a corrupt entry is rebuilt); a graph is compiled
when first needed (batch 1 by the first decode step, the batched one by the first step of two rows), or by warmup().
A server answers once the batch-1 graph is ready: warmup(background=True) builds the batched one on a passing thread
while batched steps decode eagerly. A one-token context (a one-token prompt's prefill step) decodes eagerly: PyTorch
specializes size 1, so it would need a third graph.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import types
import warnings
from collections.abc import Callable

import torch
import torch._inductor.inductor_prims  # noqa: F401 - registers prims.inductor_force_stride_order (attention.py)
from torch._inductor.custom_graph_pass import CustomGraphPass

from tinylm import kernels
from tinylm.engine import compile_cache, saved_steps
from tinylm.engine.kv_pool import KVPool, PagedBatch
from tinylm.model.deltanet import GatedDeltaNet
from tinylm.model.moe import SparseMoE, plain_linear

log = logging.getLogger(__name__)


def _marked(inputs: tuple, batched: bool) -> tuple:
    """The step's inputs with their batch and context sizes marked dynamic for a trace (one graph for all sizes)."""
    ids, positions, valid, write_slots, gather_slots, state_rows = inputs
    torch._dynamo.mark_dynamic(gather_slots, 1)
    if batched:  # size 1 is always its own graph
        for tensor in (ids, positions, write_slots, gather_slots, valid, state_rows):
            if tensor is not None:
                torch._dynamo.mark_dynamic(tensor, 0)
        torch._dynamo.mark_dynamic(valid, 1)
    return inputs


def can_compile(model) -> tuple[bool, str]:
    """Whether this model's decode step is compiled; the reason when it is not."""
    missing = compile_cache.missing_compiler()
    if missing:
        return False, missing
    for module in model.modules():
        if isinstance(module, SparseMoE) and not all(
                plain_linear(layer) for expert in module.experts for layer in expert.children()):
            return False, "quantized mixture-of-experts layers decode eagerly (only float experts are stacked)"
    return True, ""


class CompiledDecode:
    """Callable like `model(...)` for decode steps: (ids (B, 1), positions (B, 1), key mask (B, S) or None,
    write slots (B,), gather slots (B, S)) -> float32 logits (B, V) at the new token."""

    def __init__(self, model, pool: KVPool) -> None:
        self.model = model
        self.pool = pool
        self.failed = False
        self._context = StepContext(model, pool, attention_kernel=kernels.available(),
                                    batch_invariant=getattr(model, "batch_invariant", False))
        # Only the batch and context sizes are marked dynamic (_marked): dynamic=True would also make every
        # weight and pool dimension symbolic, and equal sizes would be unified with them (duck sizing).
        # No guards on the model's modules and parameters: checking them cost ~1 ms per step (a quantized model
        # has more attributes), and this engine's model is never changed once it decodes. Inputs, sizes and the
        # cache pool stay guarded. Nor does the compiled code re-check every weight's size and alignment at each
        # call (Inductor's debug asserts: ~250 checks, 0.25 ms per batch-1 step).
        # The compiled step's wrapper is C++ (cpp_wrapper), not Python: a decode step makes ~300 calls (Inductor's
        # fused loops and tinylm's kernels) and ~450 tensor views, ~0.7 ms of Python per step by cProfile (the w8a8
        # batch-16 step is ~8 ms). Measured gain is smaller (`tinylm bench --variant`, 2-core EPYC): batch 16 w8a8
        # +0.5-3% (two A/Bs, 13 of 14 pairs), batch 1 bf16 within the VM's noise.
        # The wrapper (~5,000 lines of C++ for a 30-layer model: one call per op) is built apart from the fused
        # loops and at -O2: in one file at -O3, g++ took 50 s of the built-in model's 100 s first compile on an AVX2
        # EPYC (int4: 125 s -> 51 s of warm-up); the loops, where the time is spent, stay at -O3.
        options = {**_inductor_options(model), "guard_filter_fn": _keep_guard,
                   "size_asserts": False, "alignment_asserts": False, "cpp_wrapper": True,
                   "cpp_wrapper_build_separate": True, "aot_inductor.compile_wrapper_opt_level": "O2",
                   "post_grad_custom_post_pass": _KernelSources()}
        # Each graph is compiled ahead of time and saved whole (tinylm/engine/saved_steps.py): a later process loads
        # it without tracing the model again. Where a step cannot be saved, it is traced in every process instead.
        saveable = {**options, "guard_filter_fn": saved_steps.serializable_guards(_keep_guard)}
        self._fullgraph = torch.compile(_own_code(decode_step), fullgraph=True, options=saveable)
        self._compiled = torch.compile(_own_code(decode_step), options=options)
        # Freezing must also be on while dynamo traces (it decides then whether weights become graph attributes);
        # the options above reach only Inductor. Set around the calls that trace: the first of each graph.
        self._freeze = options.get("freezing", False)
        self._options = options
        self._steps: dict[bool, Callable] = {}  # batched? -> its compiled step (saved or traced), once built
        self._building: threading.Thread | None = None  # builds the batched graph while batched steps run eagerly
        self.rebuilt = 0  # compiles retried from an emptied cache (an entry there no longer loaded)
        self.loaded = 0  # steps loaded from disk whole (no trace, no compile)
        compile_cache.use_cache_dir()
        self.hybrid = _reserve_states(model, pool)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None,
                 write_slots: torch.Tensor, gather_slots: torch.Tensor,
                 state_rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits, or None for an eager step: compiling failed (the caller runs the eager path, now and from then on),
        the context is one token, or the batched graph is still being built. state_rows (B,): each row's DeltaNet state
        slot, for hybrid models (None otherwise)."""
        if self.failed or gather_slots.shape[1] < 2 or (ids.shape[0] > 1 and self._building_batched()):
            return None  # a one-token context (a one-token prompt's prefill) would need a graph of its own: eager
        inputs = (ids, positions, valid, write_slots, gather_slots, state_rows)
        batched = ids.shape[0] > 1
        try:
            step = self._steps.get(batched)
            if step is not None:
                return step(*inputs)
            return self._first_call(batched, inputs)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
            self.failed = True
            warnings.warn(f"torch.compile failed ({_root_cause(exc)}); decoding eagerly", RuntimeWarning, stacklevel=2)
            return None

    @property
    def attention_kernel(self) -> bool:
        """Whether the step reads the pool through tinylm's C++ attention kernel (else Inductor's loops)."""
        return self._context.attention_kernel

    @attention_kernel.setter
    def attention_kernel(self, value: bool) -> None:  # before the first step only: a built step keeps its choice
        self._context.attention_kernel = value

    def _flags(self) -> dict:
        """What a saved step's file name hashes besides the model and the pool (saved_steps.fingerprint)."""
        return {"options": self._options, "kernel_sources": _KernelSources().uuid(),
                "attention_kernel": self._context.attention_kernel, "batch_invariant": self._context.batch_invariant}

    @property
    def _traced(self) -> set[bool]:
        """batched? for each graph built so far."""
        return set(self._steps)

    def _first_call(self, batched: bool, inputs: tuple) -> torch.Tensor:
        """Load a graph saved by an earlier process, or compile it (from Inductor's on-disk cache where it can), and
        run it. When a graph that compiled here before (same torch, CPU and kernels: the cache folder's key) fails,
        its cache entry is damaged (a truncated .so or saved step, a corrupt pickle or header: the failure shows as
        a load error or as a C++ compile error): the cache is emptied and the graph built once more. A graph that
        never compiled here fails once, without a retry."""
        graph = self._graph_name(batched)
        with compile_cache.progress(graph, f"tinylm: compiling the {'batched' if batched else 'batch-1'} "
                                           "decode step (cached on disk for the next start)"):
            try:
                step, logits = self._build(graph, batched, inputs)
            except Exception as exc:  # noqa: BLE001 - retried once from an empty cache, then run eagerly
                if not compile_cache.compiled_before(graph) or not compile_cache.discard_cache():
                    raise
                log.warning("compiled decode failed to load from the cache (%s); rebuilding it", exc)
                self.rebuilt += 1
                step, logits = self._build(graph, batched, inputs)
        self._steps[batched] = step
        return logits

    def _build(self, graph: str, batched: bool, inputs: tuple) -> tuple[Callable, torch.Tensor]:
        """The graph's step, loaded from disk or compiled (saved for the next process where it can be), and its
        logits for `inputs`."""
        if not self._freeze:  # frozen weights would be saved in the step: never reused across checkpoints
            try:
                step = functools.partial(self._saved_step(graph, batched, inputs), self._context)
                return step, step(*inputs)
            except saved_steps.NotSaveable as exc:
                log.info("the %s decode step is traced in every process (%s)", graph, exc)
        step = functools.partial(self._traced_step, batched)
        with torch._inductor.config.patch(freezing=self._freeze):
            return step, step(*inputs)

    def _saved_step(self, graph: str, batched: bool, inputs: tuple):
        """The step an earlier process saved for this model's structure, else compiled now and saved. A saved file
        that does not load (written by a crashed process, or by another tinylm) is compiled and written again."""
        file = saved_steps.path(graph, saved_steps.fingerprint(self.model, self.pool, self._flags()))
        if file.exists():
            try:
                saved = saved_steps.load(file, decode_step.__globals__, self._options)
                if saved.guard_check(self._context, *inputs):
                    self.loaded += 1
                    return saved
                log.warning("the saved %s decode step does not take these inputs; compiling it again", graph)
            except Exception as exc:  # noqa: BLE001 - any unreadable file is replaced
                log.warning("the saved %s decode step did not load (%s); compiling it again", graph, exc)
        return saved_steps.compile(self._fullgraph, file, (self._context, *_marked(inputs, batched)))

    def _traced_step(self, batched: bool, *inputs) -> torch.Tensor:
        """The step through torch.compile (Dynamo's guards, Inductor's caches): for graphs that cannot be saved."""
        return self._compiled(self._context, *_marked(inputs, batched))

    def _graph_name(self, batched: bool) -> str:
        """What the compile-time estimate is kept under: the graph's architecture, dtype and batch kind."""
        config = self.model.config
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
        return (f"{config.model_type}-{config.hidden_size}x{config.num_hidden_layers}-"
                f"{str(dtype).removeprefix('torch.')}-{'batched' if batched else 'batch1'}")

    def warmup(self, batches: tuple[int, ...] = (1, 2), background: bool = False) -> None:
        """Compile the batch-1 graph and the batched one now (or those of `batches`), so no request waits for the
        compiler. background: return once batch 1 is ready and build the batched graph on a passing thread (a server
        answers sooner; its batched steps decode eagerly until the graph is there)."""
        later = tuple(b for b in batches if b > 1) if background else ()
        self._dummy_steps(tuple(b for b in batches if b not in later))
        if later:
            self._building = threading.Thread(target=self._build_in_background, args=(later,), daemon=True,
                                              name="tinylm-compile-batched")
            self._building.start()

    @property
    def building(self) -> bool:
        """Whether warmup(background=True)'s thread is still building the batched graph."""
        building = self._building
        return building is not None and building.is_alive()

    def _building_batched(self) -> bool:
        """Whether the batched graph is still being built on another thread (this thread's steps run eagerly)."""
        if self._building is threading.current_thread():
            return False
        if self.building:
            return True
        self._building = None  # built (or failed: self.failed says so)
        return False

    def _build_in_background(self, batches: tuple[int, ...]) -> None:
        """The batched graph's warm-up on its own thread, at a lower CPU priority (a thread's nice value on Linux,
        inherited by its OpenMP workers and its g++ processes) so the engine thread keeps the cores while it decodes.
        The thread ends when the graph is built, and its OpenMP team with it (server/cli.py, on_a_passing_thread)."""
        with contextlib.suppress(AttributeError, OSError):  # best effort (not on every OS)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        self._dummy_steps(batches)

    @torch.inference_mode()
    def _dummy_steps(self, batches: tuple[int, ...]) -> None:
        """One decode step of each batch size (compiling its graph, or loading it from the disk cache). The dummy
        steps write to slot 0, the padding block, which only ever needs finite values."""
        for batch in batches:
            context = 17  # unlike the batch size: PyTorch would otherwise assume the two equal (duck sizing)
            valid = None if batch == 1 else torch.ones(batch, context, dtype=torch.bool)
            ids, positions = torch.zeros(batch, 1, dtype=torch.long), torch.zeros(batch, 1, dtype=torch.long)
            states = torch.full((batch,), self.pool.scratch_state_slot) if self.hybrid else None
            self(ids, positions, valid, torch.zeros(batch, dtype=torch.long),
                 torch.zeros(batch, context, dtype=torch.long), states)  # distinct tensors: aliasing is guarded on


class StepContext:
    """What a decode step reads besides its inputs: the model, the K/V pool and two switches. Its own small object,
    not the CompiledDecode: a saved step pickles the traced function's arguments with its guards (tensors as
    metadata, the model as a placeholder), and the engine's threads and compiled functions cannot be pickled."""

    def __init__(self, model, pool: KVPool, attention_kernel: bool, batch_invariant: bool) -> None:
        self.model = model
        self.pool = pool
        self.attention_kernel = attention_kernel  # paged one-query attention in C++ (else Inductor's loops)
        self.batch_invariant = batch_invariant  # use_batch_invariant ran on the model


def decode_step(context: StepContext, ids, positions, valid, write_slots, gather_slots, state_rows) -> torch.Tensor:
    """The traced function: one new token per row, (B, 1) ids and positions, (B, S) key mask or None, (B,) write
    slots, (B, S) gather slots, (B,) DeltaNet state rows or None -> (B, V) float32 logits."""
    # length: the context before the new token (the query offset)
    cache = PagedBatch(context.pool, write_slots, None, gather_slots, state_rows,
                       length=gather_slots.shape[1] - 1, attention_kernel=context.attention_kernel,
                       batch_invariant=context.batch_invariant)
    out = context.model(ids, attention_mask=valid, position_ids=positions, cache=cache, logits_to_keep=1)
    return out.logits[:, -1].float()


class _KernelSources(CustomGraphPass):
    """Changes nothing in the graph. Its uuid puts tinylm's kernel sources in Inductor's on-disk cache key: a graph
    is compiled against the kernels' output layouts (their fake implementations), and one compiled against an
    older version must not be reused (it gave wrong tokens, not an error)."""

    def __call__(self, graph) -> None:
        pass

    def uuid(self) -> str:
        return kernels.version()


# Freezing makes float weights constants of the compiled code instead of ~250 graph inputs that dynamo's prologue and
# the wrapper pass on every call (one engine each way, alternating generate calls, 2-core EPYC: bf16 batch 1 +5.1%,
# 7 of 8 pairs; the Qwen3-Gated-MoE hybrid +6.7%, 8 of 8; oneDNN weight prepacking, which freezing would also do,
# stays off then: it keeps a second copy of each weight). But AOTAutograd's cache refuses frozen graphs ("Cannot
# cache a graph with freezing enabled"): every start then traces each graph again and folds its constants. Without
# freezing a second process loads a graph from the AOTAutograd and FX caches: the built-in model's warm batch-1
# graph took 9.8-13 s instead of 38.6 s (2 cores under load; quiet figures in BENCHMARKS.md, Start-up). Off: the
# issue's 10 s warm start. `python benchmarks/startup.py --freezing-ab` measures the decode cost both ways.
FREEZE_WEIGHTS = False


def _root_cause(exc: BaseException) -> str:
    """'Type: first line' of the innermost exception: Dynamo's BackendCompilerFailed says only "backend='inductor'
    raised:" on its first line, the compiler's own error is its cause."""
    while getattr(exc, "inner_exception", None) is not None or exc.__cause__ is not None:
        exc = getattr(exc, "inner_exception", None) or exc.__cause__
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def _inductor_options(model) -> dict:
    """Inductor settings for this model's decode graph.

    Float weights are frozen only with FREEZE_WEIGHTS (off): see there for what it gains and costs.

    int8 layers are not frozen (constant folding keeps float copies of some int8 tensors: +0.18 GiB for w8a8, and
    batch-1 int8 decode was slower). Their batch-1 products are reductions over a weight row (Int8Linear); by
    default Inductor inlines the pointwise ops that make a reduction's input (the RMSNorm, SwiGLU's silu * up) into
    the reduction's loop, recomputing them for every output row, which makes int8 rows compute-bound (9 GB/s
    instead of 36). A low realize threshold stores such inputs once instead (it would cost float rows their wide
    vector loop). The layers say so themselves: `compiled_int_rows` (per-channel Int8Linear,
    tinylm/quant/int8_linear.py)."""
    frozen = {"freezing": True, "cpp.weight_prepack": False} if FREEZE_WEIGHTS else {}
    if getattr(model, "batch_invariant", False):
        # the ops between tinylm's invariant kernels (rotary, residual adds) rounded to the model's dtype after
        # each op, as eager PyTorch does: a decoded token's bits then equal the eager prefill's (issue 21)
        return {**frozen, "emulate_precision_casts": True}
    if any(getattr(m, "compiled_int_rows", False) for m in model.modules()):
        return {"realize_opcount_threshold": 2}
    return frozen


def _reserve_states(model, pool: KVPool) -> bool:
    """Give every DeltaNet layer its state pools now (eagerly they appear on the first write): the compiled step
    must read them from its first trace, and its guards skip the pool. True when the model has such layers."""
    layers = [m for m in model.modules() if isinstance(m, GatedDeltaNet)]
    if layers:
        with torch.inference_mode():  # the activations' dtype: what the conv state is stored in
            dtype = model.dtype
    for layer in layers:
        conv_row, recurrent_row = layer.state_shapes()
        pool.reserve_linear_state(layer.layer_idx, conv_row, dtype, recurrent_row)
    return bool(layers)


def _keep_guard(entries) -> list[bool]:
    """Dynamo's guards minus those on the model's modules and on the K/V pool's tensors: the engine never replaces
    either once it decodes, and the pool's 2 x layers tensors each cost a tensor match, an aliasing check and five
    dynamic-marking checks per call. The step's own inputs (ids, positions, slots, mask) stay guarded."""
    keep = torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)
    return [k and not e.name.startswith("context.pool.") for k, e in zip(keep, entries)]


def _own_code(function):
    """A copy of `function` with its own code object. Dynamo keeps compiled graphs (and counts recompilations
    against `recompile_limit`) per code object: with a shared one, every model compiled in this process would
    check the guards of all the others' graphs each step and, after 8 graphs, decode eagerly. A private copy
    scopes the cache to one engine and frees it with the engine."""
    return types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
