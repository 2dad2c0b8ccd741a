// The AMX paths of invariant_gemm.cpp (bfloat16 products on Intel AMX tiles, for every row count: decode and
// prefill alike, so one token's sums are the same instructions in both) and of invariant_attention.cpp
// (attention chunks over bfloat16 pools, below "Attention chunks on AMX tiles").
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

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <limits>
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

// packed[(b * chunks + c) * 256 + p * 16 + i] = the bf16 pair x[16b + i][32c + 2p .. +1]; zeros past M and K
inline void pack_rows(const uint16_t* x, int64_t m, int64_t k, int64_t b, int64_t chunks, uint32_t* packed) {
  uint32_t* dst = packed + b * chunks * 256;
  std::memset(dst, 0, chunks * kTileBytes);
  for (int64_t i = 0; i < kT && kT * b + i < m; ++i) {
    const uint16_t* row = x + (kT * b + i) * k;
    for (int64_t q = 0; q < k / 2; ++q) {  // whole pairs: pair q goes to chunk q / 16, K-pair row q % 16
      uint32_t pair;
      std::memcpy(&pair, row + 2 * q, 4);
      dst[(q / 16) * 256 + (q % 16) * 16 + i] = pair;
    }
    if (k % 2) {  // an odd K's last column, paired with a zero
      const int64_t q = k / 2;
      dst[(q / 16) * 256 + (q % 16) * 16 + i] = row[k - 1];
    }
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


// ---- Attention chunks on AMX tiles (invariant_attention.cpp, bfloat16 K/V pools, head size a multiple of 32) ----
//
// One (block of query rows, K/V head, chunk of kKeys keys) -> per query head its partial (m, l, D sums), as
// attend_chunk writes it. Lanes: the block's query heads, row i's head g at lane i * G + g (at most 16). Per lane:
//   scores^T (keys x lanes) = K (keys x D, the pool's bf16 rows) . Q^T, Q = q * scale in float32 split into three
//     bf16 parts (hi + mid + lo: 24 significant bits, float32's), one TDPBF16PS per (32 dims, part) in that order;
//   keys past the lane's end (or past the chunk) -> -inf; m = their max, e = exp(score - m), l = the sum of e over
//     the chunk's 64 keys in order (masked keys add 0);
//   sums (lanes x D) = P . V, P = e split in three bf16 parts likewise, one TDPBF16PS per (32 keys, part), always
//     both 32-key halves (zero V rows past the chunk's keys).
// A lane's numbers depend on its q, its keys and its end only, never on its place in the tile or the other lanes:
// a decode row (one query, G lanes) gets the bits its token gets among a prefill block's rows.
constexpr int kSplits = 3;
constexpr int64_t kAttnKeys = 64;  // = tinylm_attend::kChunk (checked in invariant_attention.cpp)
constexpr int64_t kAttnMaxDim = 256;

inline __m512 widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

inline __m256i bf16_bits(__m512 x) {  // round to nearest even (VCVTNEPS2BF16)
  const __m256bh h = _mm512_cvtneps_pbh(x);
  __m256i bits;
  std::memcpy(&bits, &h, sizeof(bits));
  return bits;
}

// 32 float32 (lo: elements 0-15, hi: 16-31) -> kSplits rows of 32 bf16 whose sum is the input (to 24 bits)
inline void split_row(__m512 lo, __m512 hi, __m512i* parts) {
  for (int s = 0; s < kSplits; ++s) {
    const __m256i a = bf16_bits(lo), b = bf16_bits(hi);
    parts[s] = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
    lo = _mm512_sub_ps(lo, widen_bf16(a));
    hi = _mm512_sub_ps(hi, widen_bf16(b));
  }
}

// rows[L] (16 words each, L < 16) -> B tile (row p = word p of every lane)
inline void store_transposed(__m512i* rows, uint32_t* tile) {
  __m512* r = reinterpret_cast<__m512*>(rows);
  tinylm_invariant::transpose16(r);
  for (int p = 0; p < 16; ++p) _mm512_store_ps(reinterpret_cast<float*>(tile + p * 16), r[p]);
}

// Q^T of a block's lanes as B tiles: qt[(s * dim / 32 + c) * 256 + p * 16 + L] = part s of q[L] * scale, dims
// 32c + 2p, 32c + 2p + 1. q_lane(L): lane L's D floats (L < lanes); other lanes zero.
template <typename QLane>
void pack_queries(QLane q_lane, int64_t lanes, int64_t dim, float scale, uint32_t* qt) {
  const int64_t chunks = dim / 32;
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t c = 0; c < chunks; ++c) {
    alignas(64) __m512i rows[kSplits][16];
    for (int64_t L = 0; L < 16; ++L) {
      if (L >= lanes) {
        for (int k = 0; k < kSplits; ++k) rows[k][L] = _mm512_setzero_si512();
        continue;
      }
      const float* q = q_lane(L) + 32 * c;
      __m512i parts[kSplits];
      split_row(_mm512_mul_ps(_mm512_loadu_ps(q), s), _mm512_mul_ps(_mm512_loadu_ps(q + 16), s), parts);
      for (int k = 0; k < kSplits; ++k) rows[k][L] = parts[k];
    }
    for (int k = 0; k < kSplits; ++k) store_transposed(rows[k], qt + (k * chunks + c) * 256);
  }
}

// n rows of dim bf16 (a multiple of 32) from row(j) to dst, then zero rows up to a whole tile of 16
template <typename Row>
void gather_rows(Row row, int64_t n, int64_t dim, uint16_t* dst) {
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* src = row(j);
    for (int64_t e = 0; e < dim; e += 32) _mm512_store_si512(dst + j * dim + e, _mm512_loadu_si512(src + e));
  }
  for (int64_t e = n * dim; e < (n + 15) / 16 * 16 * dim; e += 32) _mm512_store_si512(dst + e, _mm512_setzero_si512());
}

