// Small AVX2 integer helpers shared by the int4 and int8 kernels (int4_gemm.cpp, int8_gemm.cpp).
#pragma once

#if defined(__AVX2__)
#include <immintrin.h>

#include <cstdint>

// The sum of 8 int32 lanes (integers: the order changes nothing)
inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}
#endif
