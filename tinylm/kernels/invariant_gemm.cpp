// Batch-invariant products: y = x @ weight.T + bias where every output element is computed by the same sequence
// of floating-point operations whatever the number of rows M, whatever the other rows hold, however many threads
// run and however the work is split (issue 21: a token's logits must not depend on what shares its batch).
//
// x (M, K), weight (N, K), bias (N,) or none, float32 or bfloat16 -> (M, N) in x's dtype (as F.linear), computed
// with float32 sums and rounded once at the end. A bfloat16 weight also takes float32 x (half the weight bytes a
// decode step reads, float32 arithmetic): its values widened exactly, so the result is bitwise x @ weight.float().T
// on the float32 path. Element (i, n) is, on every path:
//   1. a vector accumulator of L lanes, zero, takes the K columns in chunks of C (C = L, or 2L with VDPBF16PS)
//      from k = 0 upwards, one multiply-add instruction per chunk; the last K % C columns are zero-filled;
//   2. its L lanes are summed by one fixed tree (the same tree for every lane position of the tile);
//   3. bias[n] is added (one float32 add) and the sum rounded to the output dtype.
// The tile an element sits in (4 weight rows x up to 4 activation rows) only decides which registers hold it: the
// accumulators never mix, and K is never split (parallelism is over output blocks only). Nothing depends on M.
//
// Paths, chosen at compile time for this CPU (results are invariant within one machine's build, not across paths):
//   bfloat16, AMX (Sapphire Rapids and later, when Linux lends the tiles): invariant_amx.h, every row count.
//   bfloat16, AVX-512 BF16: VDPBF16PS, chunks of 32 (lane j adds the products of columns 2j and 2j+1 per chunk).
//   float32 (and bfloat16 without AVX-512 BF16), AVX-512: FMA, chunks of 16 (bf16 widened exactly to float32).
//   elsewhere (AVX2, ARM): the portable path, at::vec::Vectorized<float> FMAs (8 lanes on AVX2).
// tinylm::invariant_linear_on(x, weight, bias, path) runs a named path, so each one's invariance is tested here.
//
// Speed: the weight is read in its stored layout, 4 rows (a tile) at a time, and each tile is multiplied by every
// activation row of a block before the next tile (the tile stays in L1); work units are (chunk of weight tiles,
// block of activation rows), sized so both stay in L2, so at prefill each weight byte comes from memory once. At
// decode (M <= one block) the next tile is prefetched while one computes, as in bf16_gemm.cpp.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "invariant_ops.h"
#include "invariant_tiles.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if defined(TINYLM_INV_AVX512) && defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include "invariant_amx.h"
#define TINYLM_INV_AMX 1
#endif

