// One-query attention over the paged K/V pool: the decode step's attention, read where the cache keeps it.
//
// q (B, H, D) float32, k_pool / v_pool (N, H_kv, D) float32 | bfloat16 | float16, slots (B, S) int64 (row b's
// context, right-aligned, padding at slot 0), valid (B, S) bool or None -> out (B, H, D) float32.
// The H / H_kv query heads of a K/V head (GQA) share every K/V row they read.
//
// Work is split flash-decoding style into items of (row, K/V head, chunk of kChunk keys): enough items for every
// thread at batch 1 (3 K/V heads alone would leave a thread idle), each writing a partial softmax (max m, sum l,
// unnormalized output) that a second pass combines. Rows are ATen's Vectorized<float> (16 lanes on AVX-512), at the
// width PyTorch picked for this CPU (tinylm/kernels/__init__.py builds with -march=native). Measured on the 2-core
// EPYC (default model's shapes, bf16 cache): 7-10 us at batch 1 / 150 keys and 54 us at batch 16 / 140 keys per
// layer, against 28-33 and 116-131 us for Inductor's loops over the same pool. The work is instructions, not memory
// (a pool that fits in L2 is as slow): each item widens its rows once and sums scores 16 keys at a time.

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 64;   // keys per work item
constexpr int64_t kMaxDim = 256; // head size limit (checked by the caller)
constexpr int64_t kMaxGroup = 16;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

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

// parts[j] (Vec::size() of them) -> one vector whose lane j is the sum of parts[j]'s lanes. On AVX-512 a
// transpose-and-add tree: 45 shuffles and adds for 16 sums, where reducing each vector alone takes ~150.
inline Vec sum_each(const Vec* parts) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 c[8], d[4], e[2];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    const __m512 a = parts[2 * i], b = parts[2 * i + 1];
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
    Vec part = parts[j];
    sums[j] = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, part);
  }
  return Vec::loadu(sums);
#endif
}

