// One-query attention over the paged K/V pool: the decode step's attention, read where the cache keeps it.
//
// q (B, H, D) float32, k_pool / v_pool (N, H_kv, D) float32 | bfloat16 | float16 | int8, slots (B, S) int64 (row
// b's context, right-aligned, padding at slot 0), valid (B, S) bool or None, and for int8 pools k_scales / v_scales
// (N, H_kv) float32 (a row's value = its int8 codes x its scale; tinylm/engine/kv_pool.py) -> out (B, H, D) float32.
// The H / H_kv query heads of a K/V head (GQA) share every K/V row they read.
//
// Work is split flash-decoding style into items of (row, chunk of kChunk keys), each over every K/V head (a
// key's rows for all heads are one contiguous record of the pool), or, when that leaves a thread idle (a row or
// two), of (row, K/V head, chunk); each writes a partial softmax (max m, sum l, unnormalized output) that a second
// pass combines. Rows are ATen's Vectorized<float> (vec_rows.h), at the width PyTorch picked for this CPU
// (tinylm/kernels/__init__.py builds with -march=native). Measured on the 2-core EPYC (default model's shapes, bf16
// cache): ~11 us at batch 1 / 150 keys; at batch 16 / 140 keys 41 us with the pool in cache and ~80 us with it in
// memory (int8 pool ~60), as in the decode step, where the weights streaming through L3 evict it (Inductor's loops
// over the same pool: 28-33 and 116-131 us from cache). Hence the prefetch of K/V records.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <algorithm>
#include <limits>
#include <type_traits>

#include "vec_rows.h"

namespace {

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

// Item (b, kv head, keys [s0, s1)) for its G query heads, written to part (G, D + 2): per head the max score m,
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
                  int64_t kv_heads, int64_t groups, int64_t head_dim, float scale, int64_t fetch, float* part) {
  constexpr int kSlots = NV > 0 ? NV : kMaxDim / Vec::size();
  constexpr int64_t kLanes = Vec::size();
  const int nv = NV > 0 ? NV : static_cast<int>(head_dim / kLanes);
  const int64_t dim = nv * kLanes;
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
  for (int64_t g = 0; g < groups; ++g) to_row_order<kPaired>(q + g * dim, scale, dim, scaled_q[g]);
  // scores (G, n), padded with -inf to whole vectors so the softmax below needs no scalar tail
  alignas(64) float scores[kMaxGroup][kChunk];
  for (int64_t j0 = 0; j0 < n; j0 += kLanes) {
    // per head, one partial-sum vector per key (floats, not Vec: ATen's Vectorized zeroes itself on construction)
    alignas(64) float parts[kMaxGroup][kLanes * kLanes];
    for (int64_t jj = 0; jj < kLanes; ++jj) {
      const int64_t j = j0 + jj;
      if (j >= n) {
        for (int64_t g = 0; g < groups; ++g) Vec(0.f).store(&parts[g][jj * kLanes]);
        continue;
      }
      if (j + kPrefetchKeys < n) {  // records sit in scattered cache blocks: fetch ahead of use (V for the pass below)
        prefetch_row(keys + offset[j + kPrefetchKeys], fetch);
        prefetch_row(values + offset[j + kPrefetchKeys], fetch);
      }
      Vec k[kSlots];
      widen<kPaired>(keys + offset[j], nv, k);
      for (int64_t g = 0; g < groups; ++g) {
        Vec sum = Vec::loadu(&scaled_q[g][0]) * k[0];
        for (int i = 1; i < nv; ++i) sum = at::vec::fmadd(Vec::loadu(&scaled_q[g][i * kLanes]), k[i], sum);
        sum.store(&parts[g][jj * kLanes]);
      }
    }
    for (int64_t g = 0; g < groups; ++g) {
      Vec sums = sum_each(parts[g]);
      if constexpr (kScaled) sums = sums * Vec::loadu(&k_scale[j0]);
      sums.store(&scores[g][j0]);
    }
  }
  const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
  for (int64_t g = 0; g < groups; ++g) {
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
    part[g * (dim + 2)] = top;
    part[g * (dim + 2) + 1] = n == 0 ? 0.f : at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, total);
    if constexpr (kScaled) {  // the value rows' weights: exp(score - m) x the row's scale
      for (int64_t j = 0; j < padded; j += kLanes) {
        (Vec::loadu(&scores[g][j]) * Vec::loadu(&v_scale[j])).store(&scores[g][j]);
      }
    }
  }
  // outputs, up to kHeadBlock heads per pass over the V rows
  constexpr int kHeadBlock = NV == 8 ? 2 : (NV > 0 && NV <= 4 ? 4 : 1);
  for (int64_t g0 = 0; g0 < groups; g0 += kHeadBlock) {
    const int heads = static_cast<int>(std::min<int64_t>(kHeadBlock, groups - g0));
    const float* weights[kHeadBlock];
    for (int h = 0; h < heads; ++h) weights[h] = scores[g0 + h];
    alignas(64) float sums[kHeadBlock][kMaxDim];
    weigh_values<kPaired, NV, kHeadBlock>(heads, values, offset, n, weights, nv, sums);
    for (int h = 0; h < heads; ++h) from_row_order<kPaired>(sums[h], dim, part + (g0 + h) * (dim + 2) + 2);
  }
}

