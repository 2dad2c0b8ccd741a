"""Start-up time of `tinylm chat` and `tinylm serve` with the built-in model (SmolLM2-135M-Instruct), cold and warm.

    python benchmarks/startup.py [--runs 2] [--extra-flags "--no-compile"]
    python benchmarks/startup.py --freezing-ab 8

cold: a fresh tinylm cache folder (the built-in GGUF linked in, so nothing is downloaded): every decode graph is
compiled. warm: the same folder again, as the next start finds it. tinylm's C++ kernels (torch's extension folder)
are built already in both: a machine's very first start adds their build (~20 s on 2 cores).
chat: seconds from the command's start to its first printed byte (`tinylm chat -m ...`, greedy, 16 tokens) and to
its exit. serve: seconds until /health answers 200 (the server answers once its batch-1 graph is ready; the batched
one is built meanwhile, in the background).
--freezing-ab N: what the warm start costs in decode speed. Frozen weights (compiled.FREEZE_WEIGHTS) decode faster
but cannot be loaded from AOTAutograd's cache, so every start traces the graph again: N pairs of 128-token greedy
batch-1 generations of the built-in model, one compiled engine each way, alternating in one process.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tinylm import hub

TINYLM = [sys.executable, "-m", "tinylm.cli"]


def fresh_cache(root: Path) -> Path:
    """A tinylm cache folder holding only the built-in GGUF (linked, not copied)."""
    gguf = hub.resolve(None)
    folder = root / "tinylm-cache"
    folder.mkdir()
    (folder / gguf.name).symlink_to(gguf)
    return folder


def chat(env: dict, flags: list[str]) -> tuple[float, float]:
    start = time.perf_counter()
    process = subprocess.Popen([*TINYLM, "chat", *flags, "-m", "What is the capital of France?", "--temperature",
                                "0", "--max-tokens", "16"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    process.stdout.read(1)
    first = time.perf_counter() - start
    process.communicate()
    return first, time.perf_counter() - start


def serve(env: dict, flags: list[str]) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    process = subprocess.Popen([*TINYLM, "serve", *flags, "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
                    if reply.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.2)
        raise SystemExit(f"tinylm serve exited with {process.returncode}")
    finally:
        process.terminate()
        process.wait()


def freezing_ab(pairs: int) -> None:
    import tinylm
    from tinylm.cli_args import resolve_dtype
    from tinylm.engine import compiled

    engines = {}
    for frozen in (True, False):
        compiled.FREEZE_WEIGHTS = frozen  # read when the engine (and its compiled step) is made
        llm = tinylm.load(None, dtype=resolve_dtype("auto", "cpu"), compile=True)
        llm.engine.runner.compiled.warmup(batches=(1,))
        engines["frozen" if frozen else "not frozen"] = llm
    params = tinylm.SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(pairs):
        for name, llm in engines.items():
            start = time.perf_counter()
            llm.generate(["The capital of France is"], params, use_tqdm=False)
            rates[name].append(128 / (time.perf_counter() - start))
    wins = sum(f > n for f, n in zip(rates["frozen"], rates["not frozen"]))
    for name, values in rates.items():
        print(f"{name}: {sorted(values)[len(values) // 2]:.1f} tok/s median of {pairs} (batch 1, 128 tokens)")
    print(f"frozen faster in {wins} of {pairs} pairs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2, help="warm starts after the cold one")
    parser.add_argument("--extra-flags", default="", help="flags for both commands, e.g. '--no-compile'")
    parser.add_argument("--freezing-ab", type=int, default=0, metavar="PAIRS",
                        help="instead: decode speed with frozen weights vs without, PAIRS alternating pairs")
    args = parser.parse_args()
    if args.freezing_ab:
        return freezing_ab(args.freezing_ab)
    flags = shlex.split(args.extra_flags)
    for command in ("chat", "serve"):
        with tempfile.TemporaryDirectory() as root:
            env = {k: v for k, v in os.environ.items() if k not in ("TINYLM_COMPILE", "TORCHINDUCTOR_CACHE_DIR")}
            env["TINYLM_CACHE"] = str(fresh_cache(Path(root)))
            for run in range(1 + args.runs):
                label = "cold" if run == 0 else "warm"
                if command == "chat":
                    first, total = chat(env, flags)
                    print(f"tinylm chat {' '.join(flags)} {label}: first output {first:.1f} s, exit {total:.1f} s",
                          flush=True)
                else:
                    print(f"tinylm serve {' '.join(flags)} {label}: /health 200 after {serve(env, flags):.1f} s",
                          flush=True)
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
