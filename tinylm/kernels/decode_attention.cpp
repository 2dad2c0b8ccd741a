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
// EPYC (default model's shapes, bf16 cache): 8-9 us at batch 1 / 150 keys; at batch 16 / 140 keys 41 us with the
// pool in cache and ~92 us with it in memory, as in the decode step, where the weights streaming through L3 evict
// it (Inductor's loops over the same pool: 28-33 and 116-131 us from cache). Hence the prefetch of K/V rows.

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
#include <algorithm>
#include <limits>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 64;   // keys per work item
constexpr int64_t kMaxDim = 256; // head size limit (checked by the caller)
constexpr int64_t kMaxGroup = 16;
constexpr int64_t kPrefetchKeys = 8;  // how many keys ahead a row's K and V are prefetched (4: slower, 16: same)
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
template <typename T, int NV>
void attend_chunk(const float* q, const T* keys, const T* values, const int64_t* slots, const bool* valid,
                  int64_t s0, int64_t s1, int64_t kv_head, int64_t kv_heads, int64_t groups, int64_t head_dim,
                  float scale, float* part) {
  constexpr int kSlots = NV > 0 ? NV : kMaxDim / Vec::size();
  constexpr int64_t kLanes = Vec::size();
  const int nv = NV > 0 ? NV : static_cast<int>(head_dim / kLanes);
  const int64_t dim = nv * kLanes;
  int64_t offset[kChunk];  // element offset of each unmasked key's row (K and V pools share the layout)
  int64_t n = 0;
  for (int64_t s = s0; s < s1; ++s) {
    if (valid == nullptr || valid[s]) offset[n++] = (slots[s] * kv_heads + kv_head) * dim;
  }
  constexpr bool kPaired = kPairedRows<T> && NV > 0 && NV % 2 == 0;
  for (int64_t j = 0; j < std::min(n, kPrefetchKeys); ++j) {
    prefetch_row(keys + offset[j], dim);
    prefetch_row(values + offset[j], dim);
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
      if (j + kPrefetchKeys < n) {  // rows sit in scattered cache blocks: fetch ahead of use (V for the pass below)
        prefetch_row(keys + offset[j + kPrefetchKeys], dim);
        prefetch_row(values + offset[j + kPrefetchKeys], dim);
      }
      Vec k[kSlots];
      widen<kPaired>(keys + offset[j], nv, k);
      for (int64_t g = 0; g < groups; ++g) {
        Vec sum = Vec::loadu(&scaled_q[g][0]) * k[0];
        for (int i = 1; i < nv; ++i) sum = at::vec::fmadd(Vec::loadu(&scaled_q[g][i * kLanes]), k[i], sum);
        sum.store(&parts[g][jj * kLanes]);
      }
    }
    for (int64_t g = 0; g < groups; ++g) sum_each(parts[g]).store(&scores[g][j0]);
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
