// int4 weight x int8 activation products for 1-16 rows (decode), as llama.cpp's Q4 x Q8 dot products.
//
// A weight is w = s * q + m, q in [0, 15], one (s, m) per output row and group of `group` input features (GGUF
// Q4_1: s = d, m as stored; Q4_0: m = -8d). Each activation row is quantized on the fly in blocks of 32 features
// as llama.cpp's Q8_0: dx = max|x| / 127, xq = round(x / dx) in [-127, 127]. Per block b the integer dot
// i_b = sum q * xq is exact in int32; the float combination of one output element is then one fixed sequence:
//
//     acc = 0
//     for each group g:  for each block b of g:  acc = acc + (float(i_b) * dx_b) * s_g
//                        acc = acc + m_g * xsum_g       xsum_g = sum over b of g of dx_b * float(sum of xq in b)
//
// (additions and products rounded separately: contraction into FMAs is switched off below), whatever the number
// of rows M, the thread split or the instruction set, so a row's output never depends on the batch (issue 21) and
// the AVX-512 VNNI, AVX2 and scalar paths give the same bits (tests/kernels/test_int4_gemm.py).
//
// Weight layout (tinylm/quant/int4pack.py to_tiles): tiles of 16 output rows, (N/16, K/8, 64) bytes: for each 8
// input features k0..k0+7 one 64-byte line, byte 4r + t holding q[r, k0 + t] (low nibble) and q[r, k0 + 4 + t]
// (high nibble). One 512-bit load therefore gives, after a mask and a shift, two VPDPBUSD operands whose 16 int32
// lanes are the tile's 16 output rows (4 features each), against 4 activation bytes broadcast: no horizontal sums,
// and each weight byte is read once per pass of up to 8 activation rows (16 rows: twice, the second time from
// L1). scales (N/16, G, 2, 16) float16: the tile's 16 s, then its 16 m. Activations are quantized with AVX-512 on
// the VNNI path, AVX2 on the AVX2 path, by the scalar loop on the scalar path (the same bits).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define TINYLM_INT4_VNNI 1
#endif

#include "avx2_int.h"
#include "fp_contract_off.h"

namespace {

constexpr int64_t kTile = 16;   // output rows per tile (int32 lanes of a 512-bit vector)
constexpr int64_t kBlock = 32;  // activation features per quantization block
// Software prefetch of the weight this many bytes ahead, into L1 (T0): SmolLM2's 3072 x 576 product, 30 distinct
// copies, one thread: 113 -> 83 us; none, 8 and 16 KiB ahead, or non-temporal hints, were no better (noisy host)
#ifndef TINYLM_INT4_AHEAD
#define TINYLM_INT4_AHEAD 4096
#endif
#ifndef TINYLM_INT4_HINT
#define TINYLM_INT4_HINT _MM_HINT_T0
#endif

enum Isa : int64_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512Vnni = 3 };

int64_t best_isa() {
#if defined(TINYLM_INT4_VNNI)
  return kAvx512Vnni;
#elif defined(__AVX2__)
  return kAvx2;
#else
  return kScalar;
#endif
}

// One call's activations, quantized: xq (M, K) int8, dx (M, K/32), xsum (M, G) (see the sequence above).
struct Quantized {
  std::vector<int8_t> xq;
  std::vector<float> dx;
  std::vector<float> xsum;
};