namespace {

using namespace tinylm_invariant;

// The problem as the kernel sees it: raw pointers (bias float32 or null) and sizes.
template <class Ops, typename Out>
struct Problem {
  const typename Ops::T* x;
  const typename Ops::W* w;
  const float* bias;
  Out* out;
  int64_t m, k, n;
};

#ifdef TINYLM_INV_AVX512
// sums (+ bias, broadcast to each row's 4 lanes) of a full tile row by row: the same adds and rounding as the
// scalar store_tile below, without 16 scalar conversions per tile
inline __m512 with_bias(const float* sums, const float* bias) {
  const __m512 v = _mm512_load_ps(sums);
  return bias == nullptr ? v : _mm512_add_ps(v, _mm512_broadcast_f32x4(_mm_loadu_ps(bias)));
}
inline void store_full(const float* sums, const float* bias, int mb, float* out, int64_t n) {
  alignas(64) float values[kX * kW];
  _mm512_store_ps(values, with_bias(sums, bias));
  for (int i = 0; i < mb; ++i) std::memcpy(out + i * n, values + i * kW, kW * sizeof(float));
}
inline void store_full(const float* sums, const float* bias, int mb, c10::BFloat16* out, int64_t n) {
  alignas(32) uint16_t values[kX * kW];
  _mm256_store_si256(reinterpret_cast<__m256i*>(values), to_bf16_bits(with_bias(sums, bias)));
  for (int i = 0; i < mb; ++i) std::memcpy(out + i * n, values + i * kW, kW * sizeof(uint16_t));
}
#endif

// out rows [i0, i0 + mb) x columns [n0, n0 + cols) from sums (4 activation rows x 4 weight rows); bias added once.
template <class Ops, typename Out>
void store_tile(const Problem<Ops, Out>& p, const float* sums, int64_t i0, int mb, int64_t n0, int cols) {
#ifdef TINYLM_INV_AVX512
  if (cols == kW) return store_full(sums, p.bias == nullptr ? nullptr : p.bias + n0, mb, p.out + i0 * p.n + n0, p.n);
#endif
  for (int i = 0; i < mb; ++i) {
    Out* row = p.out + (i0 + i) * p.n + n0;
    for (int r = 0; r < cols; ++r) {
      const float value = p.bias == nullptr ? sums[i * kW + r] : sums[i * kW + r] + p.bias[n0 + r];
      row[r] = static_cast<Out>(value);  // float32 as is; bfloat16 rounded to nearest even (c10::BFloat16)
    }
  }
}

// bfloat16 bits -> float32, exactly (a bfloat16 is a float32's high half): one weight row of a mixed product
inline void widen_row(const uint16_t* bits, float* out, int64_t k) {
  using Vec = at::vec::Vectorized<float>;
  int64_t j = 0;
  for (; j + Vec::size() <= k; j += Vec::size()) {
    Vec v;
    at::vec::load_fp32_from_bf16(reinterpret_cast<const c10::BFloat16*>(bits + j), v);
    v.store(out + j);
  }
  for (; j < k; ++j) {
    const uint32_t word = static_cast<uint32_t>(bits[j]) << 16;
    std::memcpy(out + j, &word, sizeof(float));
  }
}

// A mixed (float32 x bfloat16) tile facing at least this many activation rows widens its weight rows once into a
// float32 copy (Ops::Base's tiles then run over it); fewer rows, up to a decode batch, widen them in registers at
// every pass (16 rows of 1536 x 576: 246 us in registers, 302 widened once).
constexpr int64_t kWidenRows = 17;

// One weight tile (rows n0 .. n0 + 3; past N the last row again, its sums dropped) against activation rows
// [i_begin, i_end), kTileRows at a time, with Ops over the weight rows wr; the tile stays in L1 meanwhile.
template <class Ops, class P>
void tile_passes(const P& p, const typename Ops::W* const* wr, int64_t n0, int64_t i_begin, int64_t i_end,
                 const char* next) {
  const int cols = static_cast<int>(std::min<int64_t>(kW, p.n - n0));
  alignas(64) float sums[kX * kW];
  for (int64_t i = i_begin, mb = 0; i < i_end; i += mb, next = nullptr) {  // prefetch during the first pass only
    const typename Ops::T* x = p.x + i * p.k;
    mb = std::min<int64_t>(kTileRows<Ops>, i_end - i);
    if (kTileRows<Ops> == 3 && i_end - i == 4) mb = 2;  // 2 + 2 rows, not 3 + a lone row's 4 chains
    switch (mb) {
      case 4: tile<Ops, 4>(wr, x, p.k, next, sums); break;
      case 3: tile<Ops, 3>(wr, x, p.k, next, sums); break;
      case 2: tile<Ops, 2>(wr, x, p.k, next, sums); break;
      default: tile<Ops, 1>(wr, x, p.k, next, sums); break;
    }
    store_tile(p, sums, i, mb, n0, cols);
  }
}

template <class Ops, typename Out>
void tile_rows(const Problem<Ops, Out>& p, int64_t n0, int64_t i_begin, int64_t i_end, const char* next) {
  const typename Ops::W* wr[kW];
  for (int r = 0; r < kW; ++r) wr[r] = p.w + std::min(n0 + r, p.n - 1) * p.k;
  if constexpr (!std::is_same_v<typename Ops::W, typename Ops::T>) {
    if (i_end - i_begin >= kWidenRows) {  // widened once: Base's float32 sequence on the same values, same bits
      using Base = typename Ops::Base;
      thread_local std::vector<float> widened;
      widened.resize(kW * p.k);
      const float* rows[kW];
      for (int r = 0; r < kW; ++r) {
        widen_row(reinterpret_cast<const uint16_t*>(wr[r]), widened.data() + r * p.k, p.k);
        rows[r] = widened.data() + r * p.k;
      }
      return tile_passes<Base>(p, rows, n0, i_begin, i_end, nullptr);
    }
  }
  tile_passes<Ops>(p, wr, n0, i_begin, i_end, next);
}

// Rows per activation block and weight tiles per chunk: ~kBlockBytes each, a multiple of the tile; the chunks are
// also cut small enough that every thread gets some when there is one block (decode). Results do not depend on it.
template <class Ops>
void plan(int64_t m, int64_t k, int64_t n, int64_t* block_rows, int64_t* chunk_tiles) {
  const int64_t row_bytes = std::max<int64_t>(1, k * static_cast<int64_t>(sizeof(typename Ops::T)));
  const int64_t weight_row_bytes = std::max<int64_t>(1, k * static_cast<int64_t>(sizeof(typename Ops::W)));
  *block_rows = std::max<int64_t>(kX, (kBlockBytes / row_bytes) / kX * kX);
  const int64_t tiles = (n + kW - 1) / kW;
  int64_t chunk = std::max<int64_t>(1, kBlockBytes / (weight_row_bytes * kW));
  if (m <= *block_rows) chunk = std::min(chunk, std::max<int64_t>(1, tiles / (4 * at::get_num_threads())));
  *chunk_tiles = chunk;
}

template <class Ops, typename Out>
void run(const Problem<Ops, Out>& p) {
  int64_t block_rows = 0, chunk_tiles = 0;
  plan<Ops>(p.m, p.k, p.n, &block_rows, &chunk_tiles);
  const int64_t tiles = (p.n + kW - 1) / kW;
  const int64_t blocks = (p.m + block_rows - 1) / block_rows, chunks = (tiles + chunk_tiles - 1) / chunk_tiles;
  // unit u = (weight chunk u / blocks, activation block u % blocks): a thread's consecutive units share a chunk
  const int64_t unit_grain = grain(chunk_tiles * kW, std::min(p.m, block_rows), p.k);
  at::parallel_for(0, chunks * blocks, unit_grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t i_begin = (u % blocks) * block_rows, i_end = std::min(p.m, i_begin + block_rows);
      const int64_t t_end = std::min(tiles, (u / blocks + 1) * chunk_tiles);
      for (int64_t t = (u / blocks) * chunk_tiles; t < t_end; ++t) {
        const char* next = t + 1 < tiles ? reinterpret_cast<const char*>(p.w + (t + 1) * kW * p.k) : nullptr;
        tile_rows(p, t * kW, i_begin, i_end, next);
      }
    }
  });
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "tinylm::invariant_linear: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "tinylm::invariant_linear: x (M, K) and weight (N, K)");
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                  (weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kBFloat16),
              "tinylm::invariant_linear: x float32 or bfloat16, weight in x's dtype or bfloat16");
  TORCH_CHECK(weight.size(1) == x.size(1), "tinylm::invariant_linear: weight (N, K) with x's K");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->device().is_cpu() &&
                    (bias->scalar_type() == x.scalar_type() || bias->scalar_type() == at::kFloat),
                "tinylm::invariant_linear: bias (N,) in x's dtype or float32");
  }
}

