"""Compiled decode steps are saved on disk (tinylm/engine/saved_steps.py, compile_cache.py): a second process loads
them whole instead of tracing and compiling (counted by Dynamo's, Inductor's and AOTAutograd's counters and the
engine's own, not timed), a corrupt entry is rebuilt, an entry compiled against other kernel sources is not reused,
a step's key changes with what the trace fixed (the model's structure, the pool) and not with the weights, and
without a C++ compiler the engine warns once and decodes eagerly.

Three processes in all (the fewest that show it: a graph loaded once stays loaded in its process, so a second
process is the only honest reader of the cache, and a corrupt file is noticed only by a process that has not loaded
it yet): one compiles into a fresh cache and then compiles against other kernel sources, one reads that cache, one
reads a copy with every shared object damaged. Each runs the default path (tinylm.load with no compile argument,
TINYLM_COMPILE unset) on a 1-layer tiny Qwen3 checkpoint. The first also warms up as a server does: the batched
graph built on a thread while batched steps decode eagerly (compiled.py, warmup(background=True))."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch

import tinylm
from tinylm import tiny
from tinylm.engine.engine import EngineConfig, LLMEngine

# Runs in a fresh process: the default-on path, one prompt alone (the batch-1 graph) and two together (the batched
# graph), then the same eagerly; prints what happened as JSON. "cold" first warms up as a server does (batch 1 now,
# the batched graph on a thread while batched steps run eagerly), and at the end compiles once more as if tinylm's
# kernel sources had changed since the cache was written. "corrupt": the prompt alone only.
SCRIPT = r"""
import json, sys
import tinylm
from tinylm.engine import compiled
from torch._dynamo.utils import counters

PARAMS = tinylm.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPTS = ["Once upon a time", "The little dog"]
mode = sys.argv[2]

def decode(llm, prompts):
    return [list(out.outputs[0].token_ids) for out in llm.generate(prompts, PARAMS, use_tqdm=False)]

def both(llm):
    return decode(llm, PROMPTS[:1]) + ([] if mode == "corrupt" else decode(llm, PROMPTS))

def lookups():  # graphs traced by Dynamo, compiled (misses) and loaded (hits) by Inductor and AOTAutograd so far
    return {"traced": counters["stats"]["unique_graphs"], "hits": counters["inductor"]["fxgraph_cache_hit"],
            "misses": counters["inductor"]["fxgraph_cache_miss"],
            "aot_hits": counters["aot_autograd"]["autograd_cache_hit"],
            "aot_misses": counters["aot_autograd"]["autograd_cache_miss"]}

llm = tinylm.load(sys.argv[1])
step = llm.engine.runner.compiled
report = {"eager": both(tinylm.load(sys.argv[1], compile=False))}
if mode == "cold":
    step.warmup(background=True)
    tokens = both(llm)  # the batch-1 graph runs beside the batched graph's compile
    report["while_building"] = {"tokens": tokens, "building": llm.engine.compiling,
                                "batched_graph": True in step._traced}
    step._building.join()
    report["while_building"]["after_join"] = llm.engine.compiling  # what /metrics' compile_in_progress reads
report.update(tokens=both(llm), compiled=not step.failed, rebuilt=step.rebuilt, graphs=sorted(step._traced),
              loaded=step.loaded, **lookups())
if mode == "cold":
    compiled._KernelSources.uuid = lambda self: "other kernel sources"
    stale = tinylm.load(sys.argv[1])
    stale_tokens = decode(stale, PROMPTS[:1])
    after = lookups()
    report["stale"] = {"compiled": not stale.engine.runner.compiled.failed, "tokens": stale_tokens,
                       "loaded": stale.engine.runner.compiled.loaded,
                       **{k: after[k] - report[k] for k in after}}
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A 1-layer tiny Qwen3 checkpoint: the smallest graph that still holds every kind of op a decode step has."""
    one_layer = dict(tiny.FAMILIES["qwen3"], num_hidden_layers=1)
    with mock.patch.dict(tiny.FAMILIES, {"qwen3": one_layer}):
        return tiny.make_tiny("qwen3", tmp_path_factory.mktemp("tiny") / "qwen3", seed=5)


def _process(model_dir: Path, cache: Path, mode: str) -> dict:
    """One process with the default settings and `cache` as tinylm's cache folder; its report."""
    env = {k: v for k, v in os.environ.items() if k not in ("TINYLM_COMPILE", "TORCHINDUCTOR_CACHE_DIR")}
    env["TINYLM_CACHE"] = str(cache)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(model_dir), mode], env=env, capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["compiled"], done.stderr[-6000:]  # the default decoded through the graph, not eagerly
    assert report["tokens"] == report["eager"] and all(len(tokens) == 8 for tokens in report["tokens"])
    return report


