"""Two tinylm configurations in one process, generate calls alternating: an A/B that the VM's speed drift (10-25%
between minutes) cannot decide, as separate runs can.

    .venv/bin/python benchmarks/ab.py --batch 16 --pairs 8 --a '{"quantize": "w8a8"}' \
        --b '{"quantize": "w8a8", "kv_cache_dtype": "int8"}'
    .venv/bin/python benchmarks/ab.py --batch 1 --pairs 6 --b-inductor '{"cpp_wrapper": false}'

--a / --b: keyword arguments of `tinylm.load` (the default model in bf16, compiled); --b-inductor: Inductor options
B's decode graphs are compiled with on top of tinylm's own (tinylm/engine/compiled.py). Each pair runs A then B
on the same --batch prompts (128 new tokens, greedy); prints each pair's tokens/s, B/A, the median B/A, and how
many leading tokens the two agree on (they differ where B changes arithmetic).
"""

from __future__ import annotations

import argparse
import json
import time

import tinylm
import tinylm.engine.compiled as compiled
from tinylm import hub

from decode import machine
from serve_load import PROMPTS


def load(options: dict, inductor: dict) -> tinylm.LLM:
    own = compiled._inductor_options
    compiled._inductor_options = lambda model: {**own(model), **inductor}
    try:
        start = time.perf_counter()
        llm = tinylm.load(hub.resolve(None), **{"dtype": "bfloat16", "compile": True, **options})
        llm.engine.warmup()
    finally:
        compiled._inductor_options = own
    print(f"{options} {inductor or ''}: ready in {time.perf_counter() - start:.0f} s", flush=True)
    return llm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--a", type=json.loads, default={})
    parser.add_argument("--b", type=json.loads, default={})
    parser.add_argument("--b-inductor", type=json.loads, default={})
    args = parser.parse_args()
    print(f"machine: {machine()}; {args.batch} prompts x 128 new tokens")
    first, second = load(args.a, {}), load(args.b, args.b_inductor)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    params = tinylm.SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)

    def run(llm):
        start = time.perf_counter()
        results = llm.generate(prompts, params)
        return sum(len(r.token_ids) for r in results) / (time.perf_counter() - start), results

    (_, a), (_, b) = run(first), run(second)
    agree = [next((i for i, (x, y) in enumerate(zip(p.token_ids, q.token_ids)) if x != y), len(p.token_ids))
             for p, q in zip(a, b)]
    print(f"leading tokens equal, per prompt: {agree}")
    ratios = []
    for pair in range(args.pairs):
        speed_a, speed_b = run(first)[0], run(second)[0]
        ratios.append(speed_b / speed_a)
        print(f"pair {pair}: A {speed_a:.1f} tok/s, B {speed_b:.1f} tok/s, B/A {ratios[-1]:.3f}", flush=True)
    print(f"median B/A {sorted(ratios)[len(ratios) // 2]:.3f}")


if __name__ == "__main__":
    main()
