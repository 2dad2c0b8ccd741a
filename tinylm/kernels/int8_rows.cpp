// Weight-only int8 products (per-output-channel scales, float activations): the int4 policy's output head and the
// int8 policy's layers, for any number of rows.
//
// y[m, n] = scale[n] * sum_k x[m, k] * q[n, k], every output element one fixed float32 sequence:
//
//     acc = 16 zero lanes
//     for c in 0 .. K/16 - 1:  acc[j] = fma(x[m, 16c + j], float(q[n, 16c + j]), acc[j])   (j = 0..15)
//     s = ((acc[0:8] + acc[8:16])[0:4] + ...)  a fixed halving tree down to one float, then s * scale[n]
//
// whatever the row count, the blocking or the instruction set, so a row's logits never depend on the batch (issue
// 21), and the AVX-512, AVX2 and scalar paths give the same bits (tests/kernels/test_int8_rows.py). The weight is the
// stored (N, K) int8 matrix itself (the tied head's table is also the embedding: no second copy).
//
// Why: at one row Inductor's reduction over the int8 rows streamed the head's 28 MB at ~13 GB/s (2.2 ms of a
// 5.8 ms int4 decode step of SmolLM2-135M); oneDNN's int8-weight product is slower still at few rows.
//
// Blocking: outputs in tasks of 64 rows of q (36 KB at K = 576: they stay in L1/L2 while every activation row
// passes over them), inside a task 4 outputs x up to 4 activation rows at a time: 16 independent FMA chains, each
// weight vector converted once for the 4 rows.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define TINYLM_INT8_AVX2 1
#endif

#include "fp_contract_off.h"

namespace {

constexpr int64_t kLanes = 16;       // float32 lanes of one accumulator
constexpr int64_t kTaskRows = 64;    // output rows (rows of q) per parallel task
constexpr int64_t kOutputs = 4;      // output rows per inner block
constexpr int64_t kActivations = 4;  // activation rows per inner block

// Software prefetch of the weight this many bytes ahead (the int4 kernel's distance; see int4_gemm.cpp)
#ifndef TINYLM_INT8_AHEAD
#define TINYLM_INT8_AHEAD 4096
#endif

enum Isa : int64_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

int64_t best_isa() {
#if defined(__AVX512F__)
  return kAvx512;
#elif defined(TINYLM_INT8_AVX2)
  return kAvx2;
#else
  return kScalar;
#endif
}

struct Problem {
  const float* x;     // (M, K)
  const int8_t* q;    // (N, K), rows `ldq` apart
  const float* scale; // (N,)
  float* out;         // (M, N)
  int64_t m, n, k, ldq;
};

// ---- scalar: the reference sequence, lane by lane

float reduce_lanes(float* lanes) {  // the halving tree: 16 -> 8 -> 4 -> 2 -> 1
  for (int64_t width = kLanes / 2; width >= 1; width /= 2)
    for (int64_t j = 0; j < width; ++j) lanes[j] = lanes[j] + lanes[j + width];
  return lanes[0];
}

void element_scalar(const Problem& p, int64_t row, int64_t col) {
  float lanes[kLanes] = {};
  const float* x = p.x + row * p.k;
  const int8_t* q = p.q + col * p.ldq;
  for (int64_t c = 0; c < p.k; c += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] = std::fma(x[c + j], static_cast<float>(q[c + j]), lanes[j]);
  p.out[row * p.n + col] = reduce_lanes(lanes) * p.scale[col];
}

void task_scalar(const Problem& p, int64_t begin, int64_t end) {
  for (int64_t row = 0; row < p.m; ++row)
    for (int64_t col = begin; col < end; ++col) element_scalar(p, row, col);
}

// ---- AVX-512: O outputs x R rows of independent accumulators, the same lane-wise FMAs and the same tree

#if defined(__AVX512F__)
inline float reduce_avx512(__m512 acc) {
  const __m256 eight = _mm256_add_ps(_mm512_castps512_ps256(acc),
                                     _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1)));
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));   // lanes 0, 1: four[0] + four[2], four[1] + four[3]
  const __m128 one = _mm_add_ss(two, _mm_shuffle_ps(two, two, 1));  // lane 0: two[0] + two[1]
  return _mm_cvtss_f32(one);
}

inline __m512 weights16(const int8_t* q) {  // 16 int8 -> 16 exact floats
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
}

template <int O, int R>
void block_avx512(const Problem& p, int64_t row0, int64_t col0) {
  __m512 acc[O][R];
  for (int o = 0; o < O; ++o)
    for (int r = 0; r < R; ++r) acc[o][r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < p.k; c += kLanes) {
    if (c % 64 == 0)  // each 64-byte line of the block's weights, TINYLM_INT8_AHEAD bytes on
      for (int o = 0; o < O; ++o)
        _mm_prefetch(reinterpret_cast<const char*>(p.q + (col0 + o) * p.ldq + c + TINYLM_INT8_AHEAD), _MM_HINT_T0);
    __m512 x[R];
    for (int r = 0; r < R; ++r) x[r] = _mm512_loadu_ps(p.x + (row0 + r) * p.k + c);
    for (int o = 0; o < O; ++o) {
      const __m512 w = weights16(p.q + (col0 + o) * p.ldq + c);
      for (int r = 0; r < R; ++r) acc[o][r] = _mm512_fmadd_ps(x[r], w, acc[o][r]);
    }
  }
  for (int o = 0; o < O; ++o)
    for (int r = 0; r < R; ++r)
      p.out[(row0 + r) * p.n + col0 + o] = reduce_avx512(acc[o][r]) * p.scale[col0 + o];
}

