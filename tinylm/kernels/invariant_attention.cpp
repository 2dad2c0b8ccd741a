// Batch-invariant attention over the paged K/V pool, for decode rows and prefill queries alike (issue 21).
//
// q (R, H, D) float32, k_pool / v_pool (N, H_kv, D) float32 | bfloat16 | float16 | int8 (k_scales / v_scales
// (N, H_kv) float32 for int8, as decode_attention.cpp), slots (B, S) int64: each sequence's context slots, in any
// alignment; per query row r: rows[r] its sequence (a row of slots), and keys [starts[r], ends[r]) of that row, its
// sequence's position 0 at starts[r] (a prefill query at position t: ends = starts + t + 1) -> out (R, H, D) float32.
//
// A query's output is the same floating-point operations whatever else is in the call: its keys are cut into
// chunks of kChunk counted from starts[r] (its sequence's first key, never the batch's slot axis), each chunk is
// attend_chunk (attend_chunk.h, the code decode_attention.cpp runs) over exactly that chunk's keys, and the
// chunks' partials are combined in order (combine_chunks). Work items, threads and the batch's padding only
// decide who computes a chunk, never how. So a prompt token scored here equals the same token decoded alone,
// bit for bit, given the same q and the same pool contents.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <vector>

#include "attend_chunk.h"

namespace {

using namespace tinylm_rows;
using namespace tinylm_attend;

// Query rows in blocks: consecutive rows of one sequence (same slots row and start; a prefill chunk's queries), at
// most kMaxGroup / G of them, so that a chunk every one of them sees whole is read once for all their heads
// (decode rows: blocks of one).
// Partials of a block's row i for its chunk c sit at slot first + c * count + i (the rows of a chunk side by side).
struct Block {
  int64_t row, count, chunks, first;
};

std::vector<Block> query_blocks(const int64_t* rows, const int64_t* starts, const int64_t* ends, int64_t queries,
                                int64_t most) {
  std::vector<Block> blocks;
  int64_t slots = 0;
  for (int64_t r = 0; r < queries;) {
    Block block{r, 0, 0, slots};
    const auto joins = [&](int64_t i) {  // rows without keys (padding queries) stay alone
      return i == block.row || (rows[i] == rows[block.row] && starts[i] == starts[block.row] && ends[i] > starts[i] &&
                                ends[block.row] > starts[block.row]);
    };
    for (; r < queries && block.count < most && joins(r); ++r) {
      block.count += 1;
      block.chunks = std::max(block.chunks, (ends[r] - starts[r] + kChunk - 1) / kChunk);
    }
    slots += block.chunks * block.count;
    blocks.push_back(block);
  }
  return blocks;
}

// The pool, the query rows and their key ranges, as every work item reads them.
template <typename T>
struct Inputs {
  const float* q;
  const T *keys, *values;
  const float *k_scales, *v_scales;
  const int64_t *slots, *rows, *starts, *ends;
  int64_t context, heads, kv_heads, dim;
  float scale;

  // chunk c of `block` for K/V heads [h0, h1), partials at `partial` (where the block's slot 0 is at block.first)
  void attend(const Block& block, int64_t c, int64_t h0, int64_t h1, int64_t fetch_all, float* partial) const {
    for (int64_t kv_head = h0; kv_head < h1; ++kv_head) {
      const int64_t fetch = fetch_all == 0 ? dim : (kv_head == 0 ? fetch_all : 0);  // elements to prefetch
      attend_heads(block, c, kv_head, fetch, partial);
    }
  }

  // Chunk c of a block for one K/V head: for all its rows at once where each sees the same keys, else row by row
  // (the diagonal of a prefill chunk). attend_chunk gives each head the same numbers either way.
  void attend_heads(const Block& block, int64_t c, int64_t kv_head, int64_t fetch, float* partial) const {
    const int64_t groups = heads / kv_heads, record = heads * (dim + 2), r0 = block.row;
    const int64_t s0 = starts[r0] + c * kChunk;
    bool same = true;
    for (int64_t i = 1; i < block.count; ++i) {
      same = same && std::min(ends[r0 + i], s0 + kChunk) == std::min(ends[r0], s0 + kChunk);
    }
    const int64_t together = same ? block.count : 1;
    for (int64_t i = 0; i < block.count; i += together) {
      const int64_t r = r0 + i, s1 = std::min(ends[r], s0 + kChunk);
      if (s1 <= s0) continue;  // the row ends before this chunk
      float* part = partial + (block.first + c * block.count + i) * record + kv_head * groups * (dim + 2);
      attend_chunk<T>(q + (r * heads + kv_head * groups) * dim, keys, values, k_scales, v_scales,
                      slots + rows[r0] * context, nullptr, s0, s1, kv_head, kv_heads, groups, dim, scale, fetch,
                      part, QueryRows{together, heads * dim, record});
    }
  }

