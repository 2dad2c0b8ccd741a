// One value head's gated delta rule, token by token (Gated DeltaNet's recurrent form): shared by delta_rule.cpp
// (the recurrence alone) and deltanet_mix.cpp (the whole token mixing in one call).
//
// Per token t, with S the head's (D_k, D_v) state in float32:
//     S *= exp(g_t);  m = S^T k_t;  d = beta_t * (v_t - m);  S += k_t d^T;  o_t = S^T q_t
// q_t already scaled by 1/sqrt(D_k); q_t and k_t L2-normalized. Rows of S in order, one multiply-add each, the
// D_v columns in vector lanes: every (batch row, head) runs alone through one fixed sequence, so a token's output
// is the same whatever else is in the batch, however its prompt was split, decoded or scored (batch invariant).

#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace tinylm_delta {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

inline Vec load(const float* p, int64_t n) { return n == kLanes ? Vec::loadu(p) : Vec::loadu(p, n); }
inline void store(const Vec& v, float* p, int64_t n) { n == kLanes ? v.store(p) : v.store(p, n); }

// Where one head's tokens are: token t's q / k at q + t * qk_stride, v at v + t * v_stride, g / beta at
// [t * gb_stride], its output at out + t * out_stride.
struct HeadTokens {
  const float *q, *k, *v, *g, *beta;
  float* out;
  int64_t qk_stride, v_stride, gb_stride, out_stride;
};

// The first `steps` tokens of one head: s (D_k, D_v) updated in place
inline void head_tokens(const HeadTokens& h, float* s, int64_t steps, int64_t dk, int64_t dv) {
  for (int64_t t = 0; t < steps; ++t) {
    const float* kt = h.k + t * h.qk_stride;
    const float* qt = h.q + t * h.qk_stride;
    const float* vt = h.v + t * h.v_stride;
    const Vec decay(std::exp(h.g[t * h.gb_stride])), b(h.beta[t * h.gb_stride]);
    for (int64_t j = 0; j < dv; j += kLanes) {  // a strip of D_v columns: every step of the token for them
      const int64_t n = std::min(kLanes, dv - j);
      Vec memory(0.f);
      for (int64_t i = 0; i < dk; ++i) {  // decay the strip, then what it predicts for k_t
        const Vec row = load(s + i * dv + j, n) * decay;
        store(row, s + i * dv + j, n);
        memory = at::vec::fmadd(row, Vec(kt[i]), memory);
      }
      const Vec delta = (load(vt + j, n) - memory) * b;
      Vec o(0.f);
      for (int64_t i = 0; i < dk; ++i) {  // write k_t delta^T into the strip, read it with q_t
        const Vec row = at::vec::fmadd(Vec(kt[i]), delta, load(s + i * dv + j, n));
        store(row, s + i * dv + j, n);
        o = at::vec::fmadd(row, Vec(qt[i]), o);
      }
      store(o, h.out + t * h.out_stride + j, n);
    }
  }
}

}  // namespace tinylm_delta
