// Batch-invariant products on GGUF block weights, exact: y = x @ W.T + bias for float32 x (M, K), where W is a
// GGUF weight kept as blocks of 32 columns (tinylm/weights/gguf_blocks.py puts Q4_0 / Q4_1 / Q4_K / Q5_x / Q5_K /
// Q6_K / Q8_0 in these forms) and widened inside the product to exactly the float32 values gguf-py's
// dequantization gives (and tinylm's float32 load holds):
//   4 bits: codes (N, K / 2) uint8, per 32-column block 16 bytes, byte j = q_j (low nibble) | q_j+16 (high);
//           scales, mins (N, K / 32) float32: w = d * q + m (Q4_0: m = -8 d), one fma: d * q is exact in float32
//           (d has at most 17 significant bits, q 4), so fma(q, d, m) rounds once, as (d * q) + m does.
//   8 bits: codes (N, K) int8, scales (N, K / 32) float32: w = d * q (exact for Q8_0 and Q5_0), or with mins
//           (N, K / 32) w = fma(q, d, m) (Q5_1, Q5_K: d * q exact, one rounding), or with scales per 16 columns
//           (N, K / 16) w = d * q rounded once (Q6_K: gguf-py's (d * sc) * q).
// Every output element is then computed by the sequence of invariant_gemm.cpp's float32 path on this CPU (the same
// Ops: chunks of Ops::kChunk columns from k = 0, one multiply-add each, the fixed lane tree, the bias added once),
// so y is bitwise tinylm::invariant_linear(x, W as float32, bias) whatever the batch: a decode step reads ~0.75
// (4 bits) or ~1.1-1.25 (8 bits) bytes a weight instead of 4 (float32) or 2 (bfloat16), and the model stays the
// file's.
//
// One row (a decode step) widens each 32-column block in registers as it goes; more rows widen a 4-row weight tile
// once into a float32 copy in L1 and run the float32 tiles over it (the same values, so the same bits).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "invariant_ops.h"

#include "fp_contract_off.h"
#include "invariant_tiles.h"

namespace {

using namespace tinylm_invariant;

#ifdef TINYLM_INV_AVX512
using Ops = F32Fma;  // the float32 path invariant_linear takes on this CPU ("auto")
#else
using Ops = Portable<float>;
#endif
using In = Ops::In;
constexpr int kC = Ops::kChunk;  // 8 (AVX2) or 16 (AVX-512) columns a chunk; divides the 32 of a block
constexpr int64_t kBlock = 32;
constexpr int kChunks = kBlock / kC;  // chunks a block

// The forms a weight's blocks take (a template parameter: a run-time branch in the widening halved its speed):
// 4-bit codes with mins (kQ4), 8-bit codes (kQ8), 8-bit with mins (kQ8Mins), 8-bit with a scale per 16 columns
// (kQ8Halves).
enum Form { kQ4, kQ8, kQ8Mins, kQ8Halves };

template <Form F>
constexpr bool kHasMins = F == kQ4 || F == kQ8Mins;
template <Form F>
constexpr int64_t kScalesPerBlock = F == kQ8Halves ? 2 : 1;
template <Form F>
constexpr int64_t kBlockCodes = F == kQ4 ? kBlock / 2 : kBlock;  // code bytes a block

struct Weight {
  const uint8_t* codes;  // (N, row_bytes)
  const float* scales;   // (N, G * scales per block)
  const float* mins;     // (N, G) or null
  int64_t n, k, groups, row_bytes;
};

inline In splat(float v) {
#if defined(TINYLM_INV_AVX512)
  return _mm512_set1_ps(v);
#else
  return In(v);
#endif
}

inline In mul(In a, In b) {
#if defined(TINYLM_INV_AVX512)
  return _mm512_mul_ps(a, b);
#else
  return a * b;
#endif
}

// 8-bit codes j * kC .. j * kC + kC - 1 of block b as float32 (exact integers)
inline In codes_to_float(const uint8_t* codes, int64_t b, int j) {
  const uint8_t* p = codes + b * kBlock + j * kC;
#if defined(TINYLM_INV_AVX512)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  return In(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
#else
  alignas(64) float values[kC];
  for (int col = 0; col < kC; ++col) values[col] = static_cast<float>(static_cast<int8_t>(p[col]));
  return Ops::load(values);
#endif
}

// Block b of one weight row as kChunks vectors of float32, exactly the dequantized values. codes: the row's codes,
// scales / mins: the row's scales and mins (mins unused without them).
template <Form F>
inline void decode_block(const uint8_t* codes, const float* scales, const float* mins, int64_t b, In* out) {
  if constexpr (F != kQ4) {  // one multiply (or fma) of the widened codes per chunk
    for (int j = 0; j < kChunks; ++j) {
      const In q = codes_to_float(codes, b, j);
      if constexpr (F == kQ8Halves) {  // chunk j's columns: the block's first or second 16 (kC divides 16)
        out[j] = mul(q, splat(scales[2 * b + j * kC / 16]));
      } else if constexpr (F == kQ8Mins) {
        out[j] = Ops::madd(splat(mins[b]), q, splat(scales[b]));  // fma(q, d, m)
      } else {
        out[j] = mul(q, splat(scales[b]));
      }
    }
    return;
  }
  const float d = scales[b];
#if defined(TINYLM_INV_AVX512)
  const __m512i raw = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + b * 16)));
  const __m512 dv = _mm512_set1_ps(d), mv = _mm512_set1_ps(mins[b]);
  out[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(raw, _mm512_set1_epi32(0xF))), dv, mv);
  out[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(raw, 4)), dv, mv);