// The chunk's buffers (per thread): K rows gathered, scores / exp, P parts, V pairs, output sums
struct alignas(64) AttnScratch {
  uint16_t keys[kAttnKeys * kAttnMaxDim];
  float scores[kAttnKeys * 16];                      // (key, lane)
  uint16_t p[kSplits * 2 * 16 * 32];                 // A tiles (part, key half): lane rows of 32 keys
  uint32_t v[2 * (kAttnMaxDim / 16) * 256];          // B tiles (key half, 16 dims): rows of key pairs
  float out[16 * kAttnMaxDim];                       // (lane, dim)
  float top[16], total[16];
};

// scores^T for key tiles [0, tiles): C tile kt (16 keys x 16 lanes) = K tile . Q^T, (32 dims, part) in order.
// The up to 4 key tiles' products interleave (independent accumulators keep AMX busy; one C tile's products
// wait on each other), with the K tiles alternating between two registers so a load need not wait for the
// product reading the other.
inline void attn_scores(const AttnScratch& w, const uint32_t* qt, int64_t dim, int64_t tiles, float* scores) {
  const int64_t chunks = dim / 32, stride = dim * 2;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  memory_barrier();
  for (int64_t c = 0; c < chunks; ++c) {
    const uint16_t* k = w.keys + 32 * c;
    for (int s = 0; s < kSplits; ++s) {
      _tile_loadd(5, qt + (s * chunks + c) * 256, 64);
      _tile_loadd(4, k, stride);
      _tile_dpbf16ps(0, 4, 5);
      if (tiles > 1) {
        _tile_loadd(6, k + 16 * dim, stride);
        _tile_dpbf16ps(1, 6, 5);
      }
      if (tiles > 2) {
        _tile_loadd(4, k + 32 * dim, stride);
        _tile_dpbf16ps(2, 4, 5);
      }
      if (tiles > 3) {
        _tile_loadd(6, k + 48 * dim, stride);
        _tile_dpbf16ps(3, 6, 5);
      }
    }
  }
  _tile_stored(0, scores, 64);
  if (tiles > 1) _tile_stored(1, scores + 256, 64);
  if (tiles > 2) _tile_stored(2, scores + 512, 64);
  if (tiles > 3) _tile_stored(3, scores + 768, 64);
  memory_barrier();
}

// Mask, max, exp and sum per lane over the chunk (lens: each lane's keys in this chunk); scores become e
inline void attn_softmax(AttnScratch& w, const int32_t* lens, int64_t tiles) {
  const __m512i len = _mm512_loadu_si512(lens);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 top = neg_inf;
  for (int64_t j = 0; j < tiles * 16; ++j) {
    const __mmask16 valid = _mm512_cmpgt_epi32_mask(len, _mm512_set1_epi32(static_cast<int>(j)));
    const __m512 s = _mm512_mask_mov_ps(neg_inf, valid, _mm512_load_ps(w.scores + j * 16));
    _mm512_store_ps(w.scores + j * 16, s);
    top = _mm512_max_ps(top, s);
  }
  const __m512 safe = _mm512_mask_mov_ps(top, _mm512_cmp_ps_mask(top, neg_inf, _CMP_EQ_OQ), _mm512_setzero_ps());
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < tiles * 16; ++j) {
    const at::vec::Vectorized<float> d(_mm512_sub_ps(_mm512_load_ps(w.scores + j * 16), safe));
    const __m512 e = d.exp_u20();
    _mm512_store_ps(w.scores + j * 16, e);
    total = _mm512_add_ps(total, e);
  }
  for (int64_t j = tiles * 16; j < kAttnKeys; ++j) _mm512_store_ps(w.scores + j * 16, _mm512_setzero_ps());
  _mm512_storeu_ps(w.top, top);
  _mm512_storeu_ps(w.total, total);
}

