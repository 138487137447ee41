// SwiGLU: y = silu(gate) * up, elementwise. Backward recomputes sigmoid(gate) from the saved
// inputs instead of keeping silu(gate) alive between the passes:
//   d up = dy * gate * s,   d gate = dy * up * s * (1 + gate * (1 - s)),   s = sigmoid(gate).
// The gradient of y.sum() arrives as one value expanded to y's shape; it is read as that value
// rather than materialised (a full extra tensor at these sizes).
#include <torch/library.h>

#include "cpu_vec.h"

namespace twinkle {
namespace {

// exp_u20 (ATen's inlined polynomial, ~20 ulp before the division) instead of Sleef's exp (1 ulp,
// a call): about half the forward's compute for a relative error still below 1e-6.
template <typename T>
inline at::vec::Vectorized<T> sigmoid(const at::vec::Vectorized<T>& value) {
  const at::vec::Vectorized<T> one(T(1));
  return one / (one + value.neg().exp_u20());
}

// The flat range split into rows of one chunk each, so the row-parallel loop applies.
constexpr int64_t kChunk = 4096;

template <typename Body>
inline void parallel_chunks(int64_t numel, const Body& body) {
  parallel_rows((numel + kChunk - 1) / kChunk, kChunk, [&](int64_t begin, int64_t end) {
    const int64_t stop = std::min(numel, end * kChunk);
    body(begin * kChunk, stop - begin * kChunk);
  });
}

template <typename scalar_t>
void forward_elements(const scalar_t* gate, const scalar_t* up, scalar_t* y, int64_t numel) {
  parallel_chunks(numel, [&](int64_t start, int64_t length) {
    for_each_vector<scalar_t>(length, [&](int64_t i, int64_t n) {
      const int64_t at = start + i;
      auto g = load(gate + at, n);
      store(y + at, g * sigmoid(g) * load(up + at, n), n);
    });
  });
}

template <typename scalar_t>
void backward_elements(const scalar_t* grad_y, bool grad_is_scalar, const scalar_t* gate, const scalar_t* up,
                       scalar_t* grad_gate, scalar_t* grad_up, int64_t numel) {
  const Vec<scalar_t> one(1);
  const Vec<scalar_t> grad_scalar(numel > 0 && grad_is_scalar ? opmath_t<scalar_t>(grad_y[0]) : 0);
  parallel_chunks(numel, [&](int64_t start, int64_t length) {
    for_each_vector<scalar_t>(length, [&](int64_t i, int64_t n) {
      const int64_t at = start + i;
      auto dy = grad_is_scalar ? grad_scalar : load(grad_y + at, n);
      auto g = load(gate + at, n);
      auto s = sigmoid(g);
      store(grad_up + at, dy * g * s, n);
      store(grad_gate + at, dy * load(up + at, n) * s * (one + g * (one - s)), n);
    });
  });
}

void check_inputs(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.device().is_cpu() && up.device().is_cpu(), "swiglu: tensors must be on the CPU");
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type(),
              "swiglu: gate and up must share shape and dtype");
}

at::Tensor swiglu_forward(const at::Tensor& gate, const at::Tensor& up) {
  check_inputs(gate, up);
  const auto gate_contiguous = gate.contiguous();
  const auto up_contiguous = up.contiguous();
  auto y = at::empty(gate.sizes(), gate.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_forward", [&] {
    forward_elements<scalar_t>(gate_contiguous.const_data_ptr<scalar_t>(), up_contiguous.const_data_ptr<scalar_t>(),
                               y.mutable_data_ptr<scalar_t>(), gate.numel());
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& grad_y, const at::Tensor& gate,
                                                   const at::Tensor& up) {
  check_inputs(gate, up);
  TORCH_CHECK(grad_y.sizes() == gate.sizes(), "swiglu_backward: grad_y must have the shape of gate");
  const auto grad_typed = grad_y.to(gate.scalar_type());
  const auto strides = grad_typed.strides();
  const bool grad_is_scalar = std::all_of(strides.begin(), strides.end(), [](int64_t s) { return s == 0; });
  const auto grad_y_values = grad_is_scalar ? grad_typed : grad_typed.contiguous();
  const auto gate_contiguous = gate.contiguous();
  const auto up_contiguous = up.contiguous();
  auto grad_gate = at::empty(gate.sizes(), gate.options());
  auto grad_up = at::empty(gate.sizes(), gate.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_backward", [&] {
    backward_elements<scalar_t>(grad_y_values.const_data_ptr<scalar_t>(), grad_is_scalar,
                                gate_contiguous.const_data_ptr<scalar_t>(), up_contiguous.const_data_ptr<scalar_t>(),
                                grad_gate.mutable_data_ptr<scalar_t>(), grad_up.mutable_data_ptr<scalar_t>(),
                                gate.numel());
  });
  return {grad_gate, grad_up};
}

}  // namespace
}  // namespace twinkle

TORCH_LIBRARY_FRAGMENT(twinkle_cpu, m) {
  m.def("swiglu_forward(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad_y, Tensor gate, Tensor up) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(twinkle_cpu, CPU, m) {
  m.impl("swiglu_forward", &twinkle::swiglu_forward);
  m.impl("swiglu_backward", &twinkle::swiglu_backward);
}