#elif defined(__AVX2__)
  // bytes 0-7 hold columns 0-7 (low) and 16-23 (high), bytes 8-15 columns 8-15, 24-31
  const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + b * 16)));
  const __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + b * 16 + 8)));
  const __m256i mask = _mm256_set1_epi32(0xF);
  const __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(mins[b]);
  out[0] = In(_mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(lo, mask)), dv, mv));
  out[1] = In(_mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(hi, mask)), dv, mv));
  out[2] = In(_mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 4)), dv, mv));
  out[3] = In(_mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 4)), dv, mv));
#else
  alignas(64) float values[kBlock];
  for (int col = 0; col < kBlock; ++col) {
    const int q = col < 16 ? (codes[b * 16 + col] & 0xF) : (codes[b * 16 + col - 16] >> 4);
    values[col] = std::fma(static_cast<float>(q), d, mins[b]);
  }
  for (int j = 0; j < kChunks; ++j) out[j] = Ops::load(values + j * kC);
#endif
}

inline void store(const In& v, float* p) {
#if defined(TINYLM_INV_AVX512)
  _mm512_storeu_ps(p, v);
#else
  v.store(p);
#endif
}

// Row r of the weight, dequantized (the widened copy many-row tiles run over)
template <Form F>
void widen_row(const Weight& w, int64_t r, float* out) {
  const uint8_t* codes = w.codes + r * w.row_bytes;
  const float* scales = w.scales + r * w.groups * kScalesPerBlock<F>;
  const float* mins = kHasMins<F> ? w.mins + r * w.groups : nullptr;
  In v[kChunks];
  for (int64_t b = 0; b < w.groups; ++b) {
    decode_block<F>(codes, scales, mins, b, v);
    for (int j = 0; j < kChunks; ++j) store(v[j], out + b * kBlock + j * kC);
  }
}

// sums[i * kW + r] = dot(x row i, weight row n0 + r) for MB activation rows (stride k), blocks widened in
// registers (again for every pass over a few rows: a decode batch). Each output element is one chain of dependent
// multiply-adds (its sequence is fixed), so the rows of a tile are what runs in parallel. With `prefetch`, the next
// tile's codes and scales are fetched meanwhile (as invariant_gemm.cpp's prefetch_step: block b's step fetches
// the next tile's bytes at kW * b blocks, so all have arrived when the loop ends).
template <Form F, int MB>
void rows_in_registers(const Weight& w, const float* x, int64_t n0, bool prefetch, float* sums) {
  constexpr int64_t kScales = kScalesPerBlock<F>;
  const uint8_t* codes[kW];
  const float* scales[kW];
  const float* mins[kW];
  for (int r = 0; r < kW; ++r) {
    const int64_t row = std::min(n0 + r, w.n - 1);  // past N: the last row again, its sums dropped
    codes[r] = w.codes + row * w.row_bytes;
    scales[r] = w.scales + row * w.groups * kScales;
    mins[r] = kHasMins<F> ? w.mins + row * w.groups : nullptr;
  }
  constexpr int64_t kCodes = kBlockCodes<F>;
  const bool more = prefetch && n0 + kW < w.n;
  const char* next = more ? reinterpret_cast<const char*>(w.codes + (n0 + kW) * w.row_bytes) : nullptr;
  if (more) {
    const char* next_scales = reinterpret_cast<const char*>(w.scales + (n0 + kW) * w.groups * kScales);
    for (int64_t byte = 0; byte < kW * w.groups * kScales * 4; byte += 64) __builtin_prefetch(next_scales + byte, 0, 3);
    if constexpr (kHasMins<F>) {
      for (int64_t byte = 0; byte < kW * w.groups * 4; byte += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(w.mins + (n0 + kW) * w.groups) + byte, 0, 3);
      }
    }
  }
  Ops::Acc acc[MB * kW];
  for (int a = 0; a < MB * kW; ++a) acc[a] = Ops::zero();
  for (int64_t b = 0; b < w.groups; ++b) {
    if (next != nullptr) {
      #pragma GCC unroll 2
      for (int64_t byte = 0; byte < kW * kCodes; byte += 64) {
        __builtin_prefetch(next + b * kW * kCodes + byte, 0, 3);
      }
    }
    #pragma GCC unroll 4
    for (int r = 0; r < kW; ++r) {
      In wv[kChunks];
      decode_block<F>(codes[r], scales[r], mins[r], b, wv);
      #pragma GCC unroll 4
      for (int j = 0; j < kChunks; ++j) {
        #pragma GCC unroll 3
        for (int i = 0; i < MB; ++i) {
          acc[i * kW + r] = Ops::madd(acc[i * kW + r], wv[j], Ops::load(x + i * w.k + b * kBlock + j * kC));
        }
      }
    }
  }
  Ops::reduce(acc, sums, MB * kW);
}

