// W8A8 products straight from the plain (N, K) int8 weight: decode batches on AVX-512 VNNI, every row count on
// AVX2 CPUs without VNNI (see the AVX2 section below).
//
// x_u8 (M, K) uint8 = int8 activations + 128, weight (N, K) int8 row-major, weight_sums (N,) int32 = each row's
// sum, weight_scales (N,) float32 -> (M, N) float32 = (x_int8 @ weight.T) * weight_scales. Up to 16 rows (decode
// batches) run here; more rows (prefill) go to oneDNN through at::_int_mm.
//
// The 16 lanes of a vector are 16 activation rows (a tile of M), not 16 weight columns: one VPDPBUSD multiplies
// 4 consecutive k of 16 rows (uint8, packed once per call) by the same 4 k of one weight row, broadcast from
// memory. So the weight is read in its stored layout, in order (no second, reordered copy as oneDNN keeps), each
// weight byte feeding 16 multiply-adds. A tile of 16 weight rows keeps 16 accumulators in registers; each holds
// one output column for the 16 rows, transposed through the stack into the row-major output. x + 128 is corrected
// exactly by subtracting 128 * weight_sums[n].
//
// On x86 CPUs without VNNI oneDNN's uint8 x int8 product sums pairs in int16 and saturates (tinylm/quant/
// int8_matmul.py), and `_int_mm` is exact there but runs at well under 1 GMAC/s: the AVX2 section below takes every
// row count instead. Where neither path is built the op refuses (int8_gemm_isa() is 0) and tinylm uses `_int_mm`.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "avx2_int.h"

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define TINYLM_VNNI 1
#elif defined(__AVX2__)
#include <immintrin.h>
#define TINYLM_INT8_AVX2 1
#endif

namespace {

constexpr int64_t kLanes = 16;  // activation rows per tile

// Which path this build has: 0 none, 2 AVX2 (every row count), 3 AVX-512 VNNI (up to 16 rows; more on oneDNN)
int64_t int8_gemm_isa() {
#if defined(TINYLM_VNNI)
  return 3;
#elif defined(TINYLM_INT8_AVX2)
  return 2;
#else
  return 0;
#endif
}

#ifdef TINYLM_VNNI
constexpr int64_t kRows = 16;   // weight rows per tile
constexpr int64_t kPrefetchTiles = 1;  // how far ahead the weight is prefetched

// xt (K/4, 16) int32: for each 4 k, the 4 uint8 of each of the (up to 16) rows; rows past M are 0
void pack_rows(const uint8_t* x, int64_t rows, int64_t k, int32_t* xt) {
  std::memset(xt, 0, sizeof(int32_t) * (k / 4) * kLanes);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t g = 0; g < k / 4; ++g) std::memcpy(&xt[g * kLanes + i], x + i * k + 4 * g, 4);
  }
}

// The 4 weight bytes at p in every lane (compiles to a broadcast load, folded into VPDPBUSD's operand)
inline __m512i broadcast4(const int8_t* p) {
  int32_t quad;
  std::memcpy(&quad, p, 4);
  return _mm512_set1_epi32(quad);
}
#define TINYLM_DP(acc, p) acc = _mm512_dpbusd_epi32(acc, a, broadcast4(p))

