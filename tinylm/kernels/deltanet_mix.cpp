// Gated DeltaNet's token mixing between its projections in one call, for batch-invariant inference (issue 21):
// causal depthwise conv + SiLU, q / k L2 norms, decay and write strength, the gated delta rule token by token, and
// the gated RMSNorm. tinylm/model/deltanet.py's `mix_tokens` runs the same steps as ~25 PyTorch ops (~0.5 ms a
// layer at batch 1, where a Qwen3-Next decode step's products take ~0.1 ms); here they are loops over one row's
// channels and heads.
//
// Batch invariance: every value depends on its own row's inputs only, through one fixed sequence of float32
// operations (taps in order, sums over a head in index order, the recurrence as delta_rule.h), whatever the
// number of rows, the row's padding, the thread count, or whether a token is decoded or part of a prompt.
// Roundings where the PyTorch form rounds (tinylm/model/deltanet.py, delta_rule.py, layers.py gated_rms_norm):
// the conv output and its SiLU, sigmoid(b), the rule's output, the normed value, the weight's product, the result.
//
// qkv (B, T, C) as [q | k | v] with C = 2 H_k D_k + H_v D_v; z (B, T, H_v, D_v); b, a (B, T, H_v); conv_state
// (B, C, K-1) and recurrent_state (B, H_v, D_k, D_v) float32, or absent (zeros); lengths (B,) real tokens per row
// (real tokens first, padding after: it neither reads nor writes the state, its output is 0) or absent (all T).
// -> (out (B, T, H_v D_v), new conv state (B, C, K-1): the last K-1 real inputs, new recurrent state).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "delta_rule.h"
#include "invariant_vec.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using namespace tinylm_vec;

inline float softplus(float x) { return x > 20.f ? x : std::log1p(std::exp(x)); }  // F.softplus, threshold 20

struct Shape {
  int64_t batch, steps, channels, taps, k_heads, dk, v_heads, dv;
  int64_t key_dim() const { return k_heads * dk; }
};

// One batch row's conv inputs as float rows of C: window[p] for p < K-1 the conv state (transposed), then the T
// inputs (widened exactly): full[p] of the PyTorch form
template <typename T>
void conv_window(const T* qkv, const T* state, const Shape& s, int64_t b, float* window) {
  const int64_t past = s.taps - 1;
  for (int64_t p = 0; p < past; ++p) {
    for (int64_t c = 0; c < s.channels; ++c) {
      window[p * s.channels + c] = state == nullptr ? 0.f : static_cast<float>(state[(b * s.channels + c) * past + p]);
    }
  }
  const T* rows = qkv + b * s.steps * s.channels;
  float* out = window + past * s.channels;
  for (int64_t i = 0; i < s.steps * s.channels; i += kLanes) {
    const int64_t n = std::min(kLanes, s.steps * s.channels - i);
    store(load(rows + i, n), out + i, n);
  }
}

// One token's conv + SiLU over every channel into mixed (C floats): window rows t .. t+K-1 times the taps (K, C),
// added in tap order (a product, then an add: no fused multiply-add), then q and k L2-normalized (q / sqrt(D_k))
template <typename T>
void conv_token(const float* window, const float* taps, const Shape& s, int64_t t, float* mixed) {
  const int64_t width = s.channels;
  for (int64_t c = 0; c < width; c += kLanes) {
    const int64_t n = std::min(kLanes, width - c);
    Vec acc = load(window + t * width + c, n) * load(taps + c, n);
    for (int64_t j = 1; j < s.taps; ++j) {
      acc = acc + load(window + (t + j) * width + c, n) * load(taps + j * width + c, n);
    }
    const Vec conv = round_to(acc, static_cast<T*>(nullptr));
    store(round_to(silu(conv), static_cast<T*>(nullptr)), mixed + c, n);
  }
  const float q_scale = std::sqrt(static_cast<float>(s.dk));
  for (int64_t h = 0; h < 2 * s.k_heads; ++h) {  // q heads, then k heads
    float* x = mixed + h * s.dk;
    float squares = 0.f;
    for (int64_t i = 0; i < s.dk; ++i) squares = squares + x[i] * x[i];
    const float inv = 1.f / std::sqrt(squares + 1e-6f);
    for (int64_t i = 0; i < s.dk; ++i) x[i] = h < s.k_heads ? (x[i] * inv) / q_scale : x[i] * inv;
  }
}

