"""Compiled decode steps saved whole to disk, so a later process starts without tracing the model again.

Inductor's on-disk caches (compile_cache.py) spare a second process the C++ compile, but not Dynamo: every start
still traced the model's Python for each graph, ~7.5 s of the built-in model's 11.7 s warm start on a 2-core AVX2
EPYC. torch's ahead-of-time compile (`torch.compile(fullgraph=True).aot_compile`, torch >= 2.10, experimental)
returns the traced step as one object, its guards, Dynamo's bytecode and Inductor's compiled code included, that
torch.compiler.load_compiled_function reads back in under a second.

A saved step holds no weights (they stay graph inputs, read from the engine's model at every call) but it does hold
the traced Python and every size the trace fixed: the model's structure, the K/V pool's shape, Inductor's options.
Its file name is therefore a hash of all of them (fingerprint()): tinylm's own sources (the traced code), the Python
version (the bytecode), every module's type, attributes and tensor shapes, the pool's tensors and the step's flags.
Torch's version, the CPU and tinylm's kernels are the cache folder's key already (compile_cache.cache_key). Any
change gives another name, and the step is compiled (and saved) again.

Not every step can be saved: a graph break, or a guard torch cannot serialize. compile() then raises NotSaveable
and the caller traces as before (torch.compile, Inductor's caches only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import torch
from torch._dynamo.guards import CheckFunctionManager

from tinylm.engine import compile_cache

log = logging.getLogger(__name__)
_FOLDER = "tinylm-steps"  # inside the Inductor cache folder: emptied with it when an entry is damaged


class NotSaveable(Exception):
    """This step cannot be compiled ahead of time or saved (a graph break, an unserializable guard or object)."""


def serializable_guards(keep):
    """A guard filter: `keep`'s choice minus the guards a saved step cannot carry (those on globals, such as which of
    tinylm's kernel ops are loaded: the cache folder's key covers the kernels, and types torch cannot serialize)."""
    unsupported = CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES

    def filter_guards(entries) -> list[bool]:
        return [kept and not (entry.is_global or entry.guard_type in unsupported)
                for kept, entry in zip(keep(entries), entries)]

    return filter_guards


def path(graph: str, fingerprint: str) -> Path:
    """Where the step `graph` ("llama-576x30-float32-batch1") of this fingerprint is saved."""
    return compile_cache.cache_folder() / _FOLDER / f"{graph}-{fingerprint[:24]}.bin"


def load(file: Path, f_globals: dict, options: dict):
    """The saved step, callable as step(context, ids, positions, valid, write slots, gather slots, state rows).
    f_globals: the traced function's module globals (its bytecode reads names from them). options: the Inductor
    options it was compiled with: loading links its C++ wrapper from the cache folder by a hash of the code and the
    compiler's command line, which these options shape (without them, the first load built it again: 7 s)."""
    inductor = {key: value for key, value in options.items() if key != "guard_filter_fn"}  # Dynamo's, not Inductor's
    with open(file, "rb") as handle, torch._inductor.config.patch(inductor):
        step = torch.compiler.load_compiled_function(handle, f_globals=f_globals)
    with contextlib.suppress(OSError):
        os.utime(file)  # its last use: steps unused for compile_cache.UNUSED_DAYS are deleted
    return step


def compile(fullgraph, file: Path, example: tuple):
    """Compile `fullgraph` (torch.compile(..., fullgraph=True)) for the example arguments, save it to `file` (best
    effort: a read-only cache only costs the next start its trace) and return it."""
    try:
        # Float scalars as constants of the graph (the batch-invariant step's casts use some): left symbolic, Dynamo
        # restarts the trace to turn them into tensors, which an ahead-of-time compile cannot do
        # (TensorifyScalarRestartAnalysis). Any float the trace reads is in the fingerprint.
        with torch._dynamo.config.patch(specialize_float=True):
            step = fullgraph.aot_compile((example, {}))
    except Exception as exc:  # noqa: BLE001 - a graph break, a guard or cache entry it cannot hold: trace instead
        raise NotSaveable(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}") from exc
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        step.save_compiled_function(str(file))
        compile_cache.prune_files(file.parent, "*.bin")  # steps of older sources or other models, long unused
    except (OSError, RuntimeError, TypeError, AttributeError) as exc:
        log.info("the compiled decode step was not saved (%s); the next start traces it again", exc)
    return step


def fingerprint(model: torch.nn.Module, pool, flags: dict) -> str:
    """A hash of everything a traced decode step depends on besides the weights' values (see the module's doc)."""
    modules = {name or "<model>": _describe_module(module) for name, module in model.named_modules()}
    pool_state = {k: v for k, v in vars(pool).items() if k != "free_state_slots"}  # which slots are free: runtime
    text = json.dumps({"sources": _sources_hash(), "python": sys.version, "modules": modules,
                       "pool": _describe(pool_state), "flags": _describe(flags)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _describe_module(module: torch.nn.Module) -> dict:
    """A module's type, its plain attributes, its parameters' and buffers' shapes (not its children: they come as
    modules of their own)."""
    state = {k: v for k, v in vars(module).items() if k != "_modules" and not k.endswith("hooks")}
    return {"type": f"{type(module).__module__}.{type(module).__qualname__}", "state": _describe(state)}


def _describe(value, depth: int = 0):
    """JSON-able text for what a trace reads from `value`: a tensor's shape, dtype, strides and device; scalars as
    they are; containers and dataclasses (a model's config) item by item; any other object by its type."""
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}:{value.dtype}:{value.stride()}:{value.device.type}"
    if isinstance(value, (bool, int, float, str, type(None), torch.dtype, torch.device)):
        return repr(value)
    if depth < 4 and isinstance(value, (list, tuple)):
        return [_describe(item, depth + 1) for item in value]
    if depth < 4 and isinstance(value, dict):
        return {str(key): _describe(item, depth + 1) for key, item in value.items()}
    if depth < 4 and dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _describe(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value)}
    return f"{type(value).__module__}.{type(value).__qualname__}"


@functools.cache
def _sources_hash() -> str:
    """tinylm's Python sources (what Dynamo traced into the step), hashed: an edited layer is traced again."""
    root = Path(__file__).resolve().parents[1]  # the tinylm package
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*.py")):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()
