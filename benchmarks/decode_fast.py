"""Batch-1 decode of the default model, every tinylm configuration against transformers and llama.cpp, in one run.

    .venv/bin/python benchmarks/decode_fast.py --repeats 3 [--only bfloat16,bfloat16+int4]

tinylm: float32 / bfloat16 / int8 / int4 weights, eager and compiled (`tinylm.load(..., compile=True)`: the
decode step through torch.compile, fused q/k/v and gate/up; compile time is reported apart and not counted).
transformers: the same GGUF dequantized to float32 / bfloat16 (benchmarks/decode.py's loader). llama.cpp: the
GGUF as stored (Q4_1) through llama-cpp-python built from source, greedy. Same prompt, 128 new tokens, EOS
ignored, decode tokens/s = (tokens - 1) / time after the first token, best of --repeats. Ratios are against
transformers bfloat16 (measured again after every tinylm configuration, as the VM's speed drifts: the best figure
of the run) and llama.cpp.

--pairs N (item 1's side-by-side figure): after each tinylm configuration's best-of-repeats, N pairs of runs, one
tinylm and one transformers bf16 each, back to back (which goes first alternates), each pair giving a ratio; the
table adds the median pair ratio and the lowest. Both systems are timed over the same seconds, so the VM's drift
(10-25% between minutes) moves both; the best-of-run column instead sets tinylm's best of --repeats against
transformers' best of every run, a harsher figure.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tinylm
from tinylm import hub

from decode import (PROMPT, best, load_transformers, machine, tinylm_configs, tinylm_decode,
                    transformers_decode)

CONFIGS = [("float32", None, False), ("float32", None, True), ("bfloat16", None, False), ("bfloat16", None, True),
           ("float32", "int8", False), ("float32", "int8", True), ("float32", "int4", False), ("float32", "int4", True),
           ("bfloat16", "int8", True), ("bfloat16", "int4", True), ("bfloat16", "w8a8", True)]


def llama_cpp_decode(gguf, new_tokens: int, repeats: int) -> float | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)
    prompt = llm.tokenize(PROMPT.encode())

    def run() -> tuple[float, float, float]:
        llm.reset()
        start, stamps = time.perf_counter(), []
        for _ in llm.generate(prompt, top_k=1, temp=0.0):
            stamps.append(time.perf_counter())
            if len(stamps) == new_tokens:
                break
        return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0]), 0.0

    run()
    return best(run, repeats)[1]


def paired(llm, model, prompt_ids: list[int], new_tokens: int, pairs: int) -> list[float]:
    """tinylm / transformers bf16 decode tokens/s over `pairs` back-to-back pairs, the first of each alternating."""
    ratios = []
    for pair in range(pairs):
        runs = [lambda: tinylm_decode(llm, prompt_ids, new_tokens)[1],
                lambda: transformers_decode(model, prompt_ids, new_tokens)[1]]
        first, second = runs if pair % 2 == 0 else runs[::-1]
        a, b = first(), second()
        ours, theirs = (a, b) if pair % 2 == 0 else (b, a)
        ratios.append(ours / theirs)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=None, metavar="W,W",
                        help="only these compiled tinylm configurations, e.g. bfloat16,bfloat16+int4")
    parser.add_argument("--pairs", type=int, default=0, help="pairs of back-to-back runs per configuration")
    args = parser.parse_args()
    configs = CONFIGS if args.only is None else [
        c for c in CONFIGS if c[2] and "+".join(filter(None, c[:2])) in args.only.split(",")]
    gguf = hub.resolve(None)
    print(f"machine: {machine()}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; "
          f"model {gguf.name}; batch 1; {args.new_tokens} new tokens")
    prompt_ids = tinylm.load(gguf).encode(PROMPT)
    reference = {}
    for dtype in ("float32", "bfloat16"):
        model = load_transformers(gguf, getattr(torch, dtype))
        transformers_decode(model, prompt_ids, 8)
        reference[dtype] = best(lambda: transformers_decode(model, prompt_ids, args.new_tokens), args.repeats)[1]
    bf16_runs = [reference["bfloat16"]]  # `model` is the bf16 one: measured again after each tinylm configuration
    llama = llama_cpp_decode(gguf, args.new_tokens, args.repeats)
    rows, pair_ratios = [], []

    def measure(llm) -> float:
        value = best(lambda: tinylm_decode(llm, prompt_ids, args.new_tokens), args.repeats)[1]
        pair_ratios.append(paired(llm, model, prompt_ids, args.new_tokens, args.pairs))
        return value

    for row in tinylm_configs(gguf, configs, lambda llm: tinylm_decode(llm, prompt_ids, 8), measure):
        rows.append(row)
        bf16_runs.append(transformers_decode(model, prompt_ids, args.new_tokens)[1])
        pairs = " ".join(f"{r:.2f}" for r in pair_ratios[-1])
        print(f"  {row[0]} {row[1]}: {row[2]:.1f} tok/s, then transformers bf16 {bf16_runs[-1]:.1f}"
              + (f"; pair ratios {pairs}" if pairs else ""), flush=True)
    reference["bfloat16"] = max(bf16_runs)
    base, anchor = reference["bfloat16"], llama or float("nan")
    print(f"transformers bf16 over the run: {min(bf16_runs):.1f} to {base:.1f} tok/s ({len(bf16_runs)} runs); "
          "ratios against the best")
    extra = " vs transformers bf16, pairs (median, lowest) |" if args.pairs else ""
    print(f"| system | weights | decode | tok/s | vs transformers bf16 (best of run) |{extra} vs llama.cpp Q4_1 | "
          "compile s |")
    print("|---|---|---|---:|---:|" + ("---:|" if args.pairs else "") + "---:|---:|")
    blank = " |" if args.pairs else ""
    for dtype, value in reference.items():
        print(f"| transformers | {dtype} | eager | {value:.1f} | {value / base:.2f}x |{blank} {value / anchor:.2f}x | |")
    if llama:
        print(f"| llama.cpp | Q4_1 (as stored) | native | {llama:.1f} | {llama / base:.2f}x |{blank} 1.00x | |")
    for (weights, mode, value, compile_s), ratios in zip(rows, pair_ratios):
        pairs = f" {statistics.median(ratios):.2f}x, {min(ratios):.2f}x |" if ratios else ""
        print(f"| tinylm | {weights} | {mode} | {value:.1f} | {value / base:.2f}x |{pairs} {value / anchor:.2f}x | "
              f"{compile_s:.0f} |", flush=True)

if __name__ == "__main__":
    main()