// out (D_v) = gated RMSNorm of the rule's output o with gate z (layers.py gated_rms_norm)
template <typename T>
void gated_norm(const float* o, const T* z, const T* weight, float eps, int64_t dv, T* out) {
  constexpr T* kAs = nullptr;
  Vec squares(0.f);
  for (int64_t i = 0; i < dv; i += kLanes) {
    const Vec x = round_to(load(o + i, std::min(kLanes, dv - i)), kAs);
    squares = squares + x * x;
  }
  const float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, squares);
  const Vec inv(1.f / std::sqrt(sum / static_cast<float>(dv) + eps));
  for (int64_t i = 0; i < dv; i += kLanes) {
    const int64_t n = std::min(kLanes, dv - i);
    const Vec normed = round_to(round_to(load(o + i, n), kAs) * inv, kAs);
    const Vec weighted = round_to(load(weight + i, n) * normed, kAs);
    store(weighted * silu(load(z + i, n)), out + i, n);
  }
}

// A small float32 or bfloat16 vector read as floats (A_log, dt_bias: whichever dtype the checkpoint kept)
struct Floats {
  const float* f32 = nullptr;
  const c10::BFloat16* bf16 = nullptr;
  explicit Floats(const at::Tensor& t) {
    TORCH_CHECK(t.is_contiguous() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16),
                "invariant_deltanet_mix: A_log and dt_bias must be contiguous float32 or bfloat16");
    if (t.scalar_type() == at::kFloat) f32 = t.data_ptr<float>();
    else bf16 = t.data_ptr<c10::BFloat16>();
  }
  float operator[](int64_t i) const { return f32 != nullptr ? f32[i] : static_cast<float>(bf16[i]); }
};

int64_t row_length(const std::optional<at::Tensor>& lengths, const Shape& s, int64_t b) {
  return lengths.has_value() ? std::clamp<int64_t>(lengths->data_ptr<int64_t>()[b], 0, s.steps) : s.steps;
}

// Where one call's rows live: inputs as T, float32 scratch rows per token (B*T of them)
template <typename T>
struct Rows {
  const Shape& s;
  const std::optional<at::Tensor>& lengths;  // real tokens per batch row, or all T
  std::vector<float> mixed, g, beta, o;        // (B*T, C), (B*T, H_v) twice, (B*T, H_v D_v)
  std::vector<float> taps, windows;            // (K, C); per batch row (K-1+T, C)

  Rows(const Shape& shape, const std::optional<at::Tensor>& lens)
      : s(shape), lengths(lens), mixed(rows() * s.channels), g(rows() * s.v_heads), beta(rows() * s.v_heads),
        o(rows() * value_width()), taps(s.taps * s.channels), windows(s.batch * span()) {}
  int64_t rows() const { return s.batch * s.steps; }
  int64_t value_width() const { return s.v_heads * s.dv; }
  int64_t span() const { return (s.taps - 1 + s.steps) * s.channels; }
  int64_t length(int64_t b) const { return row_length(lengths, s, b); }

