// The float tiles of invariant_gemm.cpp, shared with invariant_blocks.cpp (which runs them over weight rows it
// widened from GGUF blocks): a tile of 4 weight rows against up to 4 activation rows, each output element one
// accumulator taking the K chunks in order (invariant_gemm.cpp's header says which sequence, and why).
// Include after invariant_ops.h and fp_contract_off.h.

#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "invariant_ops.h"

namespace tinylm_invariant {

constexpr int64_t kBlockBytes = 256 * 1024;  // activation block and weight chunk, each (L2 holds both)
constexpr int64_t kThreadWork = 128 * 1024;  // multiply-adds below which a thread is not worth waking

// work units per thread at least, so a small product (a 192 x 576 decode step) stays on the calling thread
inline int64_t grain(int64_t unit_rows, int64_t unit_cols, int64_t k) {
  return std::max<int64_t>(1, kThreadWork / std::max<int64_t>(1, unit_rows * unit_cols * k));
}

// Prefetch the next weight tile (kW * k contiguous elements) in step with reading this one: step `c` of the K loop
// fetches the lines at kW * c elements, so the whole tile has arrived when the loop ends. Into every cache level
// (T0): on this Xeon (AMX, 2 shared cores) the non-temporal hint bf16_gemm.cpp chose on an EPYC made the default
// model's lm_head at 1 row 2.5-4x slower (49152 x 576: float32 28.6 -> 8.9 ms, bf16 9.6 -> 2.1-3.5 ms).
template <class Ops>
inline void prefetch_step(const char* next, int64_t c) {
  constexpr int kBytes = kW * Ops::kChunk * sizeof(typename Ops::W);
  const char* line = next + kW * c * static_cast<int64_t>(sizeof(typename Ops::W));
  #pragma GCC unroll 8
  for (int b = 0; b < kBytes; b += 64) __builtin_prefetch(line + b, 0, 3);
}

// 256-bit vectors (AVX2: 16 registers, FMA latency 4-5 cycles at 2 a cycle): a 4 x 4 tile's 16 accumulators plus
// its 4 weight and 1 activation vectors spilled to the stack, and 8 accumulators are too few chains to keep both FMA
// pipes busy. There a tile is 3 activation rows x 4 weight rows (12 chains): the 3 activation vectors are loaded
// first, then each weight vector in turn into one register (16 in all). Each element's accumulator sees the same
// chunks in the same order whatever the tile: only registers change.
template <class Ops>
constexpr bool kNarrowTile = sizeof(typename Ops::Acc) == 32;
template <class Ops>
constexpr int kTileRows = kNarrowTile<Ops> ? 3 : kX;

// Keeps v in a register: without it GCC folded the narrow tile's reads into the FMAs as memory operands, 15-16
// loads per 12 FMAs instead of 7 (load-bound at ~75% of the FMA rate: 2048-row products 108-123 -> 124-132 GFLOP/s
// pinning the activations, more pinning the weights too).
template <class V>
inline void pin(V& v) {
#ifdef __AVX2__
  if constexpr (std::is_convertible_v<V, __m256>) {  // ATen's AVX2 Vectorized<float> (not its generic one)
    __m256 reg = v;
    asm("" : "+x"(reg));
    v = reg;
  }
#endif
}

// acc[i * kW + r] += chunk of weight row r x chunk of activation row i, for i < MB; `load` gives a row's chunk
template <class Ops, int MB, class Load>
inline void tile_step(typename Ops::Acc* acc, const typename Ops::W* const* wr, const typename Ops::T* x, int64_t k,
                      Load load) {
  if constexpr (kNarrowTile<Ops> && MB > 1) {  // (one row, a decode step: 4 chains either way)
    typename Ops::In xv[MB];
    #pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      xv[i] = load(x + i * k);
      pin(xv[i]);
    }
    #pragma GCC unroll 4
    for (int r = 0; r < kW; ++r) {
      typename Ops::In wv = load(wr[r]);
      pin(wv);
      #pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) acc[i * kW + r] = Ops::madd(acc[i * kW + r], wv, xv[i]);
    }
  } else {
    typename Ops::In wv[kW];
    #pragma GCC unroll 4
    for (int r = 0; r < kW; ++r) wv[r] = load(wr[r]);
    #pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      const typename Ops::In xv = load(x + i * k);
      #pragma GCC unroll 4
      for (int r = 0; r < kW; ++r) acc[i * kW + r] = Ops::madd(acc[i * kW + r], wv[r], xv);
    }
  }
}

// sums[4i + r] = dot(x row i, weight row r) for MB activation rows at x (stride k) and the kW weight rows wr.
template <class Ops, int MB>
void tile(const typename Ops::W* const* wr, const typename Ops::T* x, int64_t k, const char* next, float* sums) {
  typename Ops::Acc acc[kX * kW];
  #pragma GCC unroll 16
  for (int j = 0; j < kX * kW; ++j) acc[j] = Ops::zero();
  int64_t c = 0;
  for (; c + Ops::kChunk <= k; c += Ops::kChunk) {
    if (next != nullptr) prefetch_step<Ops>(next, c);
    tile_step<Ops, MB>(acc, wr, x, k, [c](const auto* row) { return Ops::load(row + c); });
  }
  if (c < k) {  // the last K % kChunk columns, zero-filled (0 * 0 adds nothing): the same step for every row
    tile_step<Ops, MB>(acc, wr, x, k, [c, k](const auto* row) { return Ops::load_tail(row + c, k - c); });
  }
  Ops::reduce(acc, sums, MB * kW);
}

}  // namespace tinylm_invariant