// One block of 32 features: xq, and the block's scale d and integer sum. Scalar and AVX-512 give the same bits:
// max|x| is exact, d = amax / 127 and id = 1 / d are single roundings, x * id one rounding, then round half to even
// (nearbyint, and cvtps2dq in the default rounding mode) and a clamp; the sum is an exact integer.
inline float quantize_block(const float* src, int8_t* dst, int32_t* sum_out) {
  float amax = 0.0f;
  for (int64_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(src[j]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  int32_t sum = 0;
  for (int64_t j = 0; j < kBlock; ++j) {
    const float v = std::min(127.0f, std::max(-127.0f, std::nearbyint(src[j] * id)));
    dst[j] = static_cast<int8_t>(v);
    sum += static_cast<int32_t>(v);
  }
  *sum_out = sum;
  return d;
}

#if defined(TINYLM_INT4_VNNI)
inline float quantize_block_avx512(const float* src, int8_t* dst, int32_t* sum_out) {
  const __m512 a = _mm512_loadu_ps(src), b = _mm512_loadu_ps(src + 16);
  // max(v, m) gives m when v is NaN: NaNs are skipped, as std::max(amax, NaN) does
  const __m512 m = _mm512_max_ps(_mm512_abs_ps(b), _mm512_max_ps(_mm512_abs_ps(a), _mm512_setzero_ps()));
  const float amax = _mm512_reduce_max_ps(m);
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const __m512 vid = _mm512_set1_ps(id), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  // round to nearest even first, then clamp (integers: clamping before or after the conversion is the same)
  // max(v, lo) gives lo for a NaN, as std::max(-127.0f, NaN) does in the scalar loop
  const __m512i qa = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(
      _mm512_mul_ps(a, vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi));
  const __m512i qb = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(
      _mm512_mul_ps(b, vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtsepi32_epi8(qa));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtsepi32_epi8(qb));
  *sum_out = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
  return d;
}
#endif

#if defined(__AVX2__)
// The block quantizer with AVX2, the same bits as quantize_block (see there): max(v, m) gives m for a NaN, the
// rounding is to nearest even, and a NaN becomes -127 after max(v, -127) as std::max(-127.0f, NaN) does.
inline float quantize_block_avx2(const float* src, int8_t* dst, int32_t* sum_out) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4];
  __m256 m = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(src + 8 * i);
    m = _mm256_max_ps(_mm256_andnot_ps(sign, v[i]), m);
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  const float amax = _mm_cvtss_f32(h);
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const __m256 vid = _mm256_set1_ps(id), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  __m256i q[4];
  __m256i sum = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[i], vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
    sum = _mm256_add_epi32(sum, q[i]);
  }
  // packs interleave 128-bit lanes: bytes come out as q0[0:4] q1[0:4] q2[0:4] q3[0:4] q0[4:8] ...; one dword
  // permutation puts them in order
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  *sum_out = hsum_epi32(sum);
  return d;
}

#endif

// The block quantizer of a path: each its own code, the same bits (the tests compare every path's)
inline float quantize_block_isa(int64_t isa, const float* src, int8_t* dst, int32_t* sum_out) {
#if defined(TINYLM_INT4_VNNI)
  if (isa == kAvx512Vnni) return quantize_block_avx512(src, dst, sum_out);
#endif
#if defined(__AVX2__)
  if (isa == kAvx2) return quantize_block_avx2(src, dst, sum_out);
#endif
  return quantize_block(src, dst, sum_out);
}

// Rows [begin, end) of x (M, K) into `out` (sized for all M rows), with the block quantizer of path `isa`.
void quantize_range(const float* x, int64_t begin, int64_t end, int64_t k, int64_t group, int64_t isa,
                    Quantized& out) {
  const int64_t blocks = k / kBlock, groups = k / group, per_group = group / kBlock;
  for (int64_t i = begin; i < end; ++i) {
    for (int64_t g = 0; g < groups; ++g) {
      float acc = 0.0f;
      for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
        int32_t sum;
        const float* src = x + i * k + b * kBlock;
        int8_t* dst = out.xq.data() + i * k + b * kBlock;
        const float d = quantize_block_isa(isa, src, dst, &sum);
        out.dx[i * blocks + b] = d;
        acc = acc + d * static_cast<float>(sum);
      }
      out.xsum[i * groups + g] = acc;
    }
  }
}

Quantized quantize_rows(const float* x, int64_t m, int64_t k, int64_t group, int64_t isa) {
  Quantized out{std::vector<int8_t>(m * k), std::vector<float>(m * (k / kBlock)), std::vector<float>(m * (k / group))};
  // a row is ~0.1-0.3 us: threads only for many rows (prefill), where waking them pays
  at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) { quantize_range(x, begin, end, k, group, isa, out); });
  return out;
}

// The shapes of one call, and where its tensors start.
struct Problem {
  const Quantized* act;
  const uint8_t* w;      // (N/16, K/8, 64)
  const c10::Half* sm;   // (N/16, G, 2, 16)
  float* out;            // (M, N)
  int64_t m, n, k, group;
};

// ---- scalar: the reference sequence, one output element at a time

