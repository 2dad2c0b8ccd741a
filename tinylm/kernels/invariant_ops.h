// Building blocks of invariant_gemm.cpp: one accumulator type and multiply-add per path (what a K chunk is and
// how it is added), the fixed reduction of 16 accumulators, and exact moves (float32 -> bfloat16 as c10 rounds, a
// 16 x 16 transpose). Every path's per-element sequence is described in invariant_gemm.cpp's header.

#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define TINYLM_INV_AVX512 1
#elif defined(__AVX2__)
#include <immintrin.h>
#endif

namespace tinylm_invariant {

constexpr int kW = 4;  // weight rows per tile
constexpr int kX = 4;  // activation rows per tile: kW * kX = 16 accumulators, one reduction vector of sums

#ifdef TINYLM_INV_AVX512
// Lane i of the result is the sum of the 16 lanes of v[i] (bf16_gemm.cpp's transpose-and-add tree). Every v[i]
// gets the same tree, ((e0 + e2) + (e1 + e3)) per 128-bit quarter q, then (q0 + q1) + (q2 + q3), so an element's
// sum does not depend on its place in the tile (that is, on its row index in the batch).
inline __m512 sum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  #pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  #pragma GCC unroll 8
  for (int i = 0; i < 4; ++i) {
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
    b[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  #pragma GCC unroll 8
  for (int i = 0; i < 2; ++i) {
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

// The AVX-512 paths share the accumulator type and reduction; they differ in what a chunk is and how it is added.
struct Avx512Acc {
  using Acc = __m512;
  static Acc zero() { return _mm512_setzero_ps(); }
  static void reduce(const Acc* acc, float* sums, int = 0) { _mm512_storeu_ps(sums, sum16(acc)); }  // sums[4i + r]
};

struct F32Fma : Avx512Acc {  // float32: 16 columns per FMA
  using T = float;
  using W = float;
  using In = __m512;
  static constexpr int kChunk = 16;
  static In load(const T* p) { return _mm512_loadu_ps(p); }
  static In load_tail(const T* p, int64_t left) { return _mm512_maskz_loadu_ps((__mmask16)((1u << left) - 1), p); }
  static Acc madd(Acc acc, In w, In x) { return _mm512_fmadd_ps(w, x, acc); }
};

struct BF16Fma : Avx512Acc {  // bfloat16 without AVX-512 BF16: 16 columns widened exactly (<< 16), then FMA
  using T = uint16_t;
  using W = uint16_t;
  using In = __m512;
  static constexpr int kChunk = 16;
  static In widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static In load(const T* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static In load_tail(const T* p, int64_t left) {
    return widen(_mm256_maskz_loadu_epi16((__mmask16)((1u << left) - 1), p));
  }
  static Acc madd(Acc acc, In w, In x) { return _mm512_fmadd_ps(w, x, acc); }
};

// float32 activations, bfloat16 weights widened exactly: F32Fma's sequence on the widened weight, so the same bits
// as float32 x against weight.float(); rows of many-row blocks are widened once into a float32 copy (Base's tiles).
struct F32BF16Fma : F32Fma {
  using W = uint16_t;
  using Base = F32Fma;
  using F32Fma::load;
  using F32Fma::load_tail;
  static In load(const W* p) { return BF16Fma::load(p); }
  static In load_tail(const W* p, int64_t left) { return BF16Fma::load_tail(p, left); }
};

#if defined(__AVX512BF16__)
struct BF16Dot : Avx512Acc {  // bfloat16 on AVX-512 BF16: 32 columns per VDPBF16PS (exact products, float32 adds)
  using T = uint16_t;
  using W = uint16_t;
  using In = __m512bh;
  static constexpr int kChunk = 32;
  static In load(const T* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static In load_tail(const T* p, int64_t left) {
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << left) - 1), p);
  }
  static Acc madd(Acc acc, In w, In x) { return _mm512_dpbf16_ps(acc, w, x); }
};
#endif
#endif  // TINYLM_INV_AVX512

// Portable path (any CPU at::vec supports): Vectorized<float> FMAs, each accumulator reduced by a pairwise tree.
template <typename Elem, typename WeightElem = Elem>
struct Portable {
  using Vec = at::vec::Vectorized<float>;
  using T = Elem;
  using W = WeightElem;
  using Base = Portable<float>;  // what a mixed (float32 x bfloat16) path runs on weight rows widened to float32
  using Acc = Vec;
  using In = Vec;
  static constexpr int kChunk = Vec::size();
  static Acc zero() { return Vec(0.0f); }
  static In load(const float* p) { return Vec::loadu(p); }
  static In load(const c10::BFloat16* p) {
    Vec out;
    at::vec::load_fp32_from_bf16(p, out);
    return out;
  }
  template <typename E>
  static In load_tail(const E* p, int64_t left) {  // zero-filled copy of the last K % kChunk columns
    E part[kChunk];
    std::memset(part, 0, sizeof(part));
    std::memcpy(part, p, left * sizeof(E));
    return load(part);
  }
  static Acc madd(Acc acc, In w, In x) { return at::vec::fmadd(w, x, acc); }
  static void reduce(const Acc* acc, float* sums, int count = kW * kX) {  // the first `count` accumulators
#if defined(__AVX2__) && !defined(TINYLM_INV_AVX512)
    if constexpr (std::is_convertible_v<Vec, __m256>) {  // ATen's AVX2 Vectorized<float>
      for (int j = 0; j < count; j += 4) reduce4(acc + j, sums + j);
      return;
    }
#endif
    for (int j = 0; j < count; ++j) {
      alignas(64) float lanes[kChunk];
      acc[j].store(lanes);
      for (int width = kChunk / 2; width > 0; width /= 2) {
        for (int l = 0; l < width; ++l) lanes[l] = lanes[l] + lanes[l + width];
      }
      sums[j] = lanes[0];
    }
  }
#if defined(__AVX2__) && !defined(TINYLM_INV_AVX512)
  // The tree above for 4 accumulators of 8 lanes at once, the same adds on the same operands (a scalar loop of
  // stores and adds was ~10% of a prefill product on AVX2): width 4 adds the high half to the low half, width 2
  // lanes 2-3 to 0-1 (two accumulators per register), width 1 lane 1 to lane 0 (four per register).
  static void reduce4(const Acc* acc, float* sums) {
    __m128 half[4];
    for (int j = 0; j < 4; ++j) {
      const __m256 v = acc[j];
      half[j] = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // lanes l + (l + 4)
    }
    const __m128 w01 = _mm_add_ps(_mm_movelh_ps(half[0], half[1]), _mm_movehl_ps(half[1], half[0]));  // l + (l + 2)
    const __m128 w23 = _mm_add_ps(_mm_movelh_ps(half[2], half[3]), _mm_movehl_ps(half[3], half[2]));
    const __m128 first = _mm_shuffle_ps(w01, w23, _MM_SHUFFLE(2, 0, 2, 0));
    const __m128 second = _mm_shuffle_ps(w01, w23, _MM_SHUFFLE(3, 1, 3, 1));
    _mm_storeu_ps(sums, _mm_add_ps(first, second));  // lane 0 + lane 1
  }
#endif
};

#ifdef TINYLM_INV_AVX512
// float32 -> bfloat16 bits as c10::BFloat16 rounds (to nearest even; NaN -> 0x7FC0), 16 at a time
inline __m256i to_bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(rounded);
}

// r[i] = row i of a 16 x 16 float block -> r[j] = column j (moves only: no arithmetic)
inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: (r0[0], r1[0], r0[1], r1[1]) and (r0[2], r1[2], r0[3], r1[3])
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m512 u[16];  // u[4i + j], 128-bit lane L: column 4L + j of rows 4i .. 4i + 3
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int j = 0; j < 4; ++j) {  // gather lane L of u[j], u[4 + j], u[8 + j], u[12 + j] into column 4L + j
    const __m512 lo0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x44), hi0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xEE);
    const __m512 lo1 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x44);
    const __m512 hi1 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xEE);
    r[j] = _mm512_shuffle_f32x4(lo0, lo1, 0x88);
    r[4 + j] = _mm512_shuffle_f32x4(lo0, lo1, 0xDD);
    r[8 + j] = _mm512_shuffle_f32x4(hi0, hi1, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(hi0, hi1, 0xDD);
  }
}

#endif  // TINYLM_INV_AVX512

}  // namespace tinylm_invariant
