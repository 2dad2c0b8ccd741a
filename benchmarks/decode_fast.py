"""Batch-1 decode of the default model, every tinylm configuration against transformers and llama.cpp, in one run.

    .venv/bin/python benchmarks/decode_fast.py --repeats 3 [--only bfloat16,bfloat16+int4]

tinylm: float32 / bfloat16 / int8 / int4 weights, eager and compiled (`tinylm.load(..., compile=True)`: the
decode step through torch.compile, fused q/k/v and gate/up; compile time is reported apart and not counted).
transformers: the same GGUF dequantized to float32 / bfloat16 (benchmarks/decode.py's loader). llama.cpp: the
GGUF as stored (Q4_1) and a BF16 copy of it (benchmarks/gguf_float.py: the same weights tinylm's bf16 runs), through
llama-cpp-python built from source, greedy. Same prompt, 128 new tokens, EOS
ignored, decode tokens/s = (tokens - 1) / time after the first token, best of --repeats. Ratios are against
transformers bfloat16 (measured again after every tinylm configuration, as the VM's speed drifts: the best figure
of the run) and llama.cpp.

--pairs N (item 1's side-by-side figure): after each tinylm configuration's best-of-repeats, N rounds of runs, one
tinylm, one transformers bf16 and one llama.cpp BF16 each, back to back (the order rotating), each round giving a
ratio per system; the table adds the median round ratio and the lowest. All are timed over the same seconds, so
the VM's drift (10-25% between minutes) moves them together, as far as they are bound by the same resource:
tinylm's and llama.cpp's bf16 decode by memory bandwidth, transformers' by per-op overhead. The best-of-run
column sets tinylm's best of --repeats against transformers' best of every run, a harsher figure.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import tinylm
from tinylm import hub

from decode import (PROMPT, best, load_transformers, machine, tinylm_configs, tinylm_decode,
                    transformers_decode)
from gguf_float import float_gguf

CONFIGS = [("float32", None, False), ("float32", None, True), ("bfloat16", None, False), ("bfloat16", None, True),
           ("float32", "int8", False), ("float32", "int8", True), ("float32", "int4", False), ("float32", "int4", True),
           ("bfloat16", "int8", True), ("bfloat16", "int4", True), ("bfloat16", "w8a8", True)]


def llama_cpp_runner(gguf, new_tokens: int):
    """A function timing one greedy llama.cpp generation of `new_tokens` (decode tokens/s), or None without
    llama-cpp-python."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)
    prompt = llm.tokenize(PROMPT.encode())

    def run() -> float:
        llm.reset()
        stamps = []
        for _ in llm.generate(prompt, top_k=1, temp=0.0):
            stamps.append(time.perf_counter())
            if len(stamps) == new_tokens:
                break
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    run()
    return run


def paired(runs: dict, rounds: int) -> dict[str, list[float]]:
    """runs: name -> function returning tokens/s, "tinylm" first. Each round runs all of them back to back, the
    order rotating; returns, per other name, tinylm / that system per round."""
    names = list(runs)
    ratios = {name: [] for name in names[1:]}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        speed = {name: runs[name]() for name in order}
        for name in ratios:
            ratios[name].append(speed["tinylm"] / speed[name])
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=None, metavar="W,W",
                        help="only these compiled tinylm configurations, e.g. bfloat16,bfloat16+int4")
    parser.add_argument("--pairs", type=int, default=0, help="rounds of back-to-back runs per configuration")
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
    llama = llama_cpp_runner(gguf, args.new_tokens)
    llama_bf16 = llama and llama_cpp_runner(float_gguf(gguf, Path(tempfile.mkdtemp())), args.new_tokens)
    anchors = {name: max(run() for _ in range(args.repeats)) if run else float("nan")
               for name, run in (("Q4_1 (as stored)", llama), ("BF16 (converted)", llama_bf16))}
    rows, pair_ratios = [], []

    def measure(llm) -> float:
        value = best(lambda: tinylm_decode(llm, prompt_ids, args.new_tokens), args.repeats)[1]
        runs = {"tinylm": lambda: tinylm_decode(llm, prompt_ids, args.new_tokens)[1],
                "transformers": lambda: transformers_decode(model, prompt_ids, args.new_tokens)[1]}
        if llama_bf16:
            runs["llama.cpp bf16"] = llama_bf16
        pair_ratios.append(paired(runs, args.pairs) if args.pairs else {})
        return value

    for row in tinylm_configs(gguf, configs, lambda llm: tinylm_decode(llm, prompt_ids, 8), measure):
        rows.append(row)
        bf16_runs.append(transformers_decode(model, prompt_ids, args.new_tokens)[1])
        pairs = "; ".join(f"vs {name} {' '.join(f'{r:.2f}' for r in rs)}" for name, rs in pair_ratios[-1].items())
        print(f"  {row[0]} {row[1]}: {row[2]:.1f} tok/s, then transformers bf16 {bf16_runs[-1]:.1f}"
              + (f"; round ratios {pairs}" if pairs else ""), flush=True)
    reference["bfloat16"] = max(bf16_runs)
    print(f"transformers bf16 over the run: {min(bf16_runs):.1f} to {reference['bfloat16']:.1f} tok/s "
          f"({len(bf16_runs)} runs); ratios against the best")
    table(reference, anchors, rows, pair_ratios)


def table(reference: dict, anchors: dict, rows: list, pair_ratios: list[dict]) -> None:
    base, anchor = reference["bfloat16"], anchors["Q4_1 (as stored)"]
    paired_names = list(pair_ratios[0]) if pair_ratios else []
    extra = "".join(f" vs {name}, rounds (median, lowest) |" for name in paired_names)
    print(f"| system | weights | decode | tok/s | vs transformers bf16 (best of run) |{extra} vs llama.cpp Q4_1 | "
          "compile s |")
    print("|---|---|---|---:|---:|" + "---:|" * len(paired_names) + "---:|---:|")
    blank = " |" * len(paired_names)
    for dtype, value in reference.items():
        print(f"| transformers | {dtype} | eager | {value:.1f} | {value / base:.2f}x |{blank} {value / anchor:.2f}x | |")
    for weights, value in anchors.items():
        print(f"| llama.cpp | {weights} | native | {value:.1f} | {value / base:.2f}x |{blank} {value / anchor:.2f}x | |")
    for (weights, mode, value, compile_s), ratios in zip(rows, pair_ratios):
        pairs = "".join(f" {statistics.median(r):.2f}x, {min(r):.2f}x |" for r in ratios.values())
        print(f"| tinylm | {weights} | {mode} | {value:.1f} | {value / base:.2f}x |{pairs} {value / anchor:.2f}x | "
              f"{compile_s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