void tile_scalar(const Problem& p, int64_t tile, int64_t row) {
  const int64_t groups = p.k / p.group, per_group = p.group / kBlock, blocks = p.k / kBlock;
  const uint8_t* w = p.w + tile * (p.k / 8) * 64;
  const c10::Half* sm = p.sm + tile * groups * 2 * kTile;
  const int8_t* xq = p.act->xq.data() + row * p.k;
  for (int64_t r = 0; r < kTile; ++r) {
    float acc = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
      const float s = static_cast<float>(sm[(g * 2) * kTile + r]), mn = static_cast<float>(sm[(g * 2 + 1) * kTile + r]);
      for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
        int32_t dot = 0;
        for (int64_t o = b * 4; o < b * 4 + 4; ++o) {  // the block's 4 lines of 8 features
          for (int64_t t = 0; t < 4; ++t) {
            const uint8_t byte = w[o * 64 + 4 * r + t];
            dot += (byte & 15) * xq[8 * o + t] + (byte >> 4) * xq[8 * o + 4 + t];
          }
        }
        acc = acc + (static_cast<float>(dot) * p.act->dx[row * blocks + b]) * s;
      }
      acc = acc + mn * p.act->xsum[row * groups + g];
    }
    p.out[row * p.n + tile * kTile + r] = acc;
  }
}

void run_scalar(const Problem& p, int64_t tile) {
  for (int64_t row = 0; row < p.m; ++row) tile_scalar(p, tile, row);
}

// ---- AVX2: R (<= 2) activation rows against one tile of 16 weight rows, its two halves of 8 int32 lanes at
// once, so each 64-byte line is unpacked once per pass and each activation broadcast feeds both halves.
// VPMADDUBSW gives pairs of q * xq (at most 2 * 15 * 127 = 3810 in magnitude); a block's 4 lines give 8 such
// int16 terms per lane, at most 30480: they are summed in int16 without saturation or wrap-around, then one
// VPMADDWD per block widens the lane pairs to int32. The same integers as the scalar path.

#if defined(__AVX2__)
inline __m256i bcast4(const int8_t* p) {
  int32_t quad;
  std::memcpy(&quad, p, 4);
  return _mm256_set1_epi32(quad);
}

template <int R>
void tile_avx2(const Problem& p, int64_t tile, int64_t row0) {
  const int64_t groups = p.k / p.group, per_group = p.group / kBlock, blocks = p.k / kBlock;
  const uint8_t* w = p.w + tile * (p.k / 8) * 64;
  const c10::Half* sm = p.sm + tile * groups * 2 * kTile;
  const int8_t* xq[R];
  const float* dx[R];
  const float* xsum[R];
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) {
    xq[r] = p.act->xq.data() + (row0 + r) * p.k;
    dx[r] = p.act->dx.data() + (row0 + r) * blocks;
    xsum[r] = p.act->xsum.data() + (row0 + r) * groups;
    acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  }
  const __m256i mask = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  for (int64_t g = 0; g < groups; ++g) {
    const c10::Half* s_half = sm + g * 2 * kTile;  // the tile's 16 s, then its 16 m
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      __m256i sums[R][2];
      for (int r = 0; r < R; ++r) sums[r][0] = sums[r][1] = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int o = 0; o < 4; ++o) {  // the block's 4 lines of 8 features
        const uint8_t* line = w + (b * 4 + o) * 64;
        _mm_prefetch(reinterpret_cast<const char*>(line + TINYLM_INT4_AHEAD), TINYLM_INT4_HINT);
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line + 32));
        const __m256i l0 = _mm256_and_si256(v0, mask), h0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), mask);
        const __m256i l1 = _mm256_and_si256(v1, mask), h1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), mask);
        for (int r = 0; r < R; ++r) {
          const __m256i xl = bcast4(xq[r] + b * kBlock + 8 * o), xh = bcast4(xq[r] + b * kBlock + 8 * o + 4);
          sums[r][0] = _mm256_add_epi16(
              sums[r][0], _mm256_add_epi16(_mm256_maddubs_epi16(l0, xl), _mm256_maddubs_epi16(h0, xh)));
          sums[r][1] = _mm256_add_epi16(
              sums[r][1], _mm256_add_epi16(_mm256_maddubs_epi16(l1, xl), _mm256_maddubs_epi16(h1, xh)));
          // an empty asm per line: GCC otherwise hoists a block's 16-32 products ahead of their sums and spills
          // them to the stack (integer sums: the order changes nothing)
          asm("" : "+x"(sums[r][0]), "+x"(sums[r][1]));
        }
      }
      for (int half = 0; half < 2; ++half) {
        const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s_half + half * 8)));
        for (int r = 0; r < R; ++r) {
          const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(sums[r][half], ones));
          const __m256 scaled = _mm256_mul_ps(dot, _mm256_set1_ps(dx[r][b]));
          acc[r][half] = _mm256_add_ps(acc[r][half], _mm256_mul_ps(scaled, s));
        }
      }
    }
    for (int half = 0; half < 2; ++half) {
      const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s_half + kTile + half * 8)));
      for (int r = 0; r < R; ++r) {
        acc[r][half] = _mm256_add_ps(acc[r][half], _mm256_mul_ps(mn, _mm256_set1_ps(xsum[r][g])));
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float* dst = p.out + (row0 + r) * p.n + tile * kTile;
    for (int half = 0; half < 2; ++half) _mm256_storeu_ps(dst + half * 8, acc[r][half]);
  }
}

