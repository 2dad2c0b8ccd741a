"""What batch-invariant attention costs (issue 21): tinylm::invariant_attention against today's decode kernel
(tinylm::paged_attention) and against prefill's SDPA, one layer of the default model's shapes (SmolLM2-135M:
9 query heads, 3 K/V heads, head size 64; 30 such layers per token).

    .venv/bin/python benchmarks/invariant_attention.py [--dtype bf16|float32|int8] [--threads 1 2]

Decode: batch 1 (150 keys) and batch 16 (60-300 keys, right-aligned as the engine gathers them). Prefill: one
prompt of T tokens scored at once: SDPA (causal) on the K/V gathered from the pool, as the engine's prefill runs
today, against the invariant kernel reading the pool (q cast to float32 and back included on both sides' terms).
Best of N repetitions, in microseconds per layer.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from tinylm import kernels
from tinylm.bench.timing import machine_line
from tinylm.engine.kv_pool import quantize_rows

HEADS, KV_HEADS, DIM, SLOTS = 9, 3, 64, 65536


def best(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e6


def pools(dtype: str):
    """(k, v, k_scales, v_scales) in the pool's storage, and the model dtype queries arrive in."""
    k, v = torch.randn(SLOTS, KV_HEADS, DIM), torch.randn(SLOTS, KV_HEADS, DIM)
    if dtype == "int8":
        (k, ks), (v, vs) = quantize_rows(k), quantize_rows(v)
        return (k, v, ks, vs), torch.bfloat16
    model = torch.bfloat16 if dtype == "bf16" else torch.float32
    return (k.to(model), v.to(model), None, None), model


def decode(pool, batch: int, reps: int) -> tuple[float, float]:
    lengths = [150] if batch == 1 else torch.randint(60, 300, (batch,), generator=torch.Generator().manual_seed(0))
    lengths = [int(n) for n in lengths]
    width = max(lengths)
    order = torch.randperm(SLOTS - 64)[:sum(lengths)] + 64
    slots = torch.zeros(batch, width, dtype=torch.long)
    valid = torch.zeros(batch, width, dtype=torch.bool)
    for b, (n, first) in enumerate(zip(lengths, torch.tensor([0, *lengths]).cumsum(0).tolist())):
        slots[b, width - n:], valid[b, width - n:] = order[first:first + n], True
    q = torch.randn(batch, HEADS, DIM)
    rows = torch.arange(batch)
    starts, ends = width - valid.sum(1), torch.full_like(rows, width)
    mask = None if batch == 1 else valid
    today = best(lambda: torch.ops.tinylm.paged_attention(q, pool[0], pool[1], slots, mask, DIM ** -0.5,
                                                          pool[2], pool[3]), reps)
    invariant = best(lambda: torch.ops.tinylm.invariant_attention(q, pool[0], pool[1], slots, rows, starts, ends,
                                                                  DIM ** -0.5, pool[2], pool[3]), reps)
    return today, invariant


def prefill(pool, model_dtype, steps: int, reps: int) -> tuple[float, float]:
    slots = (torch.randperm(SLOTS - 64)[:steps] + 64)[None]
    q = torch.randn(1, HEADS, steps, DIM).to(model_dtype)
    rows, starts, ends = torch.zeros(steps, dtype=torch.long), torch.zeros(steps, dtype=torch.long), None
    ends = torch.arange(1, steps + 1)

    def gathered(flat, scales):  # the engine's prefill path: rows gathered (dequantized) for SDPA
        rows_ = flat.index_select(0, slots[0])
        if scales is not None:
            rows_ = (rows_.float() * scales.index_select(0, slots[0])[..., None]).to(model_dtype)
        return rows_.view(1, steps, KV_HEADS, DIM).transpose(1, 2)

    def sdpa():
        return F.scaled_dot_product_attention(q, gathered(pool[0], pool[2]), gathered(pool[1], pool[3]),
                                              is_causal=True, enable_gqa=True)

    def invariant():
        rows_q = q.transpose(1, 2).reshape(steps, HEADS, DIM).float().contiguous()
        out = torch.ops.tinylm.invariant_attention(rows_q, pool[0], pool[1], slots, rows, starts, ends,
                                                   DIM ** -0.5, pool[2], pool[3])
        return out.to(model_dtype)

    return best(sdpa, reps), best(invariant, reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "float32", "int8"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("tinylm's kernels could not be built here")
    print(machine_line())
    pool, model_dtype = pools(args.dtype)
    for threads in dict.fromkeys(args.threads):
        torch.set_num_threads(threads)
        for batch in (1, 16):
            today, invariant = decode(pool, batch, args.reps)
            print(f"{args.dtype} threads {threads} decode batch {batch:2d}: paged_attention {today:8.1f} us, "
                  f"invariant {invariant:8.1f} us ({invariant / today:.2f}x)")
        for steps in (128, 512, 2048):
            sdpa, invariant = prefill(pool, model_dtype, steps, max(3, args.reps // (steps // 128)))
            print(f"{args.dtype} threads {threads} prefill T={steps:4d}: SDPA {sdpa:9.1f} us, invariant "
                  f"{invariant:9.1f} us ({invariant / sdpa:.2f}x), x30 layers: +{(invariant - sdpa) * 30 / 1e3:.1f} ms")


if __name__ == "__main__":
    main()