#ifdef TINYLM_INV_AMX
// out rows [i0, i0 + rows) x columns [n0, n0 + cols), cols <= 32, from one x tile's C of the weight pair: c[0]
// (weight rows n0 .. n0 + 15) and c[1] (the next 16, or null), each 16 weight rows x 16 x rows in float32 (a column
// of C is an output row). Bias added once, rounded as c10 does (to_bf16_bits); a row's 32 outputs are one 64-byte
// store (two half-line stores per row cost ~40% of a 512 x 3072 x 576 product). Rows reach the store by a transpose
// of C, or for a few rows by gathers: the same floats either way, so the bits do not depend on the row count.
constexpr int64_t kGatherRows = 4;  // up to this many rows, gathers beat a 16 x 16 transpose per C tile

template <typename Out>
void store_amx_rows(const float* const* c, const float* bias, int64_t i0, int64_t rows, int64_t n0, int64_t cols,
                    Out* out, int64_t n) {
  const int64_t cols0 = std::min<int64_t>(16, cols), cols1 = c[1] == nullptr ? 0 : cols - cols0;
  const __mmask16 mask0 = static_cast<__mmask16>((1u << cols0) - 1);
  const __mmask16 mask1 = static_cast<__mmask16>((1u << cols1) - 1);
  __m512 r0[16], r1[16], b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
  if (rows <= kGatherRows) {  // a decode step's few rows: gather each one's column of C (the same floats)
    const __m512i column = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
    for (int64_t i = 0; i < rows; ++i) {
      r0[i] = _mm512_i32gather_ps(column, c[0] + i, 4);
      if (cols1 > 0) r1[i] = _mm512_i32gather_ps(column, c[1] + i, 4);
    }
  } else {
    for (int j = 0; j < 16; ++j) r0[j] = _mm512_load_ps(c[0] + 16 * j);
    transpose16(r0);
    if (cols1 > 0) {
      for (int j = 0; j < 16; ++j) r1[j] = _mm512_load_ps(c[1] + 16 * j);
      transpose16(r1);
    }
  }
  if (bias != nullptr) {
    b0 = _mm512_maskz_loadu_ps(mask0, bias + n0);
    if (cols1 > 0) b1 = _mm512_maskz_loadu_ps(mask1, bias + n0 + 16);
  }
  for (int64_t i = 0; i < rows; ++i) {
    Out* row = out + (i0 + i) * n + n0;
    const __m512 v0 = bias == nullptr ? r0[i] : _mm512_add_ps(r0[i], b0);
    const __m512 v1 = cols1 == 0 ? _mm512_setzero_ps() : bias == nullptr ? r1[i] : _mm512_add_ps(r1[i], b1);
    if constexpr (std::is_same_v<Out, float>) {  // float32 logits: the sums as they are
      _mm512_mask_storeu_ps(row, mask0, v0);
      if (cols1 > 0) _mm512_mask_storeu_ps(row + 16, mask1, v1);
    } else {
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16_bits(v0)), to_bf16_bits(v1), 1);
      _mm512_mask_storeu_epi16(row, static_cast<__mmask32>(mask0) | (static_cast<__mmask32>(mask1) << 16), both);
    }
  }
}

