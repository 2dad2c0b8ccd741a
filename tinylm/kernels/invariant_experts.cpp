// A mixture-of-experts block's routed experts for batch-invariant inference (issue 21), in one call: the router's
// softmax and top-k, then per expert in index order its tokens' rows through tinylm::invariant_linear (gate/up),
// tinylm::invariant_silu_mul and tinylm::invariant_linear (down), each token's weighted outputs added in expert
// order. tinylm/model/moe.py's `invariant_experts` does the same in ~15 PyTorch ops plus a Python loop (~0.2 ms
// a layer at batch 1, most of a small model's decode step); here only the products are op calls.
//
// Batch invariance: the products' rows do not depend on the other rows of the call (invariant_gemm.cpp), the
// router and the sum are per token, in a fixed order; so a token's output does not depend on which other tokens
// picked its experts, nor on the batch. Roundings where moe.py rounds: the routing weights, each expert's
// weighted output, the running sum (index_add_ into the model's dtype).
//
// tokens (N, C); router_logits (N, E); gate_up_stack (E, 2I, C); down_stack (E, C, I) -> (N, C), tokens' dtype.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "invariant_vec.h"

#include <cmath>
#include <optional>
#include <vector>

namespace {

using tinylm_vec::rounded;

// One token's routing: softmax over E logits in float32, the top k (ties: the lower index first), optionally
// renormalized to sum 1; weights rounded to T as moe.py's route()
template <typename T>
void route_row(const T* logits, int64_t num_experts, int64_t top_k, bool normalize, int64_t* experts, float* weights) {
  float top = static_cast<float>(logits[0]);
  for (int64_t e = 1; e < num_experts; ++e) top = std::max(top, static_cast<float>(logits[e]));
  std::vector<float> probs(num_experts);
  float total = 0.f;
  for (int64_t e = 0; e < num_experts; ++e) {
    probs[e] = std::exp(static_cast<float>(logits[e]) - top);
    total = total + probs[e];
  }
  std::vector<bool> taken(num_experts, false);
  float picked = 0.f;
  for (int64_t slot = 0; slot < top_k; ++slot) {
    int64_t best = -1;
    for (int64_t e = 0; e < num_experts; ++e) {
      if (!taken[e] && (best < 0 || probs[e] > probs[best])) best = e;
    }
    taken[best] = true;
    experts[slot] = best;
    weights[slot] = probs[best] / total;
    picked = picked + weights[slot];
  }
  for (int64_t slot = 0; slot < top_k; ++slot) {
    weights[slot] = rounded<T>(normalize ? weights[slot] / picked : weights[slot]);
  }
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight) {
  using Signature = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, bool);
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("tinylm::invariant_linear", "").typed<Signature>();
  return op.call(x, weight, std::nullopt, false);
}

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("tinylm::invariant_silu_mul", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(gate, up);
}

// rows (n, C) -> (n, C) through expert e's SwiGLU
at::Tensor run_expert(const at::Tensor& rows, const at::Tensor& gate_up_stack, const at::Tensor& down_stack,
                      int64_t e) {
  const at::Tensor gate_up = linear(rows, gate_up_stack.select(0, e));  // (n, 2I)
  const int64_t inner = gate_up.size(1) / 2;
  return linear(silu_mul(gate_up.narrow(1, 0, inner), gate_up.narrow(1, inner, inner)), down_stack.select(0, e));
}

template <typename T>
at::Tensor experts_as(const at::Tensor& tokens, const at::Tensor& logits, const at::Tensor& gate_up_stack,
                      const at::Tensor& down_stack, int64_t top_k, bool normalize) {
  const int64_t count = tokens.size(0), width = tokens.size(1), num_experts = logits.size(1);
  std::vector<int64_t> chosen(count * top_k);
  std::vector<float> weights(count * top_k);
  const T* lp = logits.data_ptr<T>();
  for (int64_t n = 0; n < count; ++n) {
    route_row<T>(lp + n * num_experts, num_experts, top_k, normalize, &chosen[n * top_k], &weights[n * top_k]);
  }
  at::Tensor out = at::zeros({count, width}, tokens.options());
  T* op = out.data_ptr<T>();
  const T* tp = tokens.data_ptr<T>();
  std::vector<int64_t> members;  // (token, slot) pairs of one expert, as token * top_k + slot
  for (int64_t e = 0; e < num_experts; ++e) {
    members.clear();
    for (int64_t i = 0; i < count * top_k; ++i) {
      if (chosen[i] == e) members.push_back(i);
    }
    if (members.empty()) continue;
    const int64_t used = static_cast<int64_t>(members.size());
    at::Tensor rows = at::empty({used, width}, tokens.options());
    T* rp = rows.data_ptr<T>();
    for (int64_t m = 0; m < used; ++m) std::copy_n(tp + (members[m] / top_k) * width, width, rp + m * width);
    const at::Tensor expert_out = run_expert(rows, gate_up_stack, down_stack, e).contiguous();  // (used, C)
    const T* ep = expert_out.data_ptr<T>();
    for (int64_t m = 0; m < used; ++m) {
      T* target = op + (members[m] / top_k) * width;
      const float w = weights[members[m]];
      for (int64_t c = 0; c < width; ++c) {
        const float weighted = rounded<T>(static_cast<float>(ep[m * width + c]) * w);
        target[c] = static_cast<T>(static_cast<float>(target[c]) + weighted);
      }
    }
  }
  return out;
}

at::Tensor invariant_moe_experts(const at::Tensor& tokens, const at::Tensor& router_logits,
                                 const at::Tensor& gate_up_stack, const at::Tensor& down_stack, int64_t top_k,
                                 bool normalize) {
  const auto dtype = tokens.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "invariant_moe_experts: float32 or bfloat16 tokens");
  TORCH_CHECK(tokens.dim() == 2 && router_logits.dim() == 2 && router_logits.size(0) == tokens.size(0),
              "invariant_moe_experts: tokens (N, C) and router logits (N, E)");
  TORCH_CHECK(gate_up_stack.dim() == 3 && down_stack.dim() == 3 && gate_up_stack.size(0) == router_logits.size(1) &&
                  down_stack.size(0) == gate_up_stack.size(0) && gate_up_stack.size(2) == tokens.size(1) &&
                  down_stack.size(1) == tokens.size(1) && gate_up_stack.size(1) == 2 * down_stack.size(2),
              "invariant_moe_experts: stacks (E, 2I, C) and (E, C, I)");
  TORCH_CHECK(top_k >= 1 && top_k <= router_logits.size(1), "invariant_moe_experts: 1 <= top_k <= E");
  const at::Tensor x = tokens.contiguous(), logits = router_logits.to(dtype).contiguous();
  return dtype == at::kFloat ? experts_as<float>(x, logits, gate_up_stack, down_stack, top_k, normalize)
                             : experts_as<c10::BFloat16>(x, logits, gate_up_stack, down_stack, top_k, normalize);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinylm, m) {
  m.def("invariant_moe_experts(Tensor tokens, Tensor router_logits, Tensor gate_up_stack, Tensor down_stack, "
        "int top_k, bool normalize) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinylm, CPU, m) { m.impl("invariant_moe_experts", &invariant_moe_experts); }
