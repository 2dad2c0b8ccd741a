// bf16 products for a few rows at a time (decode batches, speculative verification) on AVX-512 BF16.
//
// x (M, K) bf16, weight (N, K) bf16 row-major -> (M, N) float32 = x @ weight.T, float32 sums of exact bf16
// products (VDPBF16PS). Up to 16 rows run here; more rows (prefill) go to at::mm.
//
// Why: at 2-16 rows a decode step is still a stream over every weight, but PyTorch's bf16 GEMM reads the default
// model's weights at 15-20 GB/s there (against ~45 for the batch-1 reduction, tinylm/model/gemv.py), so a batch
// of 4 rows cost 2.3 batch-1 steps. Here each 64-byte piece of a weight row is loaded once and multiplied, in
// registers, with the same piece of every activation row (M VDPBF16PS per 32 weights), 4 weight rows at a time:
// the weight is read once, in its stored layout. While a block of 4 rows computes, the next block (the next 8K
// contiguous bytes) is prefetched, 4 lines per step: without it the core waits on memory and computes in turn
// (the default model's 121 products at 5 rows: 8.3 -> 5.9 ms, at 8 rows 11.8 -> 6.7, at 16 13.1 -> 9.4).
//
// Without AVX-512 BF16 the op computes the same product with at::mm (bf16_gemm_available() says which).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define TINYLM_BF16 1
#endif

namespace {

constexpr int64_t kMaxRows = 16;  // activation rows handled here

bool bf16_gemm_available() {
#ifdef TINYLM_BF16
  return true;
#else
  return false;
#endif
}

#ifdef TINYLM_BF16
constexpr int kRows = 4;  // weight rows per tile
constexpr int kCols = 4;  // activation rows per pass over the tile

// Lane i of the result is the sum of the 16 lanes of v[i]: a transpose-and-add tree (45 instructions for 16 sums,
// against ~150 for 16 separate horizontal reductions, which cost a third of the multiply-adds at K = 576).
inline __m512 sum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  #pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: (v0+v2, w0+w2, v1+v3, w1+w3) of the pair (v, w)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  #pragma GCC unroll 8
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: one partial sum of each of 4 vectors, in order
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
    b[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  #pragma GCC unroll 8
  for (int i = 0; i < 2; ++i) {  // add 128-bit lanes pairwise: (b0 lanes 0+1, 2+3, b1 lanes 0+1, 2+3)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

// out[i, n0 + r] for the kRows weight rows at w and MB (<= kCols) activation rows at x (stride k); K % 32 = tail;
// next: the following row block, to prefetch (nullptr on later passes over the same block).
template <int MB>
void tile(const uint16_t* w, const uint16_t* x, int64_t k, int64_t n, int64_t n0, float* out, __mmask32 tail,
          const char* next) {
  __m512 acc[kCols][kRows];
  #pragma GCC unroll 8
  for (int i = 0; i < kCols; ++i)
    #pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) acc[i][r] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= k; c += 32) {
    if (next != nullptr) {  // the next 4 weight rows (8K bytes, contiguous): 4 of their lines per 4 x 64 bytes read
      // Non-temporal (prefetchnta): weights are read once per step, and lines fetched so do not displace the
      // cache's other contents (activations, K/V, later-reused data). One engine, hint switched between alternate
      // generate calls: bf16 decode +5.5% at batch 1 (9 of 10 pairs) and at batch 16 (6 of 6) over the T0 hint.
      const char* line = next + 4 * 2 * c;
      __builtin_prefetch(line, 0, 0);
      __builtin_prefetch(line + 64, 0, 0);
      __builtin_prefetch(line + 128, 0, 0);
      __builtin_prefetch(line + 192, 0, 0);
    }
    __m512bh wv[kRows];
    #pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w + r * k + c);
    #pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * k + c);
      #pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], wv[r], xv);
    }
  }
  if (c < k) {  // the last K % 32 columns, zero-filled (0 * 0 adds nothing)
    __m512bh wv[kRows];
    #pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + r * k + c);
    #pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + i * k + c);
      #pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], wv[r], xv);
    }
  }
  alignas(64) float sums[16];  // lanes 4i .. 4i+3: out[i, n0 .. n0+3]
  _mm512_store_ps(sums, sum16(&acc[0][0]));
  #pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) _mm_storeu_ps(out + i * n + n0, _mm_load_ps(sums + 4 * i));
}

// Every row block of 4 weight rows against all m activation rows, 4 at a time (the block stays in L1 meanwhile).
void rows_block(const uint16_t* w, const uint16_t* x, int64_t m, int64_t k, int64_t n, int64_t n0, float* out,
                __mmask32 tail) {
  const uint16_t* rows = w + n0 * k;
  int64_t i = 0;
  const char* next = reinterpret_cast<const char*>(rows + kRows * k);
  for (; i + kCols <= m; i += kCols) tile<kCols>(rows, x + i * k, k, n, n0, out + i * n, tail, i ? nullptr : next);
  next = i ? nullptr : next;
  switch (m - i) {
    case 3: tile<3>(rows, x + i * k, k, n, n0, out + i * n, tail, next); break;
    case 2: tile<2>(rows, x + i * k, k, n, n0, out + i * n, tail, next); break;
    case 1: tile<1>(rows, x + i * k, k, n, n0, out + i * n, tail, next); break;
    default: break;
  }
}
#endif

at::Tensor bf16_gemm(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x: (M, K) bfloat16");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.size(1) == x.size(1),
              "weight: (N, K) bfloat16 with x's K");
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  if (!bf16_gemm_available() || m > kMaxRows || n % 4 != 0 || !weight.is_contiguous()) {
    return at::mm(x, weight.t()).to(at::kFloat);
  }
  at::Tensor out = at::empty({m, n}, x.options().dtype(at::kFloat));
#ifdef TINYLM_BF16
  const at::Tensor xc = x.contiguous();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  float* dst = out.data_ptr<float>();
  const __mmask32 tail = static_cast<__mmask32>((1ull << (k % 32)) - 1);
  at::parallel_for(0, n / kRows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) rows_block(wp, xp, m, k, n, block * kRows, dst, tail);
  });
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinylm, m) {
  m.def("bf16_gemm(Tensor x, Tensor weight) -> Tensor");
  m.def("bf16_gemm_available() -> bool");
}

TORCH_LIBRARY_IMPL(tinylm, CPU, m) { m.impl("bf16_gemm", &bf16_gemm); }

TORCH_LIBRARY_IMPL(tinylm, CompositeExplicitAutograd, m) { m.impl("bf16_gemm_available", &bf16_gemm_available); }