  // conv + SiLU + L2 norms into mixed, beta = sigmoid(b) and g = -exp(A_log) softplus(a + dt_bias) per token
  void conv_and_gates(const T* x, const T* state, const T* cw, const T* bp, const T* ap, const Floats& alog,
                      const Floats& dtb) {
    for (int64_t c = 0; c < s.channels; ++c) {
      for (int64_t j = 0; j < s.taps; ++j) taps[j * s.channels + c] = static_cast<float>(cw[c * s.taps + j]);
    }
    for (int64_t b = 0; b < s.batch; ++b) conv_window<T>(x, state, s, b, windows.data() + b * span());
    at::parallel_for(0, rows(), std::max<int64_t>(1, 32768 / s.channels), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        conv_token<T>(windows.data() + r / s.steps * span(), taps.data(), s, r % s.steps,
                      mixed.data() + r * s.channels);
        for (int64_t h = 0; h < s.v_heads; ++h) {
          const int64_t i = r * s.v_heads + h;
          beta[i] = rounded<T>(1.f / (1.f + std::exp(-static_cast<float>(bp[i]))));
          g[i] = -std::exp(alog[h]) * softplus(static_cast<float>(ap[i]) + dtb[h]);
        }
      }
    });
  }

  // every (batch row, value head) through its real tokens into o; rec (B, H_v, D_k, D_v) starts as rec_in or 0
  void recurrence(const float* rec_in, float* rec) {
    const int64_t per_key = s.v_heads / s.k_heads, state_size = s.dk * s.dv, width = value_width();
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, s.steps * state_size));
    at::parallel_for(0, s.batch * s.v_heads, grain, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / s.v_heads, h = bh % s.v_heads;
        const float* row = mixed.data() + b * s.steps * s.channels;
        const tinylm_delta::HeadTokens head{row + (h / per_key) * s.dk, row + s.key_dim() + (h / per_key) * s.dk,
                                            row + 2 * s.key_dim() + h * s.dv, g.data() + b * s.steps * s.v_heads + h,
                                            beta.data() + b * s.steps * s.v_heads + h,
                                            o.data() + b * s.steps * width + h * s.dv, s.channels, s.channels,
                                            s.v_heads, width};
        float* state_out = rec + bh * state_size;
        if (rec_in == nullptr) std::fill(state_out, state_out + state_size, 0.f);
        else std::copy_n(rec_in + bh * state_size, state_size, state_out);
        tinylm_delta::head_tokens(head, state_out, length(b), s.dk, s.dv);
      }
    });
  }

  // out (B*T, H_v D_v): the gated norm of each real token's heads, 0 for padding
  void outputs(const T* zp, const T* nw, float eps, T* out) const {
    const int64_t width = value_width();
    at::parallel_for(0, rows(), std::max<int64_t>(1, 32768 / width), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const bool real = r % s.steps < length(r / s.steps);
        for (int64_t h = 0; h < s.v_heads; ++h) {
          const int64_t at = r * width + h * s.dv;
          if (real) gated_norm<T>(o.data() + at, zp + at, nw, eps, s.dv, out + at);
          else std::fill(out + at, out + at + s.dv, static_cast<T>(0.f));
        }
      }
    });
  }

  // nc (B, C, K-1): each batch row's last K-1 real inputs, window rows length .. length + K-2
  void conv_state(T* nc) const {
    const int64_t past = s.taps - 1;
    for (int64_t b = 0; b < s.batch; ++b) {
      const float* window = windows.data() + b * span() + length(b) * s.channels;
      for (int64_t c = 0; c < s.channels; ++c) {
        for (int64_t i = 0; i < past; ++i) {
          nc[(b * s.channels + c) * past + i] = static_cast<T>(window[i * s.channels + c]);
        }
      }
    }
  }
};

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> mix(const at::Tensor& qkv, const at::Tensor& z, const at::Tensor& b_in,
                                                   const at::Tensor& a_in, const std::optional<at::Tensor>& conv_state,
                                                   const std::optional<at::Tensor>& initial,
                                                   const std::optional<at::Tensor>& lengths,
                                                   const at::Tensor& conv_weight, const at::Tensor& a_log,
                                                   const at::Tensor& dt_bias, const at::Tensor& norm_weight,
                                                   float eps, const Shape& s) {
  Rows<T> rows(s, lengths);
  rows.conv_and_gates(qkv.data_ptr<T>(), conv_state.has_value() ? conv_state->data_ptr<T>() : nullptr,
                      conv_weight.data_ptr<T>(), b_in.data_ptr<T>(), a_in.data_ptr<T>(), Floats(a_log),
                      Floats(dt_bias));
  at::Tensor recurrent = at::empty({s.batch, s.v_heads, s.dk, s.dv}, qkv.options().dtype(at::kFloat));
  rows.recurrence(initial.has_value() ? initial->data_ptr<float>() : nullptr, recurrent.data_ptr<float>());
  at::Tensor out = at::empty({s.batch, s.steps, rows.value_width()}, qkv.options());
  rows.outputs(z.data_ptr<T>(), norm_weight.data_ptr<T>(), eps, out.data_ptr<T>());
  at::Tensor new_conv = at::empty({s.batch, s.channels, s.taps - 1}, qkv.options());
  rows.conv_state(new_conv.data_ptr<T>());
  return {out, new_conv, recurrent};
}

