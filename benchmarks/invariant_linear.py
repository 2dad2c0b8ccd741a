"""torch.ops.tinylm.invariant_linear (batch-invariant products, tinylm/kernels/invariant_gemm.cpp) against F.linear
on the default model's shapes, at 1, 16 and 512 rows; markdown rows of BENCHMARKS.md's table.

    .venv/bin/python benchmarks/invariant_linear.py [THREADS]
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from tinylm import kernels

SHAPES = ((1536, 576), (576, 1536), (49152, 576))  # SmolLM2-135M: gate/up, down, the output head


def best_ms(fn, reps: int) -> float:
    fn()
    runs = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        runs.append((time.perf_counter() - start) / reps * 1e3)
    return min(runs)


def main() -> None:
    assert kernels.available(), "tinylm's kernels could not be built here"
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
    print(f"threads {torch.get_num_threads()}, paths {torch.ops.tinylm.invariant_linear_paths()}")
    print("| dtype | weight (N x K) | rows | invariant ms | F.linear ms | ratio |")
    for dtype in (torch.bfloat16, torch.float32):
        for n, k in SHAPES:
            weight = torch.randn(n, k).to(dtype)
            for rows in (1, 16, 512):
                x = torch.randn(rows, k).to(dtype)
                reps = max(2, int(2e7 / (rows * n * k)))
                ours = best_ms(lambda: torch.ops.tinylm.invariant_linear(x, weight), reps)
                theirs = best_ms(lambda: F.linear(x, weight), reps)
                print(f"| {str(dtype)[6:]} | {n} x {k} | {rows} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f} |")


if __name__ == "__main__":
    main()