// One pair of weight tiles (rows n0 .. n0 + 31) against x tiles [xt_begin, xt_end), two at a time
template <typename Out>
void amx_pair(const Problem<BF16Dot, Out>& p, const uint32_t* packed, int64_t chunks, int64_t n0,
              int64_t xt_begin, int64_t xt_end, std::vector<uint16_t>* copies) {
  using namespace tinylm_amx;
  WeightTile a[2];
  a[0].point(p.w, p.n, p.k, n0, chunks, copies[0]);
  const bool two = n0 + kT < p.n;
  if (two) a[1].point(p.w, p.n, p.k, n0 + kT, chunks, copies[1]);
  const int64_t cols = std::min<int64_t>(2 * kT, p.n - n0);
  alignas(64) float c[4 * 256];
  for (int64_t xt = xt_begin; xt < xt_end; xt += 2) {
    const bool pair = xt + 1 < xt_end;
    const uint32_t* b0 = packed + xt * chunks * 256;
    const uint32_t* b1 = pair ? b0 + chunks * 256 : b0;
    if (two && pair) block<2, 2>(a, b0, b1, chunks, c);
    else if (two) block<2, 1>(a, b0, b1, chunks, c);
    else if (pair) block<1, 2>(a, b0, b1, chunks, c);
    else block<1, 1>(a, b0, b1, chunks, c);
    for (int u = 0; u < (pair ? 2 : 1); ++u) {  // C of (weight tile t, x tile u) at c + (t * 2 + u) * 256
      const int64_t i0 = (xt + u) * kT;
      const float* tiles[2] = {c + u * 256, two ? c + (2 + u) * 256 : nullptr};
      store_amx_rows(tiles, p.bias, i0, std::min<int64_t>(kT, p.m - i0), n0, cols, p.out, p.n);
    }
  }
}