void check(bool ok, const char* what) { TORCH_CHECK(ok, "invariant_deltanet_mix: ", what); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> invariant_deltanet_mix(
    const at::Tensor& qkv, const at::Tensor& z, const at::Tensor& b, const at::Tensor& a,
    const std::optional<at::Tensor>& conv_state, const std::optional<at::Tensor>& recurrent_state,
    const std::optional<at::Tensor>& lengths, const at::Tensor& conv_weight, const at::Tensor& a_log,
    const at::Tensor& dt_bias, const at::Tensor& norm_weight, double eps, int64_t num_k_heads, int64_t head_k_dim) {
  const auto dtype = qkv.scalar_type();
  check(dtype == at::kFloat || dtype == at::kBFloat16, "qkv must be float32 or bfloat16");
  check(qkv.dim() == 3 && z.dim() == 4 && conv_weight.dim() == 3,
        "qkv (B, T, C), z (B, T, H_v, D_v), weight (C, 1, K)");
  const Shape s{qkv.size(0), qkv.size(1), qkv.size(2), conv_weight.size(2), num_k_heads, head_k_dim, z.size(2),
                z.size(3)};
  check(s.k_heads > 0 && s.v_heads % s.k_heads == 0 && s.channels == 2 * s.key_dim() + s.v_heads * s.dv &&
            conv_weight.size(0) == s.channels && s.taps >= 1,
        "C must be 2 H_k D_k + H_v D_v with H_v a multiple of H_k, weight (C, 1, K)");
  check(z.size(0) == s.batch && z.size(1) == s.steps && b.sizes() == a.sizes() &&
            b.sizes() == at::IntArrayRef({s.batch, s.steps, s.v_heads}) && norm_weight.numel() == s.dv &&
            a_log.numel() == s.v_heads && dt_bias.numel() == s.v_heads,
        "z (B, T, H_v, D_v), b and a (B, T, H_v), norm weight (D_v,), A_log and dt_bias (H_v,)");
  check(!conv_state.has_value() || conv_state->sizes() == at::IntArrayRef({s.batch, s.channels, s.taps - 1}),
        "conv state (B, C, K-1)");
  check(!recurrent_state.has_value() ||
            recurrent_state->sizes() == at::IntArrayRef({s.batch, s.v_heads, s.dk, s.dv}),
        "recurrent state (B, H_v, D_k, D_v)");
  check(!lengths.has_value() || lengths->numel() == s.batch, "lengths (B,)");
  // (a dtype conversion only where needed: a no-op .to() still costs a dispatcher call, ~0.3 us each)
  const auto same = [&](const at::Tensor& t) { return (t.scalar_type() == dtype ? t : t.to(dtype)).contiguous(); };
  const auto floats = [](const at::Tensor& t) {
    return (t.scalar_type() == at::kFloat ? t : t.to(at::kFloat)).contiguous();
  };
  const std::optional<at::Tensor> state = conv_state.has_value() ? std::optional(same(*conv_state)) : std::nullopt;
  // the new state starts as a copy of the old, made head by head in the threads that update it
  const std::optional<at::Tensor> initial = recurrent_state.has_value()
                                                ? std::optional(floats(*recurrent_state))
                                                : std::nullopt;
  std::optional<at::Tensor> lens;
  if (lengths.has_value()) {
    lens = (lengths->scalar_type() == at::kLong ? *lengths : lengths->to(at::kLong)).contiguous();
  }
  const at::Tensor alog = a_log.contiguous(), dtb = dt_bias.contiguous();
  const float e = static_cast<float>(eps);
  if (dtype == at::kFloat) {
    return mix<float>(same(qkv), same(z), same(b), same(a), state, initial, lens, same(conv_weight), alog, dtb,
                      same(norm_weight), e, s);
  }
  return mix<c10::BFloat16>(same(qkv), same(z), same(b), same(a), state, initial, lens, same(conv_weight), alog,
                            dtb, same(norm_weight), e, s);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinylm, m) {
  m.def("invariant_deltanet_mix(Tensor qkv, Tensor z, Tensor b, Tensor a, Tensor? conv_state, "
        "Tensor? recurrent_state, Tensor? lengths, Tensor conv_weight, Tensor A_log, Tensor dt_bias, "
        "Tensor norm_weight, float eps, int num_k_heads, int head_k_dim) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tinylm, CPU, m) { m.impl("invariant_deltanet_mix", &invariant_deltanet_mix); }