template <typename T>
void attend_chunk(const float* q, const T* keys, const T* values, const float* k_scales, const float* v_scales,
                  const int64_t* slots, const bool* valid, int64_t s0, int64_t s1, int64_t kv_head,
                  int64_t kv_heads, int64_t groups, int64_t dim, float scale, int64_t fetch, float* part) {
#define TINYLM_CHUNK(NV) \
  attend_chunk<T, NV>(q, keys, values, k_scales, v_scales, slots, valid, s0, s1, kv_head, kv_heads, groups, dim, \
                      scale, fetch, part)
  switch (dim / Vec::size()) {
    case 2: return TINYLM_CHUNK(2);
    case 4: return TINYLM_CHUNK(4);
    case 8: return TINYLM_CHUNK(8);
    case 16: return TINYLM_CHUNK(16);
    default: return TINYLM_CHUNK(0);
  }
#undef TINYLM_CHUNK
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool, const float* k_scales,
         const float* v_scales, const at::Tensor& slots, const bool* valid, float scale, at::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_pool.size(1), groups = heads / kv_heads, context = slots.size(1);
  const int64_t chunks = (context + kChunk - 1) / kChunk;
  // Items of (row, chunk of keys) each over every K/V head in turn when there are enough of them (4 per thread):
  // a key's rows for all K/V heads are one contiguous record, read from memory once, by head 0's pass, instead
  // of as scattered per-head pieces (batch 16 / 140 keys, pool in memory: 93 -> 79 us per layer, int8 81 -> 55).
  // Else (a row or two) items of (row, chunk, K/V head), so that every thread has work.
  const bool whole_records = batch * chunks >= 4 * at::get_num_threads();
  const int64_t heads_per_item = whole_records ? kv_heads : 1;
  const int64_t items = batch * chunks * (kv_heads / heads_per_item);
  // per (row, chunk), K/V head and query head of its group: m, l, then D output sums
  at::Tensor partial = at::empty({batch * chunks, kv_heads, groups, dim + 2}, q.options());
  const float* qp = q.data_ptr<float>();
  const T* kp = k_pool.data_ptr<T>();
  const T* vp = v_pool.data_ptr<T>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t first_head = item % (kv_heads / heads_per_item) * heads_per_item;
      const int64_t row_chunk = item / (kv_heads / heads_per_item), b = row_chunk / chunks;
      const int64_t s0 = row_chunk % chunks * kChunk, s1 = std::min(context, s0 + kChunk);
      for (int64_t kv_head = first_head; kv_head < first_head + heads_per_item; ++kv_head) {
        const int64_t fetch = !whole_records ? dim : (kv_head == 0 ? kv_heads * dim : 0);  // elements to prefetch
        attend_chunk<T>(qp + (b * heads + kv_head * groups) * dim, kp, vp, k_scales, v_scales, sp + b * context,
                        valid == nullptr ? nullptr : valid + b * context, s0, s1, kv_head, kv_heads, groups, dim,
                        scale, fetch, pp + (row_chunk * kv_heads + kv_head) * groups * (dim + 2));
      }
    }
  });
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads, kv_head = h / groups, g = h % groups;
      const float* first = pp + ((b * chunks * kv_heads + kv_head) * groups + g) * (dim + 2);
      const int64_t step = kv_heads * groups * (dim + 2);  // next chunk of the same (row, head)
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < chunks; ++c) top = std::max(top, first[c * step]);
      float* dst = op + bh * dim;
      float total = 0.f;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) dst[d] = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* part = first + c * step;
        if (part[0] == -std::numeric_limits<float>::infinity()) continue;
        const float w = std::exp(part[0] - top);
        total += w * part[1];
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) dst[d] += w * part[2 + d];
      }
      const float inv = total > 0.f ? 1.f / total : 0.f;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) dst[d] *= inv;
    }
  });
}

