"""Whether decode steps are compiled, and where their compiled artifacts live between processes.

Compiling is on by default wherever a C++ compiler is present (Inductor writes C++): `TINYLM_COMPILE=0` (or
compile=False, --no-compile) turns the default off; without a compiler the engine warns once and decodes eagerly.

What a second process reuses: each compiled decode step whole (tinylm/engine/saved_steps.py: the traced step with its
guards, Dynamo's bytecode and Inductor's compiled code), loaded in about a second without tracing the model again
(torch 2.13, the built-in model on a 2-core AVX2 EPYC: warm chat 7.0 s to the first output, 11.7 s when Dynamo
traced each start). Steps that cannot be saved (saved_steps.NotSaveable) are traced in every process and reuse
AOTAutograd's cache and Inductor's FX graph cache (the generated C++ and its .so files). Weights are graph inputs,
not frozen constants (compiled.FREEZE_WEIGHTS says why), so a step compiled for one checkpoint serves every
checkpoint of the same architecture, dtype and quantization policy.

Inductor's cache goes in tinylm's cache folder (hub.cache_dir(), beside the built-in model), one sub-folder per
torch version, CPU capability and tinylm kernel sources; TORCHINDUCTOR_CACHE_DIR, when the user sets it, wins.
A saved step that does not load is compiled and saved again on its own; a graph that compiled in this folder before
and still fails has a damaged entry (a truncated .so, a corrupt pickle or header): the folder is then emptied and the
graph compiled once more from scratch (compiled.py, _first_call).
Entries of another torch, CPU or kernel version are never looked up (their key differs).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from tinylm import hub, kernels

SWITCH = "TINYLM_COMPILE"  # "0", "false", "no" or "off": eager unless compile=True is asked for explicitly
_INDUCTOR_DIR = "TORCHINDUCTOR_CACHE_DIR"
UNUSED_DAYS = 30  # a cache folder of another torch, CPU or kernel version, or a saved step, unused this long: deleted
FIRST_COMPILE_S = 60.0  # the estimate shown before this machine has compiled a graph (2 cores, SmolLM2's shapes)
_MANAGED: dict[str, Path] = {}  # "dir": the folder tinylm pointed Inductor at (None of it when the user chose one)


def compile_by_default() -> bool:
    """EngineConfig.compile's default: on, unless TINYLM_COMPILE says otherwise."""
    return os.environ.get(SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def missing_compiler() -> str:
    """Why Inductor cannot build C++ here ("" when it can): the compiler it would run (its config holds $CXX as it
    was when torch was imported, else g++)."""
    configured = next((c for c in torch._inductor.config.cpp.cxx if c), "g++")
    if shutil.which(configured) is None:
        return f"no C++ compiler ({configured!r} not found; install g++ or set CXX)"
    return ""


def cache_key() -> str:
    """The sub-folder of this torch, CPU and kernel sources: artifacts of any other combination are never read."""
    cpu = torch.backends.cpu.get_cpu_capability()
    sources = kernels.version().rsplit("_", 1)[-1]  # tinylm_kernels_<hash of the sources, CPU and torch>
    return f"torch-{torch.__version__}-{cpu}-kernels-{sources}".replace("+", "_")


def use_cache_dir() -> Path:
    """Point Inductor's on-disk caches at tinylm's cache folder (unless the user set TORCHINDUCTOR_CACHE_DIR);
    the folder Inductor caches in."""
    given = os.environ.get(_INDUCTOR_DIR)
    # Inductor writes its default (/tmp/torchinductor_$USER) into the variable on its first cache access
    defaults = {_MANAGED.get("dir"), Path(default_cache_dir()).absolute()}
    if given and Path(given).absolute() not in defaults:
        return Path(given)  # the user's choice
    folder = hub.cache_dir() / "compiled" / cache_key()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[_INDUCTOR_DIR] = str(folder)  # read by Inductor on every cache access
    if _MANAGED.get("dir") != folder:  # once a process
        _prune(folder)
    _MANAGED["dir"] = folder
    return folder


def _prune(folder: Path) -> None:
    """Mark `folder` used now and delete the sibling folders (other torch versions, CPUs, kernel sources: each
    tinylm or torch upgrade leaves one, tens of MB each) that no process has used for UNUSED_DAYS."""
    try:
        os.utime(folder)
        for other in folder.parent.iterdir():
            if other != folder and other.is_dir() and _unused(other):
                shutil.rmtree(other, ignore_errors=True)
    except OSError:  # a read-only or shared cache: nothing to clean
        pass


def prune_files(folder: Path, pattern: str) -> None:
    """Delete the files of `folder` matching `pattern` unused (not modified) for UNUSED_DAYS."""
    try:
        for file in folder.glob(pattern):
            if _unused(file):
                file.unlink(missing_ok=True)
    except OSError:
        pass


def _unused(path: Path) -> bool:
    """Whether `path` was last modified (used, for what tinylm touches) more than UNUSED_DAYS ago."""
    return time.time() - path.stat().st_mtime > UNUSED_DAYS * 86400


def discard_cache() -> bool:
    """Empty the folder tinylm manages (not a folder the user chose); True when there was one to empty."""
    folder = _MANAGED.get("dir")
    if folder is None or os.environ.get(_INDUCTOR_DIR) != str(folder):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    return True


def compiled_before(graph: str) -> bool:
    """Whether `graph` compiled in this cache folder before (record() noted how long it took)."""
    try:
        return graph in json.loads(_timings_path().read_text())
    except (OSError, ValueError, TypeError):
        return False


def estimate(graph: str) -> float:
    """Seconds the last compile of `graph` took here (warm or cold), else FIRST_COMPILE_S."""
    try:
        return float(json.loads(_timings_path().read_text())[graph])
    except (OSError, ValueError, KeyError, TypeError):
        return FIRST_COMPILE_S


def record(graph: str, seconds: float) -> None:
    """Remember how long compiling `graph` took, for the next estimate (best effort: a read-only cache is fine)."""
    path = _timings_path()
    try:
        timings = json.loads(path.read_text()) if path.exists() else {}
        timings[graph] = round(seconds, 1)
        path.write_text(json.dumps(timings, indent=1, sort_keys=True))
    except (OSError, ValueError):
        pass


def cache_folder() -> Path:
    """The folder Inductor caches in now (the user's, or the one use_cache_dir chose): saved steps and compile times
    are kept beside its entries, and emptied with them."""
    return Path(os.environ.get(_INDUCTOR_DIR) or use_cache_dir())


def _timings_path() -> Path:
    return cache_folder() / "tinylm-compile-times.json"


@contextlib.contextmanager
def progress(graph: str, description: str):
    """A tqdm bar, in seconds against the estimate, while the block compiles `graph` (shown on a terminal only).
    The bar ticks on its own thread, which runs no torch code: no second OpenMP team (server/cli.py)."""
    from tqdm import tqdm

    expected = estimate(graph)
    bar = tqdm(total=round(expected), desc=description, unit="s", disable=None, leave=False,
               bar_format="{desc}: {bar} {n:.0f}/{total:.0f} s (estimate)")
    done = threading.Event()
    start = time.perf_counter()

    def tick() -> None:
        while not done.wait(0.5):
            bar.n = min(time.perf_counter() - start, max(expected, 1) * 0.99)  # never "done" before it is
            bar.refresh()

    ticker = threading.Thread(target=tick, name="tinylm-compile-progress", daemon=True)
    ticker.start()
    try:
        yield
        record(graph, time.perf_counter() - start)
    finally:
        done.set()
        ticker.join()
        bar.close()
