// One (query row, K/V head, chunk of keys) of attention over the paged K/V pool: the unit both
// decode_attention.cpp (flash-decoding over a batch's slot axis) and invariant_attention.cpp (chunks anchored at
// each sequence's first key) are built from, so that both compute a chunk with the same floating-point operations.
// Also the ordered combination of a row's chunk partials and the int8 pools' row-scale check.

#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "vec_rows.h"

namespace tinylm_attend {

using namespace tinylm_rows;
constexpr int64_t kChunk = 64;   // keys per work item
constexpr int64_t kMaxDim = 256; // head size limit (checked by the caller)
constexpr int64_t kMaxGroup = 16;
constexpr int64_t kPrefetchKeys = 8;  // how many keys ahead a row's K and V are prefetched (4: slower, 16: same)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();


// sums[h] (in the rows' element order) = the sum over the n keys of weights[h][j] * V row j, for HB heads at
// once. HB is a compile-time constant so the HB x NV accumulators live in registers: with a run-time head count
// they lived on the stack, and each key's multiply-add waited on the previous key's store.
template <bool kPaired, int NV, int HB, typename T>
void weigh_values(const T* values, const int64_t* offset, int64_t n, const float* const* weights, int nv,
                  float (*sums)[kMaxDim]) {
  constexpr int kSlots = NV > 0 ? NV : kMaxDim / Vec::size();
  Vec out[HB][kSlots];  // Vectorized's constructor zeroes it
  for (int64_t j = 0; j < n; ++j) {
    Vec v[kSlots];
    widen<kPaired>(values + offset[j], nv, v);
    for (int h = 0; h < HB; ++h) {
      const Vec w(weights[h][j]);
      for (int i = 0; i < nv; ++i) out[h][i] = at::vec::fmadd(w, v[i], out[h][i]);
    }
  }
  for (int h = 0; h < HB; ++h) {
    for (int i = 0; i < nv; ++i) out[h][i].store(sums[h] + i * Vec::size());
  }
}

// weigh_values for a run-time head count 1..kMax
template <bool kPaired, int NV, int kMax, typename T>
void weigh_values(int heads, const T* values, const int64_t* offset, int64_t n, const float* const* weights, int nv,
                  float (*sums)[kMaxDim]) {
  if constexpr (kMax > 1) {
    if (heads < kMax) return weigh_values<kPaired, NV, kMax - 1>(heads, values, offset, n, weights, nv, sums);
  }
  weigh_values<kPaired, NV, kMax>(values, offset, n, weights, nv, sums);
}

// Several query rows over the same keys (a block of a prefill chunk): `count` rows of G heads each, row i's heads
// at q + i * q_step, its partials at part + i * part_step. Every head's numbers are those it gets alone: the heads
// only share the loads of K and V rows.
struct QueryRows {
  int64_t count = 1, q_step = 0, part_step = 0;
};

// Item (b, kv head, keys [s0, s1)) for its G query heads (of each of rows.count query rows), written to part
// (G, D + 2) (per query row): per head the max score m,
// the sum l of exp(score - m), then the D sums of exp(score - m) * v. NV = D / Vec::size() vectors per head row,
// a compile-time constant for the usual head sizes (rows then live in registers), 0 for any other multiple of the
// vector width. Masked keys are dropped first (their slots may hold anything, NaN included), so padding costs
// nothing. Each K row is widened once, in registers, and dotted with every query head of the group (scores
// summed Vec::size() keys at a time by sum_each); each V row likewise feeds up to kHeadBlock heads' outputs.
// int8 rows (k_scales / v_scales non-null): a key's score is its codes' dot product times its scale, and a value
// row's weight is its probability times its scale, so rows are widened as codes and never rescaled.
template <typename T, int NV>
void attend_chunk(const float* q, const T* keys, const T* values, const float* k_scales, const float* v_scales,
                  const int64_t* slots, const bool* valid, int64_t s0, int64_t s1, int64_t kv_head,
                  int64_t kv_heads, int64_t groups, int64_t head_dim, float scale, int64_t fetch, float* part,
                  QueryRows rows = {}) {
  constexpr int kSlots = NV > 0 ? NV : kMaxDim / Vec::size();
  constexpr int64_t kLanes = Vec::size();
  const int nv = NV > 0 ? NV : static_cast<int>(head_dim / kLanes);
  const int64_t dim = nv * kLanes;
  const int64_t heads = groups * rows.count;  // at most kMaxGroup (checked by the caller)
  const auto part_of = [&](int64_t g) { return part + g / groups * rows.part_step + g % groups * (dim + 2); };
  constexpr bool kScaled = std::is_same_v<T, int8_t>;
  int64_t offset[kChunk];  // element offset of each unmasked key's row (K and V pools share the layout)
  alignas(64) float k_scale[kChunk], v_scale[kChunk];  // int8 rows' scales, padded with 0 to whole vectors
  int64_t n = 0;
  for (int64_t s = s0; s < s1; ++s) {
    if (valid != nullptr && !valid[s]) continue;
    const int64_t row = slots[s] * kv_heads + kv_head;
    if constexpr (kScaled) {
      k_scale[n] = k_scales[row];
      v_scale[n] = v_scales[row];
    }
    offset[n++] = row * dim;
  }
  if constexpr (kScaled) {
    for (int64_t j = n; j < (n + kLanes - 1) / kLanes * kLanes; ++j) k_scale[j] = v_scale[j] = 0.f;
  }
  constexpr bool kPaired = kPairedRows<T> && NV > 0 && NV % 2 == 0;
  for (int64_t j = 0; j < std::min(n, kPrefetchKeys); ++j) {
    prefetch_row(keys + offset[j], fetch);
    prefetch_row(values + offset[j], fetch);
  }
  alignas(64) float scaled_q[kMaxGroup][kMaxDim];  // in the rows' element order
  for (int64_t g = 0; g < heads; ++g) {
    to_row_order<kPaired>(q + g / groups * rows.q_step + g % groups * dim, scale, dim, scaled_q[g]);
  }
  // scores (G, n), padded with -inf to whole vectors so the softmax below needs no scalar tail
  alignas(64) float scores[kMaxGroup][kChunk];
  for (int64_t j0 = 0; j0 < n; j0 += kLanes) {
    // per head, one partial-sum vector per key (floats, not Vec: ATen's Vectorized zeroes itself on construction)
    alignas(64) float parts[kMaxGroup][kLanes * kLanes];
    for (int64_t jj = 0; jj < kLanes; ++jj) {
      const int64_t j = j0 + jj;
      if (j >= n) {
        for (int64_t g = 0; g < heads; ++g) Vec(0.f).store(&parts[g][jj * kLanes]);
        continue;
      }
      if (j + kPrefetchKeys < n) {  // records sit in scattered cache blocks: fetch ahead of use (V for the pass below)
        prefetch_row(keys + offset[j + kPrefetchKeys], fetch);
        prefetch_row(values + offset[j + kPrefetchKeys], fetch);
      }
      Vec k[kSlots];
      widen<kPaired>(keys + offset[j], nv, k);
      for (int64_t g = 0; g < heads; ++g) {
        Vec sum = Vec::loadu(&scaled_q[g][0]) * k[0];
        for (int i = 1; i < nv; ++i) sum = at::vec::fmadd(Vec::loadu(&scaled_q[g][i * kLanes]), k[i], sum);
        sum.store(&parts[g][jj * kLanes]);
      }
    }
    for (int64_t g = 0; g < heads; ++g) {
      Vec sums = sum_each(parts[g]);
      if constexpr (kScaled) sums = sums * Vec::loadu(&k_scale[j0]);
      sums.store(&scores[g][j0]);
    }
  }
  const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
  for (int64_t g = 0; g < heads; ++g) {
    for (int64_t j = n; j < padded; ++j) scores[g][j] = kNegInf;
    Vec top_vec(kNegInf);
    for (int64_t j = 0; j < padded; j += kLanes) top_vec = at::vec::maximum(top_vec, Vec::loadu(&scores[g][j]));
    const float top = n == 0 ? kNegInf : at::vec::vec_reduce_all<float>(
        [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, top_vec);
    Vec total(0.f);
    for (int64_t j = 0; j < padded; j += kLanes) {
      const Vec e = (Vec::loadu(&scores[g][j]) - Vec(top)).exp_u20();  // exp(-inf) = 0 for the padding
      e.store(&scores[g][j]);
      total = total + e;
    }
    part_of(g)[0] = top;
    part_of(g)[1] = n == 0 ? 0.f : at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, total);
    if constexpr (kScaled) {  // the value rows' weights: exp(score - m) x the row's scale
      for (int64_t j = 0; j < padded; j += kLanes) {
        (Vec::loadu(&scores[g][j]) * Vec::loadu(&v_scale[j])).store(&scores[g][j]);
      }
    }
  }
  // outputs, up to kHeadBlock heads per pass over the V rows
  constexpr int kHeadBlock = NV == 8 ? 2 : (NV > 0 && NV <= 4 ? 4 : 1);
  for (int64_t g0 = 0; g0 < heads; g0 += kHeadBlock) {
    const int block = static_cast<int>(std::min<int64_t>(kHeadBlock, heads - g0));
    const float* weights[kHeadBlock];
    for (int h = 0; h < block; ++h) weights[h] = scores[g0 + h];
    alignas(64) float sums[kHeadBlock][kMaxDim];
    weigh_values<kPaired, NV, kHeadBlock>(block, values, offset, n, weights, nv, sums);
    for (int h = 0; h < block; ++h) from_row_order<kPaired>(sums[h], dim, part_of(g0 + h) + 2);
  }
}

template <typename T>
void attend_chunk(const float* q, const T* keys, const T* values, const float* k_scales, const float* v_scales,
                  const int64_t* slots, const bool* valid, int64_t s0, int64_t s1, int64_t kv_head,
                  int64_t kv_heads, int64_t groups, int64_t dim, float scale, int64_t fetch, float* part,
                  QueryRows rows = {}) {
#define TINYLM_CHUNK(NV) \
  attend_chunk<T, NV>(q, keys, values, k_scales, v_scales, slots, valid, s0, s1, kv_head, kv_heads, groups, dim, \
                      scale, fetch, part, rows)
  switch (dim / Vec::size()) {
    case 2: return TINYLM_CHUNK(2);
    case 4: return TINYLM_CHUNK(4);
    case 8: return TINYLM_CHUNK(8);
    case 16: return TINYLM_CHUNK(16);
    default: return TINYLM_CHUNK(0);
  }
#undef TINYLM_CHUNK
}

// A (row, query head)'s output, dim floats at dst, from its chunks' partials (m, l, D sums; `step` floats apart),
// combined in chunk order: the result depends on the partials and their order only, never on the thread.
inline void combine_chunks(const float* first, int64_t step, int64_t chunks, int64_t dim, float* dst) {
  float top = kNegInf;
  for (int64_t c = 0; c < chunks; ++c) top = std::max(top, first[c * step]);
  float total = 0.f;
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) dst[d] = 0.f;
  for (int64_t c = 0; c < chunks; ++c) {
    const float* part = first + c * step;
    if (part[0] == kNegInf) continue;
    const float w = std::exp(part[0] - top);
    total += w * part[1];
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) dst[d] += w * part[2 + d];
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) dst[d] *= inv;
}

// (N, H_kv) float32 scales of an int8 pool's rows
inline const float* row_scales(const c10::optional<at::Tensor>& scales, const at::Tensor& pool, const char* name) {
  TORCH_CHECK(scales.has_value(), name, ": an int8 pool needs its row scales");
  TORCH_CHECK(scales->dim() == 2 && scales->size(0) == pool.size(0) && scales->size(1) == pool.size(1) &&
                  scales->scalar_type() == at::kFloat && scales->is_contiguous(),
              name, ": contiguous (N, H_kv) float32");
  return scales->data_ptr<float>();
}

}  // namespace tinylm_attend
