"""How fast batch-1 decode can stream bf16 weights on this machine: the ceiling behind issue 5 item 1.

    .venv/bin/python benchmarks/gemv_bandwidth.py

One pass = one product with each of the default model's 121 matrices (30 layers x q/k/v fused, o, gate/up fused,
down, plus the 49152 x 576 tied head: 269 MB of bf16), as one decode step does. Printed in GB/s of weights:
- a bare `sum` over 512 MiB of bf16 (what reading memory costs with no product at all);
- `torch.mv` (PyTorch's bf16 GEMV);
- the reduction tinylm's compiled decode uses (tinylm/model/gemv.py), through torch.compile;
- a hand-written AVX-512 GEMV (bf16 widened by a shift, fp32 FMAs, 4 rows x 2 accumulators, OpenMP), built with
  torch's cpp_extension when a compiler and AVX-512 are there: the "write it by hand" alternative;
- tinylm's bf16 kernel (tinylm/kernels/bf16_gemm.cpp: VDPBF16PS, the next rows prefetched), which compiled bf16
  decode calls where it is built.
"""

from __future__ import annotations

import tempfile
import time

import torch

from tinylm.bench.timing import machine_line

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]
KERNEL = r'''
#include <torch/extension.h>
#include <immintrin.h>
// y (N) fp32 = W (N, K) bf16 . x (K) fp32, K a multiple of 32
torch::Tensor gemv(torch::Tensor w, torch::Tensor x) {
  int64_t N = w.size(0), K = w.size(1);
  auto y = torch::empty({N}, torch::kFloat);
  const uint16_t* W = (const uint16_t*)w.data_ptr<at::BFloat16>();
  const float* X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  #pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; n += 4) {
    __m512 acc[4][2];
    for (int r = 0; r < 4; r++) { acc[r][0] = _mm512_setzero_ps(); acc[r][1] = _mm512_setzero_ps(); }
    for (int64_t k = 0; k < K; k += 32) {
      __m512 x0 = _mm512_loadu_ps(X + k), x1 = _mm512_loadu_ps(X + k + 16);
      for (int r = 0; r < 4 && n + r < N; r++) {
        const uint16_t* row = W + (n + r) * K + k;
        _mm_prefetch((const char*)(row + 512), _MM_HINT_T0);
        __m256i b0 = _mm256_loadu_si256((const __m256i*)row), b1 = _mm256_loadu_si256((const __m256i*)(row + 16));
        __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b0), 16));
        __m512 w1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b1), 16));
        acc[r][0] = _mm512_fmadd_ps(w0, x0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(w1, x1, acc[r][1]);
      }
    }
    for (int r = 0; r < 4 && n + r < N; r++) Y[n + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
  }
  return y;
}
'''


def rate(fn, nbytes: int, repeats: int = 10) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return nbytes * repeats / (time.perf_counter() - start) / 1e9


def hand_written():
    """The AVX-512 kernel as a Python function, or None where it cannot be built here."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return None
    from torch.utils.cpp_extension import load_inline

    try:
        return load_inline("tinylm_gemv_bench", cpp_sources=KERNEL, functions=["gemv"],
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                           build_directory=tempfile.mkdtemp()).gemv
    except Exception as exc:  # noqa: BLE001 - no compiler or headers: report the others
        print(f"(hand-written kernel not built: {type(exc).__name__})")
        return None


def main() -> None:
    print(f"machine: {machine_line()}")
    weights = [torch.randn(n, k).bfloat16() for n, k in SHAPES]
    inputs = {k: torch.randn(k) for k in (576, 1536)}
    total = sum(w.numel() * 2 for w in weights)
    block = torch.ones(2**28, dtype=torch.bfloat16)
    rows = [("bare sum over 512 MiB of bf16", rate(block.sum, block.numel() * 2, 5))]
    del block
    rows.append(("torch.mv (bf16)", rate(lambda: [torch.mv(w, inputs[w.shape[1]].bfloat16()) for w in weights], total)))
    # one graph for the whole pass, as in the decode step (a compiled call per matrix would time dynamo instead)
    one_pass = torch.compile(lambda ws, xs: [(xs[w.shape[1]] * w.float()).sum(-1) for w in ws])
    rows.append(("Inductor reduction, one graph (tinylm compiled float32, or no kernel)",
                 rate(lambda: one_pass(weights, inputs), total)))
    kernel = hand_written()
    if kernel is not None:
        rows.append(("hand-written AVX-512 GEMV", rate(lambda: [kernel(w, inputs[w.shape[1]]) for w in weights], total)))
    from tinylm import kernels

    if kernels.bf16_gemm_available():  # what compiled bf16 decode now calls (tinylm/kernels/bf16_gemm.cpp)
        rows_in = {k: x.bfloat16()[None] for k, x in inputs.items()}
        op = torch.ops.tinylm.bf16_gemm
        rows.append(("tinylm's bf16 kernel (prefetching), 1 row",
                     rate(lambda: [op(rows_in[w.shape[1]], w) for w in weights], total)))
    print(f"| read | GB/s ({total / 1e6:.0f} MB of weights per pass) |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value:.1f} |")


if __name__ == "__main__":
    main()
