// Row helpers of decode_attention.cpp: K/V rows of any cache dtype widened to float vectors (ATen's
// Vectorized<float>, 16 lanes on AVX-512), q and outputs put in the rows' element order, cache lines prefetched,
// and 16 dot products' partial sums reduced at once.

#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace tinylm_rows {

using Vec = at::vec::Vectorized<float>;

inline Vec load_vec(const float* p) { return Vec::loadu(p); }
inline Vec load_vec(const c10::BFloat16* p) {
  Vec out;
  at::vec::load_fp32_from_bf16(p, out);
  return out;
}
inline Vec load_vec(const c10::Half* p) {
  Vec out;
  at::vec::load_fp32_from_fp16(p, out);
  return out;
}
inline Vec load_vec(const int8_t* p) {  // int8 codes widened (the row's scale is applied to its score or weight)
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#elif defined(CPU_CAPABILITY_AVX2)
  return Vec(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
#else
  alignas(64) float wide[Vec::size()];
  for (int i = 0; i < Vec::size(); ++i) wide[i] = static_cast<float>(p[i]);
  return Vec::loadu(wide);
#endif
}

// A row of D elements widened to float as nv vectors. bf16 on AVX-512 (kPaired): each 32 elements, as 16 words
// of two bf16, become their even and their odd elements (a shift and a mask, where widening in order costs a
// cross-lane shuffle per vector): the element order is permuted, identically for q, K and V, and undone on output.
template <typename T>
constexpr bool kPairedRows = false;
#if defined(CPU_CAPABILITY_AVX512)
template <>
constexpr bool kPairedRows<c10::BFloat16> = true;
#endif

// every cache line of a row of dim elements (K/V rows are read from memory: the pool is far larger than L2)
template <typename T>
inline void prefetch_row(const T* row, int64_t dim) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < dim * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(bytes + b, 0, 3);
}

// dst = src * scale, in the rows' element order (dim floats; paired: each block of 32 as evens, then odds)
template <bool kPaired>
inline void to_row_order(const float* src, float scale, int64_t dim, float* dst) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (kPaired) {
    const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
    for (int64_t c = 0; c < dim; c += 32) {
      const __m512 lo = _mm512_mul_ps(_mm512_loadu_ps(src + c), _mm512_set1_ps(scale));
      const __m512 hi = _mm512_mul_ps(_mm512_loadu_ps(src + c + 16), _mm512_set1_ps(scale));
      _mm512_storeu_ps(dst + c, _mm512_permutex2var_ps(lo, evens, hi));
      _mm512_storeu_ps(dst + c + 16, _mm512_permutex2var_ps(lo, odds, hi));
    }
    return;
  }
#endif
  for (int64_t d = 0; d < dim; d += Vec::size()) (Vec::loadu(src + d) * Vec(scale)).store(dst + d);
}

// to_row_order undone (no scale)
template <bool kPaired>
inline void from_row_order(const float* src, int64_t dim, float* dst) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (kPaired) {
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
    for (int64_t c = 0; c < dim; c += 32) {
      const __m512 evens = _mm512_loadu_ps(src + c), odds = _mm512_loadu_ps(src + c + 16);
      _mm512_storeu_ps(dst + c, _mm512_permutex2var_ps(evens, first, odds));
      _mm512_storeu_ps(dst + c + 16, _mm512_permutex2var_ps(evens, second, odds));
    }
    return;
  }
#endif
  for (int64_t d = 0; d < dim; d += Vec::size()) Vec::loadu(src + d).store(dst + d);
}

template <bool kPaired, typename T>
inline void widen(const T* row, int nv, Vec* out) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (kPaired) {
    for (int c = 0; c < nv / 2; ++c) {
      const __m512i words = _mm512_loadu_si512(row + 32 * c);
      out[2 * c] = Vec(_mm512_castsi512_ps(_mm512_slli_epi32(words, 16)));
      out[2 * c + 1] = Vec(_mm512_castsi512_ps(_mm512_and_si512(words, _mm512_set1_epi32(0xFFFF0000u))));
    }
    return;
  }
#endif
  for (int i = 0; i < nv; ++i) out[i] = load_vec(row + i * Vec::size());
}

// parts[j] (Vec::size() of them) -> one vector whose lane j is the sum of parts[j]'s lanes. On AVX-512 a
// transpose-and-add tree: 45 shuffles and adds for 16 sums, where reducing each vector alone takes ~150.
inline Vec sum_each(const float* parts) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 c[8], d[4], e[2];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    const __m512 a = _mm512_load_ps(parts + 32 * i), b = _mm512_load_ps(parts + 32 * i + 16);
    c[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  }
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: 4 parts' sums over that lane
    d[i] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int i = 0; i < 2; ++i) {  // 128-bit lanes added in pairs
    e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(d[2 * i], d[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(d[2 * i], d[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  return Vec(_mm512_add_ps(_mm512_shuffle_f32x4(e[0], e[1], _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(e[0], e[1], _MM_SHUFFLE(3, 1, 3, 1))));
#else
  alignas(64) float sums[Vec::size()];
  for (int j = 0; j < Vec::size(); ++j) {
    Vec part = Vec::loadu(parts + j * Vec::size());
    sums[j] = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, part);
  }
  return Vec::loadu(sums);
#endif
}

}  // namespace tinylm_rows
