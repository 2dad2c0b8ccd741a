"""`--compare llama-server`: llama.cpp's own HTTP server (continuous batching over N slots) on the same GGUF,
driven by the same load generator as `tinylm serve` (tinylm/bench/load.py, its OpenAI /v1/completions route).

The binary is built from the llama.cpp sources the llama-cpp-python sdist vendors (the version the
llama.cpp reference runs), only its `llama-server` target, into ~/.cache/tinylm/llama-server:

    pip download llama-cpp-python --no-binary :all: --no-deps -d /tmp/sdist && tar xzf /tmp/sdist/*.tar.gz -C /tmp/sdist
    cmake -S /tmp/sdist/llama_cpp_python-*/vendor/llama.cpp -B ~/.cache/tinylm/llama-server/build -G Ninja \
        -DCMAKE_BUILD_TYPE=Release -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF
    cmake --build ~/.cache/tinylm/llama-server/build --target llama-server -j2

or any llama-server named by $TINYLM_LLAMA_SERVER.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from tinylm.bench.serve import ServedSystem, ServerProcess

# Weight repacking off: with it, a -march=native build on an AMX host (Sapphire Rapids) runs Q4_1 products through
# ggml's AMX buffer type, which crashed (SIGSEGV in ggml_backend_amx_mul_mat, llama.cpp of llama-cpp-python 0.3.36)
NO_AMX = ["--no-repack"]
BUILT = Path.home() / ".cache" / "tinylm" / "llama-server" / "build" / "bin" / "llama-server"


def llama_server_binary() -> Path | None:
    """$TINYLM_LLAMA_SERVER, the build above, or a llama-server on PATH."""
    named = os.environ.get("TINYLM_LLAMA_SERVER")
    if named:
        return Path(named)
    if BUILT.exists():
        return BUILT
    found = shutil.which("llama-server")
    return Path(found) if found else None


class LlamaServerSystem(ServedSystem):
    name = "llama-server"
    request_extra = {"cache_prompt": False}  # each run's prompts are new anyway (fresh_prompts)

    def __init__(self, binary: Path, gguf: Path, max_clients: int, slot_context: int) -> None:
        threads = str(torch.get_num_threads())
        # one slot per client, each with the context a request needs; the prompt cache off
        command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "-np", str(max_clients), "-cb",
                   "-c", str(max_clients * slot_context), "-t", threads, "-tb", threads, "--no-webui",
                   "--cache-ram", "0", *NO_AMX]
        self.label = (f"{gguf.name} as stored, llama.cpp's server ({binary}), --parallel {max_clients} "
                      "--cont-batching, one streaming client per prompt (another process)")
        self.server = ServerProcess(command, "llama-server")