// Rows in passes of 2 over each tile (an odd count ends with one): every row's arithmetic is the same whatever
// pass it falls in.
void run_avx2(const Problem& p, int64_t tile) {
  int64_t row = 0;
  for (; row + 2 <= p.m; row += 2) tile_avx2<2>(p, tile, row);
  if (row < p.m) tile_avx2<1>(p, tile, row);
}
#endif

// ---- AVX-512 VNNI: R (<= 8) activation rows against one tile; each 64-byte line is unpacked once for the R rows

#if defined(TINYLM_INT4_VNNI)
inline __m512i bcast4x(const int8_t* p) {
  int32_t quad;
  std::memcpy(&quad, p, 4);
  return _mm512_set1_epi32(quad);
}

// The integer dots of block b for R rows: dot[r] (16 int32 lanes, the tile's rows). Up to 4 rows, low and high
// nibbles go to two accumulators (shorter VPDPBUSD dependency chains); more rows give chains enough to overlap and
// need the registers. Integer sums: the grouping changes nothing.
template <int R>
inline void block_dots(const uint8_t* line, const int8_t* const* xq, int64_t offset, __m512i* dot) {
  constexpr bool kSplit = R <= 4;
  const __m512i mask = _mm512_set1_epi8(15);
  __m512i hi[kSplit ? R : 1];
  for (int r = 0; r < R; ++r) dot[r] = _mm512_setzero_si512();
  if constexpr (kSplit) for (int r = 0; r < R; ++r) hi[r] = _mm512_setzero_si512();
#pragma GCC unroll 4
  for (int o = 0; o < 4; ++o) {  // the block's 4 lines of 8 features
    _mm_prefetch(reinterpret_cast<const char*>(line + o * 64 + TINYLM_INT4_AHEAD), TINYLM_INT4_HINT);
    const __m512i v = _mm512_loadu_si512(line + o * 64);
    const __m512i ql = _mm512_and_si512(v, mask), qh = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
    for (int r = 0; r < R; ++r) {
      dot[r] = _mm512_dpbusd_epi32(dot[r], ql, bcast4x(xq[r] + offset + 8 * o));
      if constexpr (kSplit) {
        hi[r] = _mm512_dpbusd_epi32(hi[r], qh, bcast4x(xq[r] + offset + 8 * o + 4));
      } else {
        dot[r] = _mm512_dpbusd_epi32(dot[r], qh, bcast4x(xq[r] + offset + 8 * o + 4));
      }
    }
  }
  if constexpr (kSplit) for (int r = 0; r < R; ++r) dot[r] = _mm512_add_epi32(dot[r], hi[r]);
}