// e (keys x lanes) -> P's A tiles: lane rows of 32 keys per half, split in kSplits parts, for lanes [0, lanes)
// (the rows of other lanes are left as they are: a tile row only ever reaches its own output row)
inline void attn_pack_p(AttnScratch& w, int64_t lanes) {
  for (int t = 0; t < 2; ++t) {
    __m512 a[16], b[16];
    for (int j = 0; j < 16; ++j) {
      a[j] = _mm512_load_ps(w.scores + (32 * t + j) * 16);
      b[j] = _mm512_load_ps(w.scores + (32 * t + 16 + j) * 16);
    }
    tinylm_invariant::transpose16(a);  // a[L]: lane L's e for keys 32t .. 32t + 15
    tinylm_invariant::transpose16(b);
    for (int64_t L = 0; L < lanes; ++L) {
      __m512i parts[kSplits];
      split_row(a[L], b[L], parts);
      for (int k = 0; k < kSplits; ++k) _mm512_store_si512(w.p + ((k * 2 + t) * 16 + L) * 32, parts[k]);
    }
  }
}

// V rows of the chunk's keys (n of them; zeros past n) as B tiles of key pairs x 16 dims
template <typename Row>
void attn_pack_v(AttnScratch& w, Row v_row, int64_t n, int64_t dim) {
  static const __m512i lo = [] {
    alignas(64) uint16_t idx[32];
    for (int i = 0; i < 32; ++i) idx[i] = static_cast<uint16_t>(i % 2 ? 32 + i / 2 : i / 2);
    return _mm512_load_si512(idx);
  }();
  static const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  const int64_t dim_tiles = dim / 16;
  for (int64_t q = 0; q < kAttnKeys / 2; ++q) {
    const uint16_t* a = 2 * q < n ? v_row(2 * q) : nullptr;
    const uint16_t* b = 2 * q + 1 < n ? v_row(2 * q + 1) : nullptr;
    uint32_t* row = w.v + (q / 16) * dim_tiles * 256 + (q % 16) * 16;
    for (int64_t e = 0; e < dim / 32; ++e) {
      const __m512i x = a ? _mm512_loadu_si512(a + 32 * e) : _mm512_setzero_si512();
      const __m512i y = b ? _mm512_loadu_si512(b + 32 * e) : _mm512_setzero_si512();
      _mm512_store_si512(row + (2 * e) * 256, _mm512_permutex2var_epi16(x, lo, y));
      _mm512_store_si512(row + (2 * e + 1) * 256, _mm512_permutex2var_epi16(x, hi, y));
    }
  }
}

// out (lanes x D) = P . V: per group of 4 dim tiles, (key half, part) in order
inline void attn_values(AttnScratch& w, int64_t dim) {
  const int64_t dim_tiles = dim / 16;
  for (int64_t g = 0; g < dim_tiles; g += 4) {
    const int64_t nt = std::min<int64_t>(4, dim_tiles - g);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    memory_barrier();
    for (int t = 0; t < 2; ++t) {
      const uint32_t* v = w.v + (t * dim_tiles + g) * 256;
      _tile_loadd(5, v, 64);  // the V tiles stay for the parts: B in 5, 6 (and 7, 5 again: 4 dim tiles)
      _tile_loadd(6, v + 256, 64);
      for (int k = 0; k < kSplits; ++k) {
        _tile_loadd(4, w.p + (k * 2 + t) * 16 * 32, 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_dpbf16ps(1, 4, 6);
      }
      if (nt > 2) {
        _tile_loadd(5, v + 512, 64);
        _tile_loadd(7, v + 768, 64);
        for (int k = 0; k < kSplits; ++k) {
          _tile_loadd(4, w.p + (k * 2 + t) * 16 * 32, 64);
          _tile_dpbf16ps(2, 4, 5);
          _tile_dpbf16ps(3, 4, 7);
        }
      }
    }
    float* out = w.out + g * 16;
    _tile_stored(0, out, dim * 4);
    _tile_stored(1, out + 16, dim * 4);
    if (nt > 2) {
      _tile_stored(2, out + 32, dim * 4);
      _tile_stored(3, out + 48, dim * 4);
    }
    memory_barrier();
  }
}

}  // namespace tinylm_amx