  // every output row of `block` from its partials, combined in chunk order
  void combine(const Block& block, const float* partial, float* out) const {
    const int64_t record = heads * (dim + 2);
    for (int64_t i = 0; i < block.count; ++i) {
      const int64_t r = block.row + i, chunks = (ends[r] - starts[r] + kChunk - 1) / kChunk;
      for (int64_t h = 0; h < heads; ++h) {
        const float* first = partial + (block.first + i) * record + h * (dim + 2);  // (kv head, g) = h
        combine_chunks(first, block.count * record, chunks, dim, out + (r * heads + h) * dim);
      }
    }
  }
};

// Many blocks (a prefill, a large decode batch): one item per block, all its chunks and K/V heads in turn, its
// partials in a buffer of the thread's, combined at once (no partials of the whole call written to memory).
// Threads take the next block as they finish, largest first: a prefill's blocks grow with their position, and
// split in halves the second half was 3x the first (2 threads: 1.4x instead of 2x faster than 1).
template <typename T>
void run_per_block(const Inputs<T>& in, const std::vector<Block>& blocks, float* out) {
  const int64_t record = in.heads * (in.dim + 2), count = static_cast<int64_t>(blocks.size());
  std::vector<int64_t> order(count);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return blocks[a].chunks * blocks[a].count > blocks[b].chunks * blocks[b].count;
  });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, count, 1, [&](int64_t, int64_t) {
    std::vector<float> partial;
    for (int64_t k = next++; k < count; k = next++) {
      Block block = blocks[order[k]];
      block.first = 0;
      partial.resize(block.chunks * block.count * record);
      for (int64_t c = 0; c < block.chunks; ++c) {
        in.attend(block, c, 0, in.kv_heads, in.kv_heads * in.dim, partial.data());
      }
      in.combine(block, partial.data(), out);
    }
  });
}

// Few blocks (decode rows): items of (block, chunk, K/V head) so that every thread has work, then the combination.
template <typename T>
void run_per_chunk(const Inputs<T>& in, const std::vector<Block>& blocks, const at::Tensor& q, float* out) {
  std::vector<std::pair<int64_t, int64_t>> work;  // (block, chunk)
  for (int64_t b = 0; b < static_cast<int64_t>(blocks.size()); ++b) {
    for (int64_t c = 0; c < blocks[b].chunks; ++c) work.emplace_back(b, c);
  }
  const Block& last = blocks.back();
  // per (block, chunk, row of the block), K/V head and query head of its group: m, l, then D output sums
  at::Tensor partial = at::empty({last.first + last.chunks * last.count, in.heads, in.dim + 2}, q.options());
  float* pp = partial.data_ptr<float>();
  const int64_t items = static_cast<int64_t>(work.size()) * in.kv_heads;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const auto [b, c] = work[item / in.kv_heads];
      in.attend(blocks[b], c, item % in.kv_heads, item % in.kv_heads + 1, 0, pp);
    }
  });
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) in.combine(blocks[b], pp, out);
  });
}

// Which of the two splits runs changes who computes a chunk, never its numbers (attend_chunk on the same keys,
// combine_chunks on the same partials, in the same order).
template <typename T>
void run(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool, const float* k_scales,
         const float* v_scales, const at::Tensor& slots, const int64_t* rows, const int64_t* starts,
         const int64_t* ends, float scale, at::Tensor& out) {
  const Inputs<T> in{q.data_ptr<float>(), k_pool.data_ptr<T>(), v_pool.data_ptr<T>(), k_scales, v_scales,
                     slots.data_ptr<int64_t>(), rows, starts, ends, slots.size(1), q.size(1), k_pool.size(1),
                     q.size(2), scale};
  const int64_t most = kMaxGroup / (in.heads / in.kv_heads);  // query rows per block: at most kMaxGroup heads
  const std::vector<Block> blocks = query_blocks(rows, starts, ends, q.size(0), most);
  if (blocks.empty()) return;
  if (static_cast<int64_t>(blocks.size()) >= 4 * at::get_num_threads()) {
    run_per_block(in, blocks, out.data_ptr<float>());
  } else {
    run_per_chunk(in, blocks, q, out.data_ptr<float>());
  }
}