template <int O>
void rows_avx512(const Problem& p, int64_t row0, int64_t rows, int64_t col0) {
  switch (rows) {
    case 4: return block_avx512<O, 4>(p, row0, col0);
    case 3: return block_avx512<O, 3>(p, row0, col0);
    case 2: return block_avx512<O, 2>(p, row0, col0);
    default: return block_avx512<O, 1>(p, row0, col0);
  }
}

void task_avx512(const Problem& p, int64_t begin, int64_t end) {
  for (int64_t row = 0; row < p.m; row += kActivations) {
    const int64_t rows = std::min(kActivations, p.m - row);
    int64_t col = begin;
    for (; col + kOutputs <= end; col += kOutputs) rows_avx512<kOutputs>(p, row, rows, col);
    for (; col < end; ++col) rows_avx512<1>(p, row, rows, col);
  }
}
#endif

// ---- AVX2: each 16-lane accumulator as two 8-lane halves (lanes 0-7, 8-15): the same lane-wise FMAs; the tree's
// first step adds the halves, the rest is the AVX-512 reduction's. O outputs x 1 row: 2 * O accumulators, 16
// registers. (The scalar loop took 7.2 ms of a 15 ms int4 decode step for SmolLM2's 49152 x 576 head.)

#if defined(TINYLM_INT8_AVX2)
inline float reduce_avx2(__m256 lo, __m256 hi) {
  const __m256 eight = _mm256_add_ps(lo, hi);  // lanes j + (j + 8)
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  const __m128 one = _mm_add_ss(two, _mm_shuffle_ps(two, two, 1));
  return _mm_cvtss_f32(one);
}

inline __m256 weights8(const int8_t* q) {  // 8 int8 -> 8 exact floats
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}

template <int O>
void block_avx2(const Problem& p, int64_t row, int64_t col0) {
  __m256 lo[O], hi[O];
  for (int o = 0; o < O; ++o) lo[o] = hi[o] = _mm256_setzero_ps();
  const float* x = p.x + row * p.k;
  for (int64_t c = 0; c < p.k; c += kLanes) {
    if (c % 64 == 0)
      for (int o = 0; o < O; ++o)
        _mm_prefetch(reinterpret_cast<const char*>(p.q + (col0 + o) * p.ldq + c + TINYLM_INT8_AHEAD), _MM_HINT_T0);
    const __m256 x_lo = _mm256_loadu_ps(x + c), x_hi = _mm256_loadu_ps(x + c + 8);
    for (int o = 0; o < O; ++o) {
      const int8_t* q = p.q + (col0 + o) * p.ldq + c;
      lo[o] = _mm256_fmadd_ps(x_lo, weights8(q), lo[o]);
      hi[o] = _mm256_fmadd_ps(x_hi, weights8(q + 8), hi[o]);
    }
  }
  for (int o = 0; o < O; ++o) p.out[row * p.n + col0 + o] = reduce_avx2(lo[o], hi[o]) * p.scale[col0 + o];
}

void task_avx2(const Problem& p, int64_t begin, int64_t end) {
  for (int64_t row = 0; row < p.m; ++row) {
    int64_t col = begin;
    for (; col + kOutputs <= end; col += kOutputs) block_avx2<kOutputs>(p, row, col);
    for (; col < end; ++col) block_avx2<1>(p, row, col);
  }
}
#endif

void check_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous (M, K) float32");
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar && qweight.stride(1) == 1,
              "qweight: (N, K) int8 with contiguous rows");
  TORCH_CHECK(scales.dim() == 1 && scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.size(0) == qweight.size(0),
              "scales: contiguous (N,) float32");
  TORCH_CHECK(qweight.size(1) == x.size(1) && x.size(1) % kLanes == 0, "shapes: K a multiple of 16 in x and qweight");
  TORCH_CHECK(isa == kAuto || isa == kScalar || isa == best_isa(),
              "isa: 0 (best), 1 (scalar), 2 (AVX2), 3 (AVX-512), up to ",
              best_isa(), " here");
}

// x (M, K) float32, qweight (N, K) int8, scales (N,) float32 -> (M, N) float32.
at::Tensor int8_rows(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t isa) {
  check_args(x, qweight, scales, isa);
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0);
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  const Problem p{x.data_ptr<float>(), qweight.data_ptr<int8_t>(), scales.data_ptr<float>(), out.data_ptr<float>(),
                  m, n, k, qweight.stride(0)};
  [[maybe_unused]] const bool vector = (isa == kAuto ? best_isa() : isa) != kScalar;
  const int64_t tasks = (n + kTaskRows - 1) / kTaskRows;
  at::parallel_for(0, tasks, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const int64_t begin = t * kTaskRows, end = std::min(n, begin + kTaskRows);
#if defined(__AVX512F__)
      if (vector) {
        task_avx512(p, begin, end);
        continue;
      }
#elif defined(TINYLM_INT8_AVX2)
      if (vector) {
        task_avx2(p, begin, end);
        continue;
      }
#endif
      task_scalar(p, begin, end);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinylm, m) { m.def("int8_rows(Tensor x, Tensor qweight, Tensor scales, int isa=0) -> Tensor"); }

TORCH_LIBRARY_IMPL(tinylm, CPU, m) { m.impl("int8_rows", &int8_rows); }
