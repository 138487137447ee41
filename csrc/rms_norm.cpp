// RMSNorm over the last dim: y = x * rstd * (w + offset), rstd = 1 / sqrt(mean(x^2) + eps).
// Forward saves rstd per row (math dtype) so backward does not recompute the reduction.
// Backward: dx = rstd * g - x * rstd^3 * sum(g * x) / cols with g = dy * (w + offset), and
// dw = sum over rows of dy * x * rstd, accumulated in one fp32 partial per task (no atomics,
// deterministic for a given thread count) and summed at the end.
#include <torch/library.h>

#include "cpu_vec.h"

namespace twinkle {
namespace {

template <typename scalar_t>
void forward_rows(const scalar_t* x, const opmath_t<scalar_t>* weight, scalar_t* y,
                  opmath_t<scalar_t>* rstd, int64_t rows, int64_t cols, double eps) {
  using math_t = opmath_t<scalar_t>;
  parallel_rows(rows, cols, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* x_row = x + row * cols;
      scalar_t* y_row = y + row * cols;
      Vec<scalar_t> squares(0);
      for_each_vector<scalar_t>(cols, [&](int64_t i, int64_t n) {
        auto value = load(x_row + i, n);
        squares = at::vec::fmadd(value, value, squares);
      });
      const math_t row_rstd = math_t(1) / std::sqrt(reduce_sum(squares) / cols + math_t(eps));
      rstd[row] = row_rstd;
      const Vec<scalar_t> scale(row_rstd);
      for_each_vector<scalar_t>(cols, [&](int64_t i, int64_t n) {
        store(y_row + i, load(x_row + i, n) * scale * Vec<scalar_t>::loadu(weight + i, n), n);
      });
    }
  });
}

template <typename scalar_t>
void backward_rows(const scalar_t* grad_y, const scalar_t* x, const opmath_t<scalar_t>* weight,
                   const opmath_t<scalar_t>* rstd, scalar_t* grad_x, opmath_t<scalar_t>* weight_partials,
                   int64_t rows, int64_t cols, int64_t tasks) {
  using math_t = opmath_t<scalar_t>;
  const int64_t rows_per_task = (rows + tasks - 1) / tasks;
  at::parallel_for(0, tasks, 1, [&](int64_t first_task, int64_t last_task) {
    for (int64_t task = first_task; task < last_task; ++task) {
      math_t* grad_weight = weight_partials + task * cols;
      const int64_t row_end = std::min(rows, (task + 1) * rows_per_task);
      for (int64_t row = task * rows_per_task; row < row_end; ++row) {
        const scalar_t* dy_row = grad_y + row * cols;
        const scalar_t* x_row = x + row * cols;
        scalar_t* dx_row = grad_x + row * cols;
        Vec<scalar_t> dot(0);
        for_each_vector<scalar_t>(cols, [&](int64_t i, int64_t n) {
          dot = at::vec::fmadd(load(dy_row + i, n) * Vec<scalar_t>::loadu(weight + i, n), load(x_row + i, n), dot);
        });
        const math_t row_rstd = rstd[row];
        const Vec<scalar_t> scale(row_rstd);
        const Vec<scalar_t> correction(row_rstd * row_rstd * row_rstd * reduce_sum(dot) / cols);
        for_each_vector<scalar_t>(cols, [&](int64_t i, int64_t n) {
          auto dy = load(dy_row + i, n);
          auto x_value = load(x_row + i, n);
          store(dx_row + i, dy * Vec<scalar_t>::loadu(weight + i, n) * scale - x_value * correction, n);
          at::vec::fmadd(dy * x_value, scale, Vec<scalar_t>::loadu(grad_weight + i, n)).store(grad_weight + i, n);
        });
      }
    }
  });
}

// weight + offset in the math dtype of x: read by every row, so converted once.
at::Tensor shifted_weight(const at::Tensor& x, const at::Tensor& weight, double offset) {
  return weight.to(at::toOpMathType(x.scalar_type())).add(offset).contiguous();
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm: tensors must be on the CPU");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "rms_norm: weight must be 1-D with the length of x's last dim");
}

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight,
                                                    double eps, double offset) {
  check_inputs(x, weight);
  const auto x_contiguous = x.contiguous();
  const auto weight_math = shifted_weight(x, weight, offset);
  auto y = at::empty(x.sizes(), x.options());
  auto rstd = at::empty(x.sizes().slice(0, x.dim() - 1), weight_math.options());
  const int64_t cols = x.size(-1);
  const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_forward", [&] {
    forward_rows<scalar_t>(x_contiguous.const_data_ptr<scalar_t>(), weight_math.const_data_ptr<opmath_t<scalar_t>>(),
                           y.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<opmath_t<scalar_t>>(), rows, cols,
                           eps);
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                     const at::Tensor& weight, const at::Tensor& rstd,
                                                     double offset) {
  check_inputs(x, weight);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && rstd.numel() * x.size(-1) == x.numel(),
              "rms_norm_backward: grad_y and rstd must match x");
  const auto grad_y_contiguous = grad_y.to(x.scalar_type()).contiguous();
  const auto x_contiguous = x.contiguous();
  const auto weight_math = shifted_weight(x, weight, offset);
  const auto rstd_contiguous = rstd.to(weight_math.scalar_type()).contiguous();
  auto grad_x = at::empty(x.sizes(), x.options());
  const int64_t cols = x.size(-1);
  const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(rows, at::get_num_threads()));
  auto weight_partials = at::zeros({tasks, cols}, weight_math.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_backward", [&] {
    backward_rows<scalar_t>(grad_y_contiguous.const_data_ptr<scalar_t>(), x_contiguous.const_data_ptr<scalar_t>(),
                            weight_math.const_data_ptr<opmath_t<scalar_t>>(),
                            rstd_contiguous.const_data_ptr<opmath_t<scalar_t>>(), grad_x.mutable_data_ptr<scalar_t>(),
                            weight_partials.mutable_data_ptr<opmath_t<scalar_t>>(), rows, cols, tasks);
  });
  return {grad_x, weight_partials.sum(0).to(weight.scalar_type())};
}

}  // namespace
}  // namespace twinkle

TORCH_LIBRARY_FRAGMENT(twinkle_cpu, m) {
  m.def("rms_norm_forward(Tensor x, Tensor weight, float eps, float offset) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd, float offset) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(twinkle_cpu, CPU, m) {
  m.impl("rms_norm_forward", &twinkle::rms_norm_forward);
  m.impl("rms_norm_backward", &twinkle::rms_norm_backward);
}
