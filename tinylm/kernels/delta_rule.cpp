// The gated delta rule token by token (Gated DeltaNet's recurrent form, tinylm/model/delta_rule.py), one value
// head's state in registers and L1 instead of ~10 PyTorch ops per token: a decode step of a Qwen3-Next hybrid ran
// them as eager ops inside its compiled graph (batch-invariant inference), and invariant prefill ran them per token.
//
// q, k (B, H, T, D_k) float32, q already scaled by 1/sqrt(D_k), both L2-normalized; v (B, H, T, D_v); g (log
// decay) and beta (B, H, T); state (B, H, D_k, D_v) float32 -> (out (B, H, T, D_v), new state). Per head and token:
//     S *= exp(g_t);  m = S^T k_t;  d = beta_t * (v_t - m);  S += k_t d^T;  o_t = S^T q_t
// Every (batch row, head) runs alone through one fixed sequence (rows of S in order, one multiply-add each, the
// D_v columns in vector lanes), so a token's output is the same whatever else is in the batch, however its prompt
// was split, and whether it is a prompt token or a decode step: batch invariant by construction.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "delta_rule.h"

#include <algorithm>
#include <cmath>
#include <tuple>

namespace {

std::tuple<at::Tensor, at::Tensor> gated_delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& g, const at::Tensor& beta,
                                                    const at::Tensor& state) {
  for (const at::Tensor* t : {&q, &k, &v, &g, &beta, &state}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "gated_delta_rule: float32 CPU tensors");
  }
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.dim() == 4 && v.size(0) == q.size(0) &&
                  v.size(1) == q.size(1) && v.size(2) == q.size(2),
              "gated_delta_rule: q, k (B, H, T, D_k) and v (B, H, T, D_v)");
  const int64_t batch = q.size(0), heads = q.size(1), steps = q.size(2), dk = q.size(3), dv = v.size(3);
  TORCH_CHECK(g.sizes() == at::IntArrayRef({batch, heads, steps}) && beta.sizes() == g.sizes(),
              "gated_delta_rule: g and beta (B, H, T)");
  TORCH_CHECK(state.sizes() == at::IntArrayRef({batch, heads, dk, dv}), "gated_delta_rule: state (B, H, D_k, D_v)");
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), gc = g.contiguous(),
                   bc = beta.contiguous();
  at::Tensor s = state.clone(at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty({batch, heads, steps, dv}, v.options());
  const float *qp = qc.data_ptr<float>(), *kp = kc.data_ptr<float>(), *vp = vc.data_ptr<float>();
  const float *gp = gc.data_ptr<float>(), *bp = bc.data_ptr<float>();
  float *sp = s.data_ptr<float>(), *op = out.data_ptr<float>();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const tinylm_delta::HeadTokens h{qp + bh * steps * dk, kp + bh * steps * dk, vp + bh * steps * dv,
                                       gp + bh * steps, bp + bh * steps, op + bh * steps * dv, dk, dv, 1, dv};
      tinylm_delta::head_tokens(h, sp + bh * dk * dv, steps, dk, dv);
    }
  });
  return {out, s};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinylm, m) {
  m.def("gated_delta_rule(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor state) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tinylm, CPU, m) { m.impl("gated_delta_rule", &gated_delta_rule); }