// Weight rows [n0, n0 + kRows) against the m (<= 16) activation rows: columns n0.. of out (m, N).
void tile(const int32_t* xt, const int8_t* w, const int32_t* sums, const float* scales, int64_t k, int64_t n,
          int64_t n0, int64_t m, float* out) {
  // 16 named accumulators and 6 row pointers whose offsets are 0, k, 2k, 4k or 8k (x86 scaled-index addressing):
  // with an array of accumulators and one pointer per row, GCC ran out of general registers, spilled the
  // pointers and copied every accumulator at every step (4.8 vs 3.5 ms for the default model's 121 products).
  __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, c8 = c0,
          c9 = c0, c10 = c0, c11 = c0, c12 = c0, c13 = c0, c14 = c0, c15 = c0;
  const int8_t* p0 = w + n0 * k;  // rows 0, 1, 2, 4, 8
  const int8_t* p3 = p0 + 3 * k;  // rows 3, 5, 7, 11
  const int8_t* p6 = p0 + 6 * k;  // rows 6, 10, 14
  const int8_t* p9 = p0 + 9 * k;  // rows 9, 13
  const int8_t* p12 = p0 + 12 * k;
  const int8_t* p15 = p0 + 15 * k;
  const int64_t k2 = 2 * k, k4 = 4 * k, k8 = 8 * k;
  // The next tile's 16 rows are the next 16*K contiguous bytes: one cache line of them per step of 4 k (16K/64 =
  // K/4 lines), so they arrive from memory while this tile computes. Without it the core stalls on every new
  // row (BENCHMARKS.md issue 5); two tiles ahead is slower. Non-temporal: weights are read once per step (w8a8
  // batch 16, hint switched between alternate generate calls of one engine: +2.8% over T0, 6 of 6 pairs).
  const char* next = reinterpret_cast<const char*>(p0 + kPrefetchTiles * kRows * k);
  for (int64_t g = 0; g < k / 4; ++g) {
    _mm_prefetch(next + 64 * g, _MM_HINT_NTA);
    const __m512i a = _mm512_loadu_si512(xt + g * kLanes);
    const int64_t o = 4 * g;
    TINYLM_DP(c0, p0 + o); TINYLM_DP(c1, p0 + k + o); TINYLM_DP(c2, p0 + k2 + o); TINYLM_DP(c4, p0 + k4 + o);
    TINYLM_DP(c8, p0 + k8 + o); TINYLM_DP(c3, p3 + o); TINYLM_DP(c5, p3 + k2 + o); TINYLM_DP(c7, p3 + k4 + o);
    TINYLM_DP(c11, p3 + k8 + o); TINYLM_DP(c6, p6 + o); TINYLM_DP(c10, p6 + k4 + o); TINYLM_DP(c14, p6 + k8 + o);
    TINYLM_DP(c9, p9 + o); TINYLM_DP(c13, p9 + k4 + o); TINYLM_DP(c12, p12 + o); TINYLM_DP(c15, p15 + o);
  }
  const __m512i acc[kRows] = {c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15};
  // lane i of acc[r] is out[i, n0 + r]: the 16 x 16 block is transposed through the stack (L1), so each output
  // row gets one contiguous 16-float store (a scatter straight into the (m, N) output was 1.6x slower overall).
  alignas(64) float block[kRows][kLanes];
  for (int r = 0; r < kRows; ++r) {
    const __m512i exact = _mm512_sub_epi32(acc[r], _mm512_set1_epi32(128 * sums[n0 + r]));
    _mm512_store_ps(block[r], _mm512_mul_ps(_mm512_cvtepi32_ps(exact), _mm512_set1_ps(scales[n0 + r])));
  }
  const __m512i column = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
  for (int64_t i = 0; i < m; ++i) {
    _mm512_storeu_ps(out + i * n + n0, _mm512_i32gather_ps(column, &block[0][i], 4));
  }
}
#undef TINYLM_DP
#endif

#if defined(TINYLM_INT8_AVX2)
// ---- AVX2 (no VNNI): exact int8 sums through VPMADDWD, every row count
//
// Each activation row is widened once to int16 (x_u8 - 128: the signed int8 value), each 16-byte piece of a weight
// row sign-extended to int16 as it is loaded (VPMOVSXBW); VPMADDWD multiplies 16 int16 pairs and adds adjacent
// products into 8 int32 lanes: |a b + c d| <= 2 * 128 * 128, exact, and the lanes' running sums stay exact for K
// up to 2^17. A tile is 3 activation rows x 4 weight rows (12 int32 accumulators in AVX2's 16 registers). The
// weight is read in its stored (N, K) layout. Each output is float(its exact sum) * scale: the same bits as the
// VNNI path and as `torch._int_mm(...).float() * scales`.

constexpr int64_t kStep = 16;       // k per VPMADDWD step
constexpr int64_t kActRows = 3;     // activation rows per tile
constexpr int64_t kWeightRows = 4;  // weight rows per tile
constexpr int64_t kBlockRows = 16;  // weight rows per parallel work item (the op's N is a multiple of 16)

inline __m256i widen(const int8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Activation rows [i0, i0 + R) x weight rows [n0, n0 + C) into out (M, N): x16 (M, K) int16, w (N, K) int8.
template <int R, int C>
void tile_avx2(const int16_t* x16, const int8_t* w, const float* scales, int64_t k, int64_t n, int64_t i0,
               int64_t n0, float* out) {
  __m256i acc[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_si256();
  }
  const int64_t body = k - k % kStep;
  for (int64_t o = 0; o < body; o += kStep) {
    for (int c = 0; c < C; ++c) {
      const __m256i wv = widen(w + (n0 + c) * k + o);
      for (int r = 0; r < R; ++r) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16 + (i0 + r) * k + o));
        acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(xv, wv));
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      int32_t dot = hsum_epi32(acc[r][c]);
      for (int64_t o = body; o < k; ++o) dot += int32_t(x16[(i0 + r) * k + o]) * int32_t(w[(n0 + c) * k + o]);
      out[(i0 + r) * n + n0 + c] = static_cast<float>(dot) * scales[n0 + c];
    }
  }
}