template <int R>
void tile_vnni(const Problem& p, int64_t tile, int64_t row0) {
  const int64_t groups = p.k / p.group, per_group = p.group / kBlock, blocks = p.k / kBlock;
  const uint8_t* w = p.w + tile * (p.k / 8) * 64;
  const c10::Half* sm = p.sm + tile * groups * 2 * kTile;
  const int8_t* xq[R];
  const float* dx[R];
  const float* xsum[R];
  __m512 acc[R];
  for (int r = 0; r < R; ++r) {
    xq[r] = p.act->xq.data() + (row0 + r) * p.k;
    dx[r] = p.act->dx.data() + (row0 + r) * blocks;
    xsum[r] = p.act->xsum.data() + (row0 + r) * groups;
    acc[r] = _mm512_setzero_ps();
  }
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sm + g * 2 * kTile)));
    const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sm + (g * 2 + 1) * kTile)));
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      __m512i dot[R];
      block_dots<R>(w + b * 4 * 64, xq, b * kBlock, dot);
      for (int r = 0; r < R; ++r) {
        const __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(dot[r]), _mm512_set1_ps(dx[r][b]));
        acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(scaled, s));
      }
    }
    for (int r = 0; r < R; ++r) acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(mn, _mm512_set1_ps(xsum[r][g])));
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(p.out + (row0 + r) * p.n + tile * kTile, acc[r]);
}

// Rows in passes of up to 8 over each tile (16 rows: two passes, each weight line unpacked twice, not four times);
// every row's arithmetic is the same whatever pass it falls in.
void run_vnni(const Problem& p, int64_t tile) {
  for (int64_t row = 0; row < p.m;) {
    const int64_t left = p.m - row, r = left >= 16 || left == 8 ? 8 : (left > 8 ? left - 8 : left);
    switch (r) {
      case 8: tile_vnni<8>(p, tile, row); break;
      case 7: tile_vnni<7>(p, tile, row); break;
      case 6: tile_vnni<6>(p, tile, row); break;
      case 5: tile_vnni<5>(p, tile, row); break;
      case 4: tile_vnni<4>(p, tile, row); break;
      case 3: tile_vnni<3>(p, tile, row); break;
      case 2: tile_vnni<2>(p, tile, row); break;
      default: tile_vnni<1>(p, tile, row); break;
    }
    row += r;
  }
}
#endif

void run_tile(const Problem& p, int64_t isa, int64_t tile) {
#if defined(TINYLM_INT4_VNNI)
  if (isa == kAvx512Vnni) return run_vnni(p, tile);
#endif
#if defined(__AVX2__)
  if (isa == kAvx2) return run_avx2(p, tile);
#endif
  run_scalar(p, tile);
}

void check_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous (M, K) float32");
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte && qweight.is_contiguous(),
              "qweight: contiguous (N, K/2) uint8 in tiles");
  TORCH_CHECK(scales.dim() == 4 && scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  scales.size(2) == 2 && scales.size(3) == kTile,
              "scales: contiguous (N/16, G, 2, 16) float16");
  const int64_t k = x.size(1), n = qweight.size(0), groups = scales.size(1);
  TORCH_CHECK(k % kBlock == 0 && qweight.size(1) * 2 == k && n % kTile == 0 && scales.size(0) * kTile == n,
              "shapes: K a multiple of 32 matching qweight, N a multiple of 16 matching scales");
  TORCH_CHECK(groups > 0 && k % groups == 0 && (k / groups) % kBlock == 0, "scales: groups of a multiple of 32");
  TORCH_CHECK(isa >= kAuto && isa <= best_isa(), "isa: 0 (best), 1 (scalar), 2 (AVX2), 3 (AVX-512 VNNI), up to ",
              best_isa(), " here");
}

// x (M, K) float32, qweight (N, K/2) uint8 tiles, scales (N/16, G, 2, 16) float16 -> (M, N) float32.
at::Tensor int4_gemm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t isa) {
  check_args(x, qweight, scales, isa);
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0), group = k / scales.size(1);
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  const int64_t chosen = isa == kAuto ? best_isa() : isa;
  const Quantized act = quantize_rows(x.data_ptr<float>(), m, k, group, chosen);
  const Problem p{&act, qweight.data_ptr<uint8_t>(), scales.data_ptr<c10::Half>(), out.data_ptr<float>(), m, n, k,
                  group};
  at::parallel_for(0, n / kTile, 4, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) run_tile(p, chosen, tile);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinylm, m) {
  m.def("int4_gemm(Tensor x, Tensor qweight, Tensor scales, int isa=0) -> Tensor");
  m.def("int4_gemm_best_isa() -> int");
}

TORCH_LIBRARY_IMPL(tinylm, CPU, m) { m.impl("int4_gemm", &int4_gemm); }

TORCH_LIBRARY_IMPL(tinylm, CompositeExplicitAutograd, m) { m.impl("int4_gemm_best_isa", &best_isa); }