@pytest.fixture(scope="module")
def warm_cache(model_dir, tmp_path_factory) -> tuple[Path, dict]:
    """A cache folder one process has compiled into, and that process's report."""
    cache = tmp_path_factory.mktemp("tinylm-cache")
    first = _process(model_dir, cache, "cold")
    assert first["traced"] >= 2 and first["aot_misses"] >= 2 and first["loaded"] == 0  # compiled from scratch
    assert first["graphs"] == [False, True]  # batch 1 and batched, both through their graphs
    # saved in tinylm's cache folder, not /tmp/torchinductor_$USER: one file per step (batch 1 twice: once more
    # against the other kernel sources at the end)
    assert len(list(cache.glob("compiled/*/tinylm-steps/*-batch1-*.bin"))) == 2
    assert len(list(cache.glob("compiled/*/tinylm-steps/*-batched-*.bin"))) == 1
    return cache, first


def test_second_process_reuses_the_compiled_graphs(model_dir, warm_cache):
    cache, first = warm_cache
    second = _process(model_dir, cache, "warm")
    # both steps loaded whole: nothing traced by Dynamo or AOTAutograd again, nothing recompiled
    assert second["loaded"] == 2 and second["traced"] == 0
    assert second["misses"] == 0 and second["aot_misses"] == 0
    assert second["tokens"] == first["tokens"]


def test_server_warmup_builds_the_batched_graph_while_decoding_eagerly(warm_cache):
    report = warm_cache[1]
    while_building = report["while_building"]  # decoded right after warmup(background=True) returned
    assert while_building["building"] and not while_building["batched_graph"]  # no batched graph yet: eager steps
    assert not while_building["after_join"]
    assert while_building["tokens"] == report["eager"]