// (R,) contiguous int64
const int64_t* per_query(const at::Tensor& t, int64_t queries, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == queries && t.scalar_type() == at::kLong && t.is_contiguous(), name,
              ": contiguous (R,) int64, one per query row");
  return t.data_ptr<int64_t>();
}

void check_ranges(const at::Tensor& slots, const int64_t* rows, const int64_t* starts, const int64_t* ends,
                  int64_t queries, int64_t pool_slots) {
  const int64_t batch = slots.size(0), context = slots.size(1);
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t r = 0; r < queries; ++r) {
    TORCH_CHECK(rows[r] >= 0 && rows[r] < batch, "rows: ", rows[r], " is not a row of slots (", batch, ")");
    TORCH_CHECK(0 <= starts[r] && starts[r] <= ends[r] && ends[r] <= context, "keys [", starts[r], ", ", ends[r],
                ") of query ", r, " are not a range of its ", context, " slots");
    for (int64_t s = starts[r]; s < ends[r]; ++s) {
      const int64_t at = slot[rows[r] * context + s];
      TORCH_CHECK(at >= 0 && at < pool_slots, "slots: ", at, " is outside the pool (", pool_slots, " slots)");
    }
  }
}

at::Tensor invariant_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                               const at::Tensor& slots, const at::Tensor& rows, const at::Tensor& starts,
                               const at::Tensor& ends, double scale, const c10::optional<at::Tensor>& k_scales,
                               const c10::optional<at::Tensor>& v_scales) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q: contiguous (R, H, D) float32");
  TORCH_CHECK(k_pool.dim() == 3 && k_pool.is_contiguous() && v_pool.is_contiguous() &&
                  k_pool.sizes() == v_pool.sizes() && k_pool.scalar_type() == v_pool.scalar_type(),
              "k_pool / v_pool: contiguous (N, H_kv, D) of one dtype");
  const int64_t dim = q.size(2), queries = q.size(0);
  TORCH_CHECK(k_pool.size(2) == dim && dim <= kMaxDim && dim % 16 == 0, "head size ", dim,
              " is not supported (a multiple of 16, at most 256)");
  TORCH_CHECK(q.size(1) % k_pool.size(1) == 0 && q.size(1) / k_pool.size(1) <= kMaxGroup, "bad GQA grouping");
  TORCH_CHECK(slots.dim() == 2 && slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "slots: contiguous (B, S) int64");
  const int64_t* row = per_query(rows, queries, "rows");
  const int64_t* start = per_query(starts, queries, "starts");
  const int64_t* end = per_query(ends, queries, "ends");
  check_ranges(slots, row, start, end, queries, k_pool.size(0));
  at::Tensor out = at::empty_like(q);
  const float s = static_cast<float>(scale);
  switch (k_pool.scalar_type()) {
    case at::kFloat: run<float>(q, k_pool, v_pool, nullptr, nullptr, slots, row, start, end, s, out); break;
    case at::kBFloat16: run<c10::BFloat16>(q, k_pool, v_pool, nullptr, nullptr, slots, row, start, end, s, out); break;
    case at::kHalf: run<c10::Half>(q, k_pool, v_pool, nullptr, nullptr, slots, row, start, end, s, out); break;
    case at::kChar:
      run<int8_t>(q, k_pool, v_pool, row_scales(k_scales, k_pool, "k_scales"), row_scales(v_scales, v_pool, "v_scales"),
                  slots, row, start, end, s, out);
      break;
    default: TORCH_CHECK(false, "unsupported cache dtype ", k_pool.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinylm, m) {
  m.def("invariant_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor slots, Tensor rows, Tensor starts, "
        "Tensor ends, float scale, Tensor? k_scales=None, Tensor? v_scales=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinylm, CPU, m) { m.impl("invariant_attention", &invariant_attention); }