// Rows of a many-row block meet a weight tile widened once into float32 (the same values as in registers).
constexpr int64_t kWidenRows = 17;

// out rows [i, i + mb) x columns [n0, n0 + cols) = sums + bias
inline void store_rows(const float* sums, const float* bias, int64_t i, int64_t mb, int64_t n0, int64_t cols,
                       float* out, int64_t n) {
  for (int64_t a = 0; a < mb; ++a) {
    float* row = out + (i + a) * n + n0;
    for (int r = 0; r < cols; ++r) row[r] = bias == nullptr ? sums[a * kW + r] : sums[a * kW + r] + bias[n0 + r];
  }
}

// Activation rows [i_begin, i_end) against weight tile n0 (4 rows), a few rows at a time
template <Form F>
void tile_rows(const Weight& w, const float* x, const float* bias, int64_t n0, int64_t i_begin, int64_t i_end,
               float* out) {
  const int64_t cols = std::min<int64_t>(kW, w.n - n0);
  constexpr int kRows = kTileRows<Ops>;
  alignas(64) float sums[kX * kW];
  if (i_end - i_begin < kWidenRows) {
    for (int64_t i = i_begin, mb = 0; i < i_end; i += mb) {
      mb = std::min<int64_t>(kRows, i_end - i);
      if (kRows == 3 && i_end - i == 4) mb = 2;  // 2 + 2 rows, not 3 + a lone row
      const float* rows = x + i * w.k;
      const bool first = i == i_begin;
      switch (mb) {
        case 4: rows_in_registers<F, 4>(w, rows, n0, first, sums); break;
        case 3: rows_in_registers<F, 3>(w, rows, n0, first, sums); break;
        case 2: rows_in_registers<F, 2>(w, rows, n0, first, sums); break;
        default: rows_in_registers<F, 1>(w, rows, n0, first, sums); break;
      }
      store_rows(sums, bias, i, mb, n0, cols, out, w.n);
    }
    return;
  }
  thread_local std::vector<float> widened;
  widened.resize(kW * w.k);
  const float* wr[kW];
  for (int r = 0; r < kW; ++r) {
    widen_row<F>(w, std::min(n0 + r, w.n - 1), widened.data() + r * w.k);
    wr[r] = widened.data() + r * w.k;
  }
  for (int64_t i = i_begin, mb = 0; i < i_end; i += mb) {
    mb = std::min<int64_t>(kRows, i_end - i);
    const float* rows = x + i * w.k;
    switch (mb) {  // invariant_gemm.cpp's float32 tiles
      case 4: tile<Ops, 4>(wr, rows, w.k, nullptr, sums); break;
      case 3: tile<Ops, 3>(wr, rows, w.k, nullptr, sums); break;
      case 2: tile<Ops, 2>(wr, rows, w.k, nullptr, sums); break;
      default: tile<Ops, 1>(wr, rows, w.k, nullptr, sums); break;
    }
    store_rows(sums, bias, i, mb, n0, cols, out, w.n);
  }
}