template <typename Out>
void run_amx(const Problem<BF16Dot, Out>& p) {
  using namespace tinylm_amx;
  const int64_t chunks = (p.k + kK - 1) / kK, x_tiles = (p.m + kT - 1) / kT, pairs = (p.n + 2 * kT - 1) / (2 * kT);
  uint32_t* packed = tinylm_amx::packing_buffer(x_tiles * chunks * 256);
  at::parallel_for(0, x_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) pack_rows(p.x, p.m, p.k, b, chunks, packed);
  });
  // x tiles per block and weight pairs per chunk, ~kBlockBytes each (both stay in L2); results do not depend on it
  // ... then evened out, so that the units (weight chunk x activation block) are of one size and there are >= 4 per
  // thread: 512 rows in blocks of 14, 14 and 4 tiles left one thread idle for a quarter of a 576-column product
  const int64_t most_tiles = std::max<int64_t>(2, kBlockBytes / (chunks * kTileBytes) / 2 * 2);
  const int64_t blocks = (x_tiles + most_tiles - 1) / most_tiles;
  const int64_t block_tiles = ((x_tiles + blocks - 1) / blocks + 1) / 2 * 2;
  const int64_t most_pairs = std::max<int64_t>(1, kBlockBytes / (2 * kT * p.k * 2));
  const int64_t wanted_chunks = (4 * at::get_num_threads() + blocks - 1) / blocks;
  const int64_t n_chunks = std::min(pairs, std::max(wanted_chunks, (pairs + most_pairs - 1) / most_pairs));
  const int64_t chunk_pairs = (pairs + n_chunks - 1) / n_chunks;
  const int64_t unit_grain = grain(chunk_pairs * 2 * kT, std::min(p.m, block_tiles * kT), p.k);
  at::parallel_for(0, n_chunks * blocks, unit_grain, [&](int64_t begin, int64_t end) {
    configure();
    std::vector<uint16_t> copies[2];
    for (int64_t u = begin; u < end; ++u) {
      const int64_t xt_begin = (u % blocks) * block_tiles, xt_end = std::min(x_tiles, xt_begin + block_tiles);
      const int64_t pair_end = std::min(pairs, (u / blocks + 1) * chunk_pairs);
      for (int64_t q = (u / blocks) * chunk_pairs; q < pair_end; ++q) {
        amx_pair(p, packed, chunks, q * 2 * kT, xt_begin, xt_end, copies);
      }
    }
    _tile_release();
  });
}
#endif

// The paths this build has ("amx" takes bfloat16 only), fastest first; "auto" is the first that applies
std::vector<std::string> invariant_linear_paths() {
  std::vector<std::string> paths;
#ifdef TINYLM_INV_AMX
  if (tinylm_amx::enabled()) paths.push_back("amx");
#endif
#ifdef TINYLM_INV_AVX512
  paths.push_back("avx512");
#endif
  paths.push_back("portable");
  return paths;
}