// Item (b, kv head, keys [s0, s1)) for its G query heads, written to part (G, D + 2): per head the max score m,
// the sum l of exp(score - m), then the D sums of exp(score - m) * v. NV = D / Vec::size() vectors per head row, a compile-time constant for
// the usual head sizes (the row then lives in registers), 0 for any other multiple of the vector width.
// The chunk's K and V rows are widened to float once (masked rows as zeros: their slot may hold anything), then
// read by every query head of the group; scores are summed Vec::size() keys at a time (sum_each).
template <typename T, int NV>
void attend_chunk(const float* q, const T* keys, const T* values, const int64_t* slots, const bool* valid,
                  int64_t s0, int64_t s1, int64_t kv_head, int64_t kv_heads, int64_t groups, int64_t head_dim,
                  float scale, float* part) {
  constexpr int kSlots = NV > 0 ? NV : kMaxDim / Vec::size();
  constexpr int64_t kLanes = Vec::size();
  const int nv = NV > 0 ? NV : static_cast<int>(head_dim / kLanes);
  const int64_t dim = nv * kLanes;
  const int64_t stride = kv_heads * dim;  // one slot's K (or V) rows, all heads
  const int64_t n = s1 - s0;
  alignas(64) float scores[kMaxGroup][kChunk];
  alignas(64) float k_rows[kChunk * kMaxDim];
  alignas(64) float v_rows[kChunk * kMaxDim];
  for (int64_t j = 0; j < n; ++j) {
    const int64_t s = s0 + j;
    const bool real = valid == nullptr || valid[s];
    const T* k_row = keys + slots[s] * stride + kv_head * dim;
    const T* v_row = values + slots[s] * stride + kv_head * dim;
    for (int i = 0; i < nv; ++i) {
      (real ? load_vec(k_row + i * kLanes) : Vec(0.f)).store(k_rows + j * dim + i * kLanes);
      (real ? load_vec(v_row + i * kLanes) : Vec(0.f)).store(v_rows + j * dim + i * kLanes);
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    Vec qg[kSlots];
    for (int i = 0; i < nv; ++i) qg[i] = Vec::loadu(q + g * dim + i * kLanes) * Vec(scale);
    for (int64_t j0 = 0; j0 < n; j0 += kLanes) {
      Vec parts[kLanes];
      for (int64_t jj = 0; jj < kLanes; ++jj) {
        if (j0 + jj >= n) {
          parts[jj] = Vec(0.f);
          continue;
        }
        const float* row = k_rows + (j0 + jj) * dim;
        Vec sum = qg[0] * Vec::loadu(row);
        for (int i = 1; i < nv; ++i) sum = at::vec::fmadd(qg[i], Vec::loadu(row + i * kLanes), sum);
        parts[jj] = sum;
      }
      sum_each(parts).store(&scores[g][j0]);  // kChunk is a multiple of kLanes: stays inside the row
    }
    if (valid != nullptr) {
      for (int64_t j = 0; j < n; ++j) scores[g][j] = valid[s0 + j] ? scores[g][j] : kNegInf;
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    float top = kNegInf;
    for (int64_t j = 0; j < n; ++j) top = scores[g][j] > top ? scores[g][j] : top;
    float total = 0.f;
    if (top != kNegInf) {
      int64_t j = 0;
      for (; j + kLanes <= n; j += kLanes) {
        Vec e = (Vec::loadu(&scores[g][j]) - Vec(top)).exp_u20();
        e.store(&scores[g][j]);
        total += at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, e);
      }
      for (; j < n; ++j) {
        scores[g][j] = std::exp(scores[g][j] - top);
        total += scores[g][j];
      }
    }
    part[g * (dim + 2)] = top;
    part[g * (dim + 2) + 1] = total;
  }
  for (int64_t g = 0; g < groups; ++g) {
    Vec out[kSlots];
    for (int i = 0; i < nv; ++i) out[i] = Vec(0.f);
    if (part[g * (dim + 2)] != kNegInf) {  // masked keys weigh exp(-inf) = 0 against zero rows
      for (int64_t j = 0; j < n; ++j) {
        const Vec p(scores[g][j]);
        const float* row = v_rows + j * dim;
        for (int i = 0; i < nv; ++i) out[i] = at::vec::fmadd(p, Vec::loadu(row + i * kLanes), out[i]);
      }
    }
    for (int i = 0; i < nv; ++i) out[i].store(part + g * (dim + 2) + 2 + i * kLanes);
  }
}

template <typename T>
void attend_chunk(const float* q, const T* keys, const T* values, const int64_t* slots, const bool* valid,
                  int64_t s0, int64_t s1, int64_t kv_head, int64_t kv_heads, int64_t groups, int64_t dim,
                  float scale, float* part) {
#define TINYLM_CHUNK(NV) \
  attend_chunk<T, NV>(q, keys, values, slots, valid, s0, s1, kv_head, kv_heads, groups, dim, scale, part)
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
void run(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& slots,
         const bool* valid, float scale, at::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_pool.size(1), groups = heads / kv_heads, context = slots.size(1);
  const int64_t chunks = (context + kChunk - 1) / kChunk;
  const int64_t items = batch * kv_heads * chunks;
  // per item and query head: m, l, then D output sums
  at::Tensor partial = at::empty({items, groups, dim + 2}, q.options());
  const float* qp = q.data_ptr<float>();
  const T* kp = k_pool.data_ptr<T>();
  const T* vp = v_pool.data_ptr<T>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t chunk = item % chunks, kv_head = (item / chunks) % kv_heads, b = item / (chunks * kv_heads);
      const int64_t s0 = chunk * kChunk, s1 = std::min(context, s0 + kChunk);
      attend_chunk<T>(qp + (b * heads + kv_head * groups) * dim, kp, vp, sp + b * context,
                      valid == nullptr ? nullptr : valid + b * context, s0, s1, kv_head, kv_heads, groups, dim,
                      scale, pp + item * groups * (dim + 2));
    }
  });
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads, kv_head = h / groups, g = h % groups;
      const float* first = pp + ((b * kv_heads + kv_head) * chunks) * groups * (dim + 2) + g * (dim + 2);
      const int64_t step = groups * (dim + 2);  // next chunk of the same (row, head)
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

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                           const at::Tensor& slots, const c10::optional<at::Tensor>& valid, double scale) {
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
    case at::kFloat: run<float>(q, k_pool, v_pool, slots, valid_ptr, s, out); break;
    case at::kBFloat16: run<c10::BFloat16>(q, k_pool, v_pool, slots, valid_ptr, s, out); break;
    case at::kHalf: run<c10::Half>(q, k_pool, v_pool, slots, valid_ptr, s, out); break;
    default: TORCH_CHECK(false, "unsupported cache dtype ", k_pool.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinylm, m) {
  m.def("paged_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor slots, Tensor? valid, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinylm, CPU, m) { m.impl("paged_attention", &paged_attention); }
