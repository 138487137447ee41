// SwiGLU: y = silu(gate) * up, elementwise. Backward recomputes sigmoid(gate) from the saved
// inputs instead of keeping silu(gate) alive between the passes:
//   d up = dy * gate * s,   d gate = dy * up * s * (1 + gate * (1 - s)),   s = sigmoid(gate).
// The gradient of y.sum() arrives as one value expanded to y's shape; it is read as that value
// rather than materialised (a full extra tensor at these sizes).
// swiglu_backward_ writes d gate over gate and d up over up (each vector is loaded before either
// store): when nothing else reads the inputs after backward, as in an MLP, the two gradients need
// no memory of their own.
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
      auto u = load(up + at, n);
      auto s = sigmoid(g);
      store(grad_up + at, dy * g * s, n);
      store(grad_gate + at, dy * u * s * (one + g * (one - s)), n);
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

// The gradient as backward reads it: gate's dtype, and either one value broadcast (stride 0
// everywhere, as from y.sum()) or contiguous.
std::pair<at::Tensor, bool> gradient_values(const at::Tensor& grad_y, const at::Tensor& gate) {
  TORCH_CHECK(grad_y.sizes() == gate.sizes(), "swiglu_backward: grad_y must have the shape of gate");
  const auto grad_typed = grad_y.to(gate.scalar_type());
  const auto strides = grad_typed.strides();
  const bool is_scalar = std::all_of(strides.begin(), strides.end(), [](int64_t s) { return s == 0; });
  return {is_scalar ? grad_typed : grad_typed.contiguous(), is_scalar};
}

void backward_into(const at::Tensor& grad_y, const at::Tensor& gate, const at::Tensor& up, at::Tensor& grad_gate,
                   at::Tensor& grad_up) {
  const auto [grad_values, grad_is_scalar] = gradient_values(grad_y, gate);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_backward", [&] {
    backward_elements<scalar_t>(grad_values.const_data_ptr<scalar_t>(), grad_is_scalar, gate.const_data_ptr<scalar_t>(),
                                up.const_data_ptr<scalar_t>(), grad_gate.mutable_data_ptr<scalar_t>(),
                                grad_up.mutable_data_ptr<scalar_t>(), gate.numel());
  });
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& grad_y, const at::Tensor& gate,
                                                   const at::Tensor& up) {
  check_inputs(gate, up);
  const auto gate_contiguous = gate.contiguous();
  const auto up_contiguous = up.contiguous();
  auto grad_gate = at::empty(gate.sizes(), gate.options());
  auto grad_up = at::empty(gate.sizes(), gate.options());
  backward_into(grad_y, gate_contiguous, up_contiguous, grad_gate, grad_up);
  return {grad_gate, grad_up};
}

void swiglu_backward_(const at::Tensor& grad_y, at::Tensor& gate, at::Tensor& up) {
  check_inputs(gate, up);
  TORCH_CHECK(gate.is_contiguous() && up.is_contiguous(), "swiglu_backward_: gate and up must be contiguous");
  TORCH_CHECK(!gate.is_alias_of(up), "swiglu_backward_: gate and up must not share memory");
  backward_into(grad_y, gate, up, gate, up);
}

}  // namespace
}  // namespace twinkle

TORCH_LIBRARY_FRAGMENT(twinkle_cpu, m) {
  m.def("swiglu_forward(Tensor gate, Tensor up) -> Tensor");
  // The same forward; its autograd (kernels/swiglu/cpu.py) donates gate and up to swiglu_backward_.
  m.def("swiglu_forward_donated(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad_y, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("swiglu_backward_(Tensor grad_y, Tensor(a!) gate, Tensor(b!) up) -> ()");
}

TORCH_LIBRARY_IMPL(twinkle_cpu, CPU, m) {
  m.impl("swiglu_forward", &twinkle::swiglu_forward);
  m.impl("swiglu_forward_donated", &twinkle::swiglu_forward);
  m.impl("swiglu_backward", &twinkle::swiglu_backward);
  m.impl("swiglu_backward_", &twinkle::swiglu_backward_);
}
