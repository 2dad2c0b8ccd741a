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
// A chunk and the combination of chunks are attend_chunk.h's, shared with invariant_attention.cpp (the
// batch-invariant variant: chunks counted from each sequence's first key instead of the batch's slot axis).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <algorithm>
#include <limits>
#include <type_traits>

#include "attend_chunk.h"

namespace {

using namespace tinylm_rows;
using namespace tinylm_attend;

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
      combine_chunks(first, step, chunks, dim, op + bh * dim);
    }
  });
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
