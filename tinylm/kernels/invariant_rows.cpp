// Batch-invariant row operations (issue 21): RMSNorm, SwiGLU's silu(gate) * up and the sigmoid gate (attention
// output, MoE shared expert), each row computed by one fixed sequence of float32 operations whatever the number
// of rows, the thread count or where a row starts.
//
// Why not PyTorch's own: eagerly they are invariant already (each row is reduced alone), but the compiled decode
// step is not eager: Inductor fuses these ops with their neighbours and writes its own reduction and exp, so a
// token decoded by the compiled graph and the same token scored by an eager prefill got different bits. As custom
// ops they are one opaque call in both, the same code. Every element goes through the vector path: the last
// partial vector of a row is loaded zero-filled and stored partially, never through a scalar formula that could
// round differently.
//
// Roundings follow tinylm/model/layers.py (as transformers computes): RMSNorm in float32, rounded to the input's
// dtype before the weight multiplies it (zero-centred norms: times (1 + w) in float32, one rounding); silu(gate)
// rounded to the dtype before it multiplies up.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "invariant_ops.h"
#include "invariant_vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

using namespace tinylm_vec;

template <typename T>
void rms_norm_row(const T* x, const T* weight, T* out, int64_t dim, float eps, bool zero_centered) {
  Vec squares(0.f);
  for (int64_t i = 0; i < dim; i += kLanes) {
    const Vec v = load(x + i, std::min(kLanes, dim - i));
    squares = squares + v * v;
  }
  const float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, squares);
  const Vec scale(1.f / std::sqrt(sum / static_cast<float>(dim) + eps));
  for (int64_t i = 0; i < dim; i += kLanes) {
    const int64_t n = std::min(kLanes, dim - i);
    const Vec normed = load(x + i, n) * scale;
    if (zero_centered) {
      store(normed * (Vec(1.f) + load(weight + i, n)), out + i, n);
    } else {
      store(round_to(normed, static_cast<T*>(nullptr)) * load(weight + i, n), out + i, n);
    }
  }
}

template <typename T>
void silu_mul_row(const T* gate, const T* up, T* out, int64_t dim) {
  for (int64_t i = 0; i < dim; i += kLanes) {
    const int64_t n = std::min(kLanes, dim - i);
    const Vec g = load(gate + i, n);
    store(round_to(silu(g), static_cast<T*>(nullptr)) * load(up + i, n), out + i, n);
  }
}

template <typename T>
inline Vec sigmoid_as(const Vec& g) { return round_to(sigmoid(g), static_cast<T*>(nullptr)); }

// out = x * sigmoid(gate), sigmoid(gate) rounded to T first (opaque_ops.py's sigmoid_gate in PyTorch); gate is
// one value per row (broadcast, wide == false) or one per element
template <typename T>
void sigmoid_gate_row(const T* gate, const T* x, T* out, int64_t dim, bool wide) {
  float first[kLanes];  // the row's one gate, broadcast
  sigmoid_as<T>(load(gate, 1)).store(first);
  const Vec shared(wide ? 0.f : first[0]);
  for (int64_t i = 0; i < dim; i += kLanes) {
    const int64_t n = std::min(kLanes, dim - i);
    const Vec sig = wide ? sigmoid_as<T>(load(gate + i, n)) : shared;
    store(sig * load(x + i, n), out + i, n);
  }
}

// Rows per thread: waking the OpenMP team costs more than a few rows' work (16 rows of 1536: 0.2 ms in threads
// against 0.02 ms on one), so a thread gets at least ATen's grain of 32768 elements, as its element-wise ops do
int64_t grain(int64_t dim) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(dim, 1)); }

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be (rows, dim) with contiguous rows");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16");
}

template <typename T>
at::Tensor rms_norm_as(const at::Tensor& x, const at::Tensor& weight, float eps, bool zero_centered) {
  const int64_t rows = x.size(0), dim = x.size(1), stride = x.stride(0);
  at::Tensor out = at::empty({rows, dim}, x.options());
  const T* in = x.data_ptr<T>();
  const T* w = weight.data_ptr<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, rows, grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_norm_row<T>(in + r * stride, w, o + r * dim, dim, eps, zero_centered);
  });
  return out;
}

template <typename T>
at::Tensor silu_mul_as(const at::Tensor& gate, const at::Tensor& up) {
  const int64_t rows = gate.size(0), dim = gate.size(1), g_stride = gate.stride(0), u_stride = up.stride(0);
  at::Tensor out = at::empty({rows, dim}, gate.options());
  const T* g = gate.data_ptr<T>();
  const T* u = up.data_ptr<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, rows, grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) silu_mul_row<T>(g + r * g_stride, u + r * u_stride, o + r * dim, dim);
  });
  return out;
}

template <typename T>
at::Tensor sigmoid_gate_as(const at::Tensor& gate, const at::Tensor& x) {
  const int64_t rows = x.size(0), dim = x.size(1), g_stride = gate.stride(0), x_stride = x.stride(0);
  const bool wide = gate.size(1) == dim;
  at::Tensor out = at::empty({rows, dim}, x.options());
  const T* g = gate.data_ptr<T>();
  const T* in = x.data_ptr<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, rows, grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) sigmoid_gate_row<T>(g + r * g_stride, in + r * x_stride, o + r * dim, dim, wide);
  });
  return out;
}

// x (M, C), weight (C,) of x's dtype -> (M, C)
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool zero_centered) {
  check_rows(x, "x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.scalar_type() == x.scalar_type(),
              "weight must be (C,) of x's dtype");
  const at::Tensor w = weight.contiguous();
  const float e = static_cast<float>(eps);
  return x.scalar_type() == at::kFloat ? rms_norm_as<float>(x, w, e, zero_centered)
                                       : rms_norm_as<c10::BFloat16>(x, w, e, zero_centered);
}

// gate, up (M, I) of one dtype (row strides free: the halves of a fused gate_up product) -> (M, I)
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  check_rows(gate, "gate");
  check_rows(up, "up");
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type(), "gate and up must match");
  return gate.scalar_type() == at::kFloat ? silu_mul_as<float>(gate, up) : silu_mul_as<c10::BFloat16>(gate, up);
}

// gate (M, D) or (M, 1), x (M, D) of one dtype (row strides free) -> x * sigmoid(gate) (M, D)
at::Tensor sigmoid_gate(const at::Tensor& gate, const at::Tensor& x) {
  check_rows(gate, "gate");
  check_rows(x, "x");
  TORCH_CHECK(gate.size(0) == x.size(0) && (gate.size(1) == x.size(1) || gate.size(1) == 1) &&
                  gate.scalar_type() == x.scalar_type(),
              "gate must be (M, D) or (M, 1) of x's dtype");
  return x.scalar_type() == at::kFloat ? sigmoid_gate_as<float>(gate, x) : sigmoid_gate_as<c10::BFloat16>(gate, x);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinylm, m) {
  m.def("invariant_sigmoid_gate(Tensor gate, Tensor x) -> Tensor");
  m.def("invariant_rms_norm(Tensor x, Tensor weight, float eps, bool zero_centered) -> Tensor");
  m.def("invariant_silu_mul(Tensor gate, Tensor up) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinylm, CPU, m) {
  m.impl("invariant_rms_norm", &rms_norm);
  m.impl("invariant_silu_mul", &silu_mul);
  m.impl("invariant_sigmoid_gate", &sigmoid_gate);
}
