// Float vectors of ATen's Vectorized<float> loaded from and stored to float32 or bfloat16 rows, partial vectors
// included, and rounded to bfloat16 in registers exactly as c10::BFloat16 rounds (round to nearest even): the
// element-wise steps of the batch-invariant row kernels (invariant_rows.cpp, deltanet_mix.cpp). Every element of
// a row goes through the same vector code, the last partial vector zero-filled, never a scalar formula that could
// round differently.

#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <cstdint>

#include "invariant_ops.h"

namespace tinylm_vec {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

// n <= kLanes values of p as float32, the rest zero
inline Vec load(const float* p, int64_t n) { return n == kLanes ? Vec::loadu(p) : Vec::loadu(p, n); }

#if defined(TINYLM_INV_AVX512) && defined(__AVX512VL__) && defined(CPU_CAPABILITY_AVX512)
// 16 bfloat16 in registers: widening is exact (a shift), narrowing rounds as c10::BFloat16 (invariant_ops.h)
inline __mmask16 lanes(int64_t n) { return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1); }

inline Vec widen(__m256i bits) { return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16))); }

inline Vec load(const c10::BFloat16* p, int64_t n) { return widen(_mm256_maskz_loadu_epi16(lanes(n), p)); }

inline void store(const Vec& v, c10::BFloat16* p, int64_t n) {
  _mm256_mask_storeu_epi16(p, lanes(n), tinylm_invariant::to_bf16_bits(v));
}

inline Vec round_to(const Vec& v, c10::BFloat16*) { return widen(tinylm_invariant::to_bf16_bits(v)); }
#else
inline Vec load(const c10::BFloat16* p, int64_t n) {
  alignas(64) float buffer[kLanes] = {0};
  for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(p[i]);
  return Vec::loadu(buffer);
}

inline void store(const Vec& v, c10::BFloat16* p, int64_t n) {
  alignas(64) float buffer[kLanes];
  v.store(buffer);
  for (int64_t i = 0; i < n; ++i) p[i] = c10::BFloat16(buffer[i]);  // round to nearest even, as .to(bfloat16)
}

inline Vec round_to(const Vec& v, c10::BFloat16*) {
  alignas(64) c10::BFloat16 rounded[kLanes];
  store(v, rounded, kLanes);
  return load(rounded, kLanes);
}
#endif

inline void store(const Vec& v, float* p, int64_t n) { n == kLanes ? v.store(p) : v.store(p, n); }

// v rounded to T and back (the identity for float32)
inline Vec round_to(const Vec& v, float*) { return v; }

// x rounded to T and back, one value (as .to(dtype).float())
template <typename T>
inline float rounded(float x) { return static_cast<float>(static_cast<T>(x)); }

// sigmoid(x) = 1 / (1 + exp(-x)) and silu(x) = x / (1 + exp(-x)), as every kernel here writes them
inline Vec sigmoid(const Vec& x) { return Vec(1.f) / (Vec(1.f) + x.neg().exp()); }
inline Vec silu(const Vec& x) { return x / (Vec(1.f) + x.neg().exp()); }

}  // namespace tinylm_vec
