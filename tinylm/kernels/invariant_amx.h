// The AMX path of invariant_gemm.cpp: bfloat16 products on Intel AMX tiles, for every row count (decode and
// prefill alike, so one token's sums are the same instructions in both).
//
// C^T = W x^T: the A tile is 16 weight rows x 32 K columns read straight from the stored (N, K) weight (stride
// K), the B tile 16 K-pairs x 16 activation rows (x packed once per call, zero past M), C 16 weight rows x 16
// activation rows in float32. Element (i, n) is: C zeroed, then one TDPBF16PS per 32 K columns in order (the
// instruction's fixed internal order; exact bf16 products, float32 sums, RNE / DAZ / FTZ), the last chunk zero-
// padded; bias added once; rounded to bfloat16 as c10 does. Which tile register, which column of the B tile (its
// row's place in the batch), how many other rows or weight tiles run beside it: none of it enters the sequence
// (tests/kernels/test_invariant_gemm.py checks first, middle and last places in batches of 1-300 rows).
//
// Speed: AMX multiplies a 16 x 16 x 32 block per instruction (16x VDPBF16PS's work); 2 weight tiles x 2
// activation tiles per step (4 accumulators), the weight pair stays in L2 while every activation tile pair of the
// block passes, as the AVX-512 paths do. Linux lends the tile registers to a process that asks (arch_prctl);
// if it refuses, the op keeps the AVX-512 BF16 path for the whole process.

#pragma once

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "invariant_ops.h"

namespace tinylm_amx {

constexpr int64_t kT = 16;     // rows of a tile: weight rows (A, C) or K pairs (B); columns of B and C: x rows
constexpr int64_t kK = 32;     // K columns per tile product
constexpr int64_t kTileBytes = kT * 64;

inline bool enabled() {  // ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18), once per process
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

inline void memory_barrier() { asm volatile("" ::: "memory"); }  // tile loads/stores are asm the compiler can't see

struct alignas(64) Config {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline void configure() {  // every tile 16 rows x 64 bytes (per thread: the tile state is a thread's)
  Config config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = kT;
    config.colsb[t] = 64;
  }
  memory_barrier();  // GCC otherwise moved the stores above after LDTILECFG (an invalid config: SIGSEGV)
  _tile_loadconfig(&config);
}

// The calling thread's buffer for packed activations, 64-byte aligned, grown as needed and kept: a decode step's
// ~50 small products each paid ~0.5 us for a fresh tensor. Valid until the thread's next call.
inline uint32_t* packing_buffer(int64_t words) {
  struct Buffer {
    uint32_t* data = nullptr;
    int64_t words = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffer;
  if (buffer.words < words) {
    std::free(buffer.data);
    buffer.words = (words + 15) / 16 * 16;
    buffer.data = static_cast<uint32_t*>(std::aligned_alloc(64, buffer.words * sizeof(uint32_t)));
    TORCH_CHECK(buffer.data != nullptr, "tinylm::invariant_linear: out of memory packing activations");
  }
  return buffer.data;
}

// packed[(b * chunks + c) * 256 + p * 16 + i] = the bf16 pair x[16b + i][32c + 2p .. +1]; zeros past M and K.
// Per chunk: 16 rows of 32 columns (64 bytes each, masked past K: an odd K's last column pairs with a zero) are
// one 16 x 16 transpose of 32-bit pairs (a scalar loop over pairs took ~30% of a 512 x 576 x 576 product).
inline void pack_rows(const uint16_t* x, int64_t m, int64_t k, int64_t b, int64_t chunks, uint32_t* packed) {
  uint32_t* dst = packed + b * chunks * 256;
  const int64_t rows = std::min<int64_t>(kT, m - kT * b);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t cols = std::min<int64_t>(kK, k - c * kK);
    const __mmask32 mask = cols >= kK ? static_cast<__mmask32>(0xFFFFFFFFu) : static_cast<__mmask32>((1u << cols) - 1);
    __m512 r[16];
    for (int64_t i = 0; i < kT; ++i) {
      r[i] = i < rows ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(mask, x + (kT * b + i) * k + c * kK))
                      : _mm512_setzero_ps();
    }
    tinylm_invariant::transpose16(r);  // r[p] = pair p of rows 0 .. 15
    for (int p = 0; p < 16; ++p) _mm512_storeu_ps(reinterpret_cast<float*>(dst + c * 256 + p * 16), r[p]);
  }
}

// A weight tile as the kernel reads it: straight from the weight, or a zero-padded copy of its rows past N or K
struct WeightTile {
  const uint16_t* rows;
  int64_t stride;  // bytes
  void point(const uint16_t* w, int64_t n, int64_t k, int64_t n0, int64_t chunks, std::vector<uint16_t>& copy) {
    if (n0 + kT <= n && k % kK == 0) {
      rows = w + n0 * k;
      stride = k * 2;
      return;
    }
    copy.assign(kT * chunks * kK, 0);
    for (int64_t r = 0; r < kT && n0 + r < n; ++r) std::memcpy(&copy[r * chunks * kK], w + (n0 + r) * k, k * 2);
    rows = copy.data();
    stride = chunks * kK * 2;
  }
};

// C tiles 0..3 = (weight tile a, x tile b) for a < NA, b < NB, over every K chunk in order; stored to c_out
// [(a * 2 + b) * 256 + r * 16 + i] (weight row r, x row i)
template <int NA, int NB>
void block(const WeightTile* a, const uint32_t* b0, const uint32_t* b1, int64_t chunks, float* c_out) {
  _tile_zero(0);
  if constexpr (NB == 2) _tile_zero(1);
  if constexpr (NA == 2) _tile_zero(2);
  if constexpr (NA == 2 && NB == 2) _tile_zero(3);
  memory_barrier();
  for (int64_t c = 0; c < chunks; ++c) {
    _tile_loadd(4, a[0].rows + c * kK, a[0].stride);
    if constexpr (NA == 2) _tile_loadd(5, a[1].rows + c * kK, a[1].stride);
    _tile_loadd(6, b0 + c * 256, 64);
    if constexpr (NB == 2) _tile_loadd(7, b1 + c * 256, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NB == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (NA == 2) _tile_dpbf16ps(2, 5, 6);
    if constexpr (NA == 2 && NB == 2) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c_out, 64);
  if constexpr (NB == 2) _tile_stored(1, c_out + 256, 64);
  if constexpr (NA == 2) _tile_stored(2, c_out + 512, 64);
  if constexpr (NA == 2 && NB == 2) _tile_stored(3, c_out + 768, 64);
  memory_barrier();
}

}  // namespace tinylm_amx