// (N, H_kv) float32 scales of an int8 pool's rows
const float* row_scales(const c10::optional<at::Tensor>& scales, const at::Tensor& pool, const char* name) {
  TORCH_CHECK(scales.has_value(), name, ": an int8 pool needs its row scales");
  TORCH_CHECK(scales->dim() == 2 && scales->size(0) == pool.size(0) && scales->size(1) == pool.size(1) &&
                  scales->scalar_type() == at::kFloat && scales->is_contiguous(),
              name, ": contiguous (N, H_kv) float32");
  return scales->data_ptr<float>();
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                           const at::Tensor& slots, const c10::optional<at::Tensor>& valid, double scale,
                           const c10::optional<at::Tensor>& k_scales, const c10::optional<at::Tensor>& v_scales) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q: contiguous (B, H, D) float32");
  TORCH_CHECK(k_pool.dim() == 3 && k_pool.is_contiguous() && v_pool.is_contiguous() &&
                  k_pool.sizes() == v_pool.sizes() && k_pool.scalar_type() == v_pool.scalar_type(),
              "k_pool / v_pool: contiguous (N, H_kv, D) of one dtype");
  const int64_t dim = q.size(2);
  TORCH_CHECK(k_pool.size(2) == dim && dim <= kMaxDim && dim % 16 == 0, "head size ", dim,
              " is not supported (a multiple of 16, at most 256)");
  TORCH_CHECK(q.size(1) % k_pool.size(1) == 0 && q.size(1) / k_pool.size(1) <= kMaxGroup, "bad GQA grouping");
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == q.size(0) && slots.scalar_type() == at::kLong &&
                  slots.is_contiguous(), "slots: contiguous (B, S) int64");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < slots.numel(); ++i) {
    TORCH_CHECK(slot[i] >= 0 && slot[i] < k_pool.size(0), "slots: ", slot[i], " is outside the pool (",
                k_pool.size(0), " slots)");
  }
  const bool* valid_ptr = nullptr;
  if (valid.has_value()) {
    TORCH_CHECK(valid->sizes() == slots.sizes() && valid->scalar_type() == at::kBool && valid->is_contiguous(),
                "valid: contiguous (B, S) bool");
    valid_ptr = valid->data_ptr<bool>();
  }
  at::Tensor out = at::empty_like(q);
  const float s = static_cast<float>(scale);
  switch (k_pool.scalar_type()) {
    case at::kFloat: run<float>(q, k_pool, v_pool, nullptr, nullptr, slots, valid_ptr, s, out); break;
    case at::kBFloat16: run<c10::BFloat16>(q, k_pool, v_pool, nullptr, nullptr, slots, valid_ptr, s, out); break;
    case at::kHalf: run<c10::Half>(q, k_pool, v_pool, nullptr, nullptr, slots, valid_ptr, s, out); break;
    case at::kChar:
      run<int8_t>(q, k_pool, v_pool, row_scales(k_scales, k_pool, "k_scales"), row_scales(v_scales, v_pool, "v_scales"),
                  slots, valid_ptr, s, out);
      break;
    default: TORCH_CHECK(false, "unsupported cache dtype ", k_pool.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinylm, m) {
  m.def("paged_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor slots, Tensor? valid, float scale, "
        "Tensor? k_scales=None, Tensor? v_scales=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinylm, CPU, m) { m.impl("paged_attention", &paged_attention); }