template <class Ops, typename Elem, typename Out = Elem, typename WeightElem = Elem>
at::Tensor linear_on(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     bool amx) {
  check_inputs(x, weight, bias);
  // strided inputs are copied: the kernel reads rows of K contiguous elements (same values, same results)
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({x.size(0), weight.size(0)}, x.options().dtype(c10::CppTypeToScalarType<Out>::value));
  if (out.numel() == 0) return out;
  Problem<Ops, Out> p{reinterpret_cast<const typename Ops::T*>(xc.data_ptr<Elem>()),
                      reinterpret_cast<const typename Ops::W*>(wc.data_ptr<WeightElem>()),
                      bc.defined() ? bc.data_ptr<float>() : nullptr, out.data_ptr<Out>(),
                       x.size(0), x.size(1), weight.size(0)};
#ifdef TINYLM_INV_AMX
  if constexpr (std::is_same_v<Ops, BF16Dot>) {
    if (amx) {
      run_amx(p);
      return out;
    }
  }
#endif
  run(p);
  return out;
}

at::Tensor invariant_linear_on(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               c10::string_view path, bool float_out = false) {
  const std::vector<std::string> paths = invariant_linear_paths();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const bool mixed = !bf16 && weight.scalar_type() == at::kBFloat16;  // float32 x, bfloat16 weight
  const std::string chosen = path != "auto" ? std::string(path) : (bf16 || paths[0] != "amx") ? paths[0] : paths[1];
  TORCH_CHECK(std::find(paths.begin(), paths.end(), chosen) != paths.end() && (bf16 || chosen != "amx"),
              "tinylm::invariant_linear: no path '", chosen, "' here for ", x.scalar_type());
  if (chosen == "portable") {
    if (mixed) return linear_on<Portable<float, c10::BFloat16>, float, float, c10::BFloat16>(x, weight, bias, false);
    if (bf16 && float_out) return linear_on<Portable<c10::BFloat16>, c10::BFloat16, float>(x, weight, bias, false);
    if (bf16) return linear_on<Portable<c10::BFloat16>, c10::BFloat16>(x, weight, bias, false);
    return linear_on<Portable<float>, float>(x, weight, bias, false);
  }
#ifdef TINYLM_INV_AVX512
  if (mixed) return linear_on<F32BF16Fma, float, float, c10::BFloat16>(x, weight, bias, false);
  if (!bf16) return linear_on<F32Fma, float>(x, weight, bias, false);
#if defined(__AVX512BF16__)
  if (float_out) return linear_on<BF16Dot, c10::BFloat16, float>(x, weight, bias, chosen == "amx");
  return linear_on<BF16Dot, c10::BFloat16>(x, weight, bias, chosen == "amx");
#else
  if (float_out) return linear_on<BF16Fma, c10::BFloat16, float>(x, weight, bias, false);
  return linear_on<BF16Fma, c10::BFloat16>(x, weight, bias, false);
#endif
#endif
  TORCH_CHECK(false, "unreachable");
}

// float_out: float32 results for bfloat16 inputs (the sums unrounded: an output head's logits, where bfloat16's
// 8-bit mantissa turns near ties into flips)
at::Tensor invariant_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            bool float_out) {
  return invariant_linear_on(x, weight, bias, "auto", float_out);
}

at::Tensor invariant_linear_path(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 c10::string_view path) {
  return invariant_linear_on(x, weight, bias, path, false);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinylm, m) {
  m.def("invariant_linear(Tensor x, Tensor weight, Tensor? bias=None, bool float_out=False) -> Tensor");
  // the same product on a named path ("auto", "amx", "avx512", "portable"): for tests of each path's invariance
  m.def("invariant_linear_on(Tensor x, Tensor weight, Tensor? bias, str path) -> Tensor");
  m.def("invariant_linear_paths() -> str[]");
}

TORCH_LIBRARY_IMPL(tinylm, CPU, m) {
  m.impl("invariant_linear", &invariant_linear);
  m.impl("invariant_linear_on", &invariant_linear_path);
}

TORCH_LIBRARY_IMPL(tinylm, CompositeExplicitAutograd, m) { m.impl("invariant_linear_paths", &invariant_linear_paths); }
