"""Compiled decode graphs are cached on disk (tinylm/engine/compile_cache.py): a second process loads them instead of
compiling (counted by Inductor's cache counters, not timed), a corrupt entry is rebuilt, an entry compiled against
other kernel sources is not reused, and without a C++ compiler the engine warns once and decodes eagerly.

Each process here runs the default path (tinylm.load with no compile argument, TINYLM_COMPILE unset) on a tiny
Qwen3 checkpoint, one prompt (the batch-1 graph only), with its own tinylm cache folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import tinylm
from tinylm.engine.engine import EngineConfig, LLMEngine

# Runs in a fresh process: the default-on path, then the same prompt eagerly; prints what happened as JSON.
SCRIPT = r"""
import json, sys
import tinylm
from tinylm.engine import compiled
from torch._dynamo.utils import counters

if sys.argv[2] == "stale":  # as if tinylm's kernel sources had changed since the cache was written
    compiled._KernelSources.uuid = lambda self: "other kernel sources"
params = tinylm.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
llm = tinylm.load(sys.argv[1])
tokens = llm.generate(["Once upon a time"], params, use_tqdm=False)[0].outputs[0].token_ids
decode = llm.engine.runner.compiled
eager = tinylm.load(sys.argv[1], compile=False).generate(["Once upon a time"], params, use_tqdm=False)
print(json.dumps({"compiled": decode is not None and not decode.failed, "rebuilt": decode and decode.rebuilt,
                  "tokens": list(tokens), "eager": list(eager[0].outputs[0].token_ids),
                  "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"]}))
"""


@pytest.fixture(scope="module")
def model_dir(tiny_folder):
    return tiny_folder("qwen3", 5)


def _process(model_dir: Path, cache: Path, mode: str = "plain") -> dict:
    """One process with the default settings and `cache` as tinylm's cache folder; its report."""
    env = {k: v for k, v in os.environ.items() if k not in ("TINYLM_COMPILE", "TORCHINDUCTOR_CACHE_DIR")}
    env["TINYLM_CACHE"] = str(cache)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(model_dir), mode], env=env, capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["compiled"], done.stderr[-6000:]  # the default decoded through the graph, not eagerly
    assert report["tokens"] == report["eager"] and len(report["tokens"]) == 8
    return report


@pytest.fixture(scope="module")
def warm_cache(model_dir, tmp_path_factory) -> tuple[Path, dict]:
    """A cache folder one process has compiled into, and that process's report."""
    cache = tmp_path_factory.mktemp("tinylm-cache")
    first = _process(model_dir, cache)
    assert first["misses"] >= 1 and first["hits"] == 0  # compiled from scratch
    assert list(cache.glob("compiled/*/fxgraph"))  # in tinylm's cache folder, not /tmp/torchinductor_$USER
    return cache, first


def test_second_process_reuses_the_compiled_graph(model_dir, warm_cache):
    cache, first = warm_cache
    second = _process(model_dir, cache)
    assert second["misses"] == 0 and second["hits"] == first["misses"]  # nothing recompiled
    assert second["tokens"] == first["tokens"]


def test_corrupt_cache_entry_is_rebuilt(model_dir, warm_cache, tmp_path):
    cache = tmp_path / "cache"
    _copy_tree(warm_cache[0], cache)
    shared_objects = list(cache.rglob("*.so"))
    assert shared_objects
    for path in shared_objects:  # a disk that filled up mid-write, a crash: files that no longer load
        path.write_bytes(b"not a shared object")
    report = _process(model_dir, cache)  # still compiled, still the eager tokens (checked in _process)
    assert report["rebuilt"] == 1 and report["misses"] >= 1  # detected: the cache emptied and the graph compiled
    again = _process(model_dir, cache)
    assert again["misses"] == 0 and again["rebuilt"] == 0  # the rebuilt entry is sound


def test_entry_of_other_kernel_sources_is_not_reused(model_dir, warm_cache, tmp_path):
    cache = tmp_path / "cache"
    _copy_tree(warm_cache[0], cache)
    report = _process(model_dir, cache, "stale")
    assert report["hits"] == 0 and report["misses"] >= 1


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


def _copy_tree(source: Path, dest: Path) -> None:
    import shutil

    shutil.copytree(source, dest)