template <Form F>
void run(const Weight& w, const float* x, const float* bias, float* out, int64_t m) {
  const int64_t tiles = (w.n + kW - 1) / kW;
  const int64_t block_rows = std::max<int64_t>(kX, kBlockBytes / (w.k * 4) / kX * kX);
  const int64_t blocks = (m + block_rows - 1) / block_rows;
  // weight tiles per unit: ~4 units a thread when there is one activation block (decode), ~L2's worth otherwise
  const int64_t most = std::max<int64_t>(1, kBlockBytes / (kW * w.row_bytes));
  const int64_t chunk_tiles = blocks == 1 ? std::min(most, std::max<int64_t>(1, tiles / (4 * at::get_num_threads())))
                                          : most;
  const int64_t chunks = (tiles + chunk_tiles - 1) / chunk_tiles;
  const int64_t unit_grain = grain(chunk_tiles * kW, std::min(m, block_rows), w.k);
  at::parallel_for(0, chunks * blocks, unit_grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t i_begin = (u % blocks) * block_rows, i_end = std::min(m, i_begin + block_rows);
      const int64_t t_end = std::min(tiles, (u / blocks + 1) * chunk_tiles);
      for (int64_t t = (u / blocks) * chunk_tiles; t < t_end; ++t) {
        tile_rows<F>(w, x, bias, t * kW, i_begin, i_end, out);
      }
    }
  });
}

// x (M, K) float32; codes (N, K / 2) uint8 (bits 4) or (N, K) int8 (bits 8); scales (N, K / 32) float32 (8 bits
// without mins: or (N, K / 16)); mins (N, K / 32) float32, required for 4 bits, optional for 8; bias (N,) float32 or
// none -> (M, N) float32
at::Tensor invariant_blocks_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                                   const std::optional<at::Tensor>& mins, int64_t bits,
                                   const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(bits == 4 || bits == 8, "tinylm::invariant_blocks_linear: bits 4 or 8");
  TORCH_CHECK(x.device().is_cpu() && codes.device().is_cpu() && x.dim() == 2 && x.scalar_type() == at::kFloat,
              "tinylm::invariant_blocks_linear: x (M, K) float32 on CPU");
  const int64_t n = codes.size(0), k = x.size(1), groups = k / kBlock;
  TORCH_CHECK(k % kBlock == 0 && codes.dim() == 2 && codes.size(1) == (bits == 4 ? k / 2 : k) &&
                  codes.element_size() == 1,
              "tinylm::invariant_blocks_linear: codes (N, K/2) uint8 or (N, K) int8 for x's K, a multiple of 32");
  const bool has_mins = mins.has_value(), halves = bits == 8 && !has_mins && scales.dim() == 2 &&
                                                  scales.size(1) == 2 * groups;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 2 && scales.size(0) == n &&
                  scales.size(1) == (halves ? 2 : 1) * groups,
              "tinylm::invariant_blocks_linear: scales (N, K/32) float32 (8 bits without mins: or (N, K/16))");
  TORCH_CHECK((bits == 8 || has_mins) &&
                  (!has_mins || (mins->scalar_type() == at::kFloat && mins->dim() == 2 && mins->size(0) == n &&
                                 mins->size(1) == groups)),
              "tinylm::invariant_blocks_linear: mins (N, K/32) float32 (required for 4-bit codes)");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == n),
              "tinylm::invariant_blocks_linear: bias (N,) float32");
  const at::Tensor xc = x.contiguous(), cc = codes.contiguous(), sc = scales.contiguous();
  const at::Tensor mc = has_mins ? mins->contiguous() : at::Tensor();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  if (out.numel() == 0) return out;
  const Weight w{static_cast<const uint8_t*>(cc.data_ptr()), sc.data_ptr<float>(),
                 has_mins ? mc.data_ptr<float>() : nullptr, n, k, groups, cc.size(1)};
  const float* bp = bc.defined() ? bc.data_ptr<float>() : nullptr;
  const float* xp = xc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (bits == 4) run<kQ4>(w, xp, bp, op, x.size(0));
  else if (has_mins) run<kQ8Mins>(w, xp, bp, op, x.size(0));
  else if (halves) run<kQ8Halves>(w, xp, bp, op, x.size(0));
  else run<kQ8>(w, xp, bp, op, x.size(0));
  return out;
}

// Whether this build widens blocks with vector instructions (AVX2, AVX-512): elsewhere (ARM) the scalar widening
// is slower than reading bfloat16 weights, so models keep those instead (tinylm/llm_loading.py)
bool invariant_blocks_vectorized() {
#if defined(TINYLM_INV_AVX512) || defined(__AVX2__)
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinylm, m) {
  m.def("invariant_blocks_linear(Tensor x, Tensor codes, Tensor scales, Tensor? mins, int bits, Tensor? bias=None)"
        " -> Tensor");
  m.def("invariant_blocks_vectorized() -> bool");
}

TORCH_LIBRARY_IMPL(tinylm, CPU, m) { m.impl("invariant_blocks_linear", &invariant_blocks_linear); }

TORCH_LIBRARY_IMPL(tinylm, CompositeExplicitAutograd, m) {
  m.impl("invariant_blocks_vectorized", &invariant_blocks_vectorized);
}