// The m activation rows against weight rows [n0, n0 + 16), 3 x 4 tiles (the last rows as 2 or 1).
void block_avx2(const int16_t* x16, const int8_t* w, const float* scales, int64_t m, int64_t k, int64_t n,
                int64_t n0, float* out) {
  for (int64_t c = n0; c < n0 + kBlockRows; c += kWeightRows) {
    int64_t i = 0;
    for (; i + kActRows <= m; i += kActRows) tile_avx2<kActRows, kWeightRows>(x16, w, scales, k, n, i, c, out);
    if (m - i == 2) tile_avx2<2, kWeightRows>(x16, w, scales, k, n, i, c, out);
    if (m - i == 1) tile_avx2<1, kWeightRows>(x16, w, scales, k, n, i, c, out);
  }
}

void int8_gemm_avx2(const at::Tensor& x_u8, const at::Tensor& weight, const at::Tensor& weight_scales,
                    at::Tensor& out) {
  const int64_t m = x_u8.size(0), k = x_u8.size(1), n = weight.size(0);
  std::vector<int16_t> x16(m * k);  // (M, K) the signed activations
  const uint8_t* xu = x_u8.data_ptr<uint8_t>();
  for (int64_t j = 0; j < m * k; ++j) x16[j] = static_cast<int16_t>(xu[j]) - 128;
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* scales = weight_scales.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  // many rows (prefill): activations in chunks that stay in L2 while every weight block passes over them
  const int64_t chunk = std::max<int64_t>(kActRows, (96 * 1024 / (2 * k)) / kActRows * kActRows);
  at::parallel_for(0, n / kBlockRows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i0 = 0; i0 < m; i0 += chunk) {
      const int64_t rows = std::min(chunk, m - i0);
      for (int64_t block = begin; block < end; ++block) {
        block_avx2(x16.data() + i0 * k, w, scales, rows, k, n, block * kBlockRows, dst + i0 * n);
      }
    }
  });
}
#endif

at::Tensor int8_gemm(const at::Tensor& x_u8, const at::Tensor& weight, const at::Tensor& weight_sums,
                     const at::Tensor& weight_scales) {
  TORCH_CHECK(int8_gemm_isa() != 0, "tinylm::int8_gemm needs AVX-512 VNNI or AVX2");
  TORCH_CHECK(x_u8.dim() == 2 && x_u8.scalar_type() == at::kByte && x_u8.is_contiguous(), "x_u8: contiguous (M, K) uint8");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "weight: contiguous (N, K) int8");
  const int64_t m = x_u8.size(0), k = x_u8.size(1), n = weight.size(0);
  TORCH_CHECK(weight.size(1) == k && k % 4 == 0 && n % 16 == 0, "shapes: K must match and be a multiple of 4, N of 16");
  TORCH_CHECK(weight_sums.numel() == n && weight_sums.scalar_type() == at::kInt && weight_sums.is_contiguous(),
              "weight_sums: (N,) int32");
  TORCH_CHECK(weight_scales.numel() == n && weight_scales.scalar_type() == at::kFloat && weight_scales.is_contiguous(),
              "weight_scales: (N,) float32");
#if defined(TINYLM_INT8_AVX2)
  at::Tensor result = at::empty({m, n}, x_u8.options().dtype(at::kFloat));
  if (m > 0 && n > 0) int8_gemm_avx2(x_u8, weight, weight_scales, result);
  return result;
#else
  if (m > kLanes) {
    // More rows than one tile (prefill): oneDNN's kernel, which reorders the weight per call, is faster there
    // (1.7-2x at 24-512 rows: it reuses each loaded weight vector across rows; this kernel reloads per row).
    return at::_int_mm(x_u8.to(at::kShort).sub(128).to(at::kChar), weight.t()).to(at::kFloat).mul_(weight_scales);
  }
  at::Tensor out = at::empty({m, n}, x_u8.options().dtype(at::kFloat));
#ifdef TINYLM_VNNI
  at::Tensor packed = at::empty({k / 4, kLanes}, x_u8.options().dtype(at::kInt));
  int32_t* xt = packed.data_ptr<int32_t>();
  pack_rows(x_u8.data_ptr<uint8_t>(), m, k, xt);
  const int8_t* w = weight.data_ptr<int8_t>();
  const int32_t* sums = weight_sums.data_ptr<int32_t>();
  const float* scales = weight_scales.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, n / kRows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) tile(xt, w, sums, scales, k, n, block * kRows, m, dst);
  });
#endif
  return out;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinylm, m) {
  m.def("int8_gemm(Tensor x_u8, Tensor weight, Tensor weight_sums, Tensor weight_scales) -> Tensor");
  m.def("int8_gemm_isa() -> int");
}

TORCH_LIBRARY_IMPL(tinylm, CPU, m) { m.impl("int8_gemm", &int8_gemm); }

TORCH_LIBRARY_IMPL(tinylm, CompositeExplicitAutograd, m) { m.impl("int8_gemm_isa", &int8_gemm_isa); }