def test_corrupt_cache_entry_is_rebuilt(model_dir, warm_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(warm_cache[0], cache)
    damaged = list(cache.rglob("*.so")) + list(cache.rglob("*.bin"))
    assert damaged
    for path in damaged:  # a disk that filled up mid-write, a crash: files that no longer load
        path.write_bytes(b"not a shared object")
    report = _process(model_dir, cache, "warm")  # still compiled, still the eager tokens (checked in _process)
    assert report["loaded"] == 0 and report["traced"] >= 2  # detected: both steps compiled again
    # and saved again whole (the batched step has one file; batch 1's other file is the other kernels', never read)
    batched = list(cache.rglob("*-batched-*.bin"))
    assert len(batched) == 1 and batched[0].read_bytes() != b"not a shared object"
    report = _process(model_dir, cache, "warm")
    assert report["loaded"] == 2 and report["traced"] == 0  # what the repair wrote loads


def test_a_build_failing_where_it_compiled_before_empties_the_cache_once(tiny_folder, monkeypatch):
    """The last resort for a damaged entry that even a fresh compile reads (an AOTAutograd or Inductor cache entry):
    where this graph compiled before, the cache folder is emptied and the step built once more."""
    from tinylm.engine import compile_cache
    from tinylm.engine.compiled import CompiledDecode

    build, failures, discarded = CompiledDecode._build, [], []

    def fail_once(self, *args):
        if not failures:
            failures.append(1)
            raise RuntimeError("a damaged cache entry")
        return build(self, *args)

    monkeypatch.setattr(CompiledDecode, "_build", fail_once)
    monkeypatch.setattr(compile_cache, "compiled_before", lambda graph: True)
    monkeypatch.setattr(compile_cache, "discard_cache", lambda: discarded.append(1) or True)
    llm = tinylm.load(tiny_folder("qwen3", 3), compile=True)
    step = llm.engine.runner.compiled
    step.warmup(batches=(1,))
    assert step.rebuilt == 1 and discarded == [1] and not step.failed and step._traced == {False}


def test_entry_of_other_kernel_sources_is_not_reused(warm_cache):
    stale = warm_cache[1]["stale"]  # the first process again, its kernels' version changed after it compiled
    assert stale["compiled"] and stale["loaded"] == 0 and stale["traced"] >= 1 and stale["aot_hits"] == 0
    assert stale["tokens"] == warm_cache[1]["eager"][:1]


def test_no_compiler_warns_once_and_decodes_eagerly(model_dir):
    # Inductor's compiler ($CXX when torch was imported; config.patch restores it, monkeypatch.setattr deleted it);
    # tinylm's own kernels are built already, or use PyTorch's ops
    with torch._inductor.config.patch({"cpp.cxx": (None, "/nonexistent/g++")}):
        llm = tinylm.load(model_dir, compile=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine = LLMEngine(llm.model, llm.tokenizer, llm.eos_token_ids, EngineConfig(compile=True))
        assert engine.runner.compiled is None
        assert [str(w.message) for w in caught if "compil" in str(w.message)] == [
            "not compiling: no C++ compiler ('/nonexistent/g++' not found; install g++ or set CXX)"]
        params = tinylm.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        assert len(llm.generate(["Hi"], params, use_tqdm=False)[0].outputs[0].token_ids) == 4
    assert torch._inductor.config.cpp.cxx[1] != "/nonexistent/g++"  # restored for the tests that follow


def test_switch_turns_the_default_off(monkeypatch):
    monkeypatch.setenv("TINYLM_COMPILE", "0")
    assert EngineConfig().compile is False
    monkeypatch.setenv("TINYLM_COMPILE", "1")
    assert EngineConfig().compile is True
    assert EngineConfig(compile=False).compile is False


def test_cache_folder_changes_with_the_kernel_sources(monkeypatch):
    from tinylm import kernels
    from tinylm.engine import compile_cache

    monkeypatch.setattr(kernels, "version", lambda: "tinylm_kernels_0123456789ab")
    before = compile_cache.cache_key()
    monkeypatch.setattr(kernels, "version", lambda: "tinylm_kernels_ba9876543210")
    assert compile_cache.cache_key() != before and before.endswith("0123456789ab")


def test_saved_step_key_follows_the_structure_not_the_weights(model_dir):
    """A saved step fixes the model's structure and the pool's shape (its file name hashes them): another checkpoint
    of the same architecture reuses it; another dtype, pool size or switch is compiled anew."""
    from tinylm.engine import saved_steps
    from tinylm.engine.kv_pool import KVPool

    def key(model, blocks=8, **flags):
        pool = KVPool(model.config, blocks, 16, 4, torch.float32, "cpu")
        return saved_steps.fingerprint(model, pool, {"attention_kernel": True, **flags})

    model = tinylm.load(model_dir, compile=False).model
    base = key(model)
    assert key(model) == base
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # other weights, same architecture
    assert key(model) == base
    assert key(model, blocks=9) != base  # the pool's size is fixed in the graph
    assert key(model, attention_kernel=False) != base
    assert key(model.to(torch.bfloat16)) != base
    model.config.rms_norm_eps = model.config.rms_norm_eps * 2  # a constant the trace reads
    assert key(model.float()) != base


def test_folders_and_steps_unused_for_a_month_are_deleted(tmp_path, monkeypatch):
    """Each torch or tinylm upgrade leaves a cache folder and saved steps behind: those no process used for
    compile_cache.UNUSED_DAYS are deleted when another is opened or saved; recent ones stay."""
    import time

    from tinylm.engine import compile_cache

    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setitem(compile_cache._MANAGED, "dir", None)
    month = time.time() - (compile_cache.UNUSED_DAYS + 1) * 86400
    old, recent = tmp_path / "compiled" / "torch-old", tmp_path / "compiled" / "torch-recent"
    for folder in (old, recent):
        (folder / "tinylm-steps").mkdir(parents=True)
    os.utime(old, (month, month))
    current = compile_cache.use_cache_dir()
    assert current.exists() and recent.exists() and not old.exists()

    steps = current / "tinylm-steps"
    steps.mkdir()
    (steps / "unused.bin").write_bytes(b"")
    (steps / "used.bin").write_bytes(b"")
    os.utime(steps / "unused.bin", (month, month))
    compile_cache.prune_files(steps, "*.bin")
    assert [p.name for p in steps.iterdir()] == ["used.bin"]
