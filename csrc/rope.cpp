// Rotary position embedding in Hugging Face's rotate_half layout, on the first `rotary` dims of
// each row (the rest pass through). With x1, x2 the halves of the rotary part:
//   forward:  out1 = x1 * cos1 - x2 * sin1,   out2 = x2 * cos2 + x1 * sin2
//   inverse:  out1 = x1 * cos1 + x2 * sin2,   out2 = x2 * cos2 - x1 * sin1
// The inverse is the transposed rotation, i.e. the backward of forward (and vice versa), so one
// op serves both passes. cos/sin broadcast over the rows (heads) without being materialised.
#include <torch/library.h>

#include <array>

#include "cpu_vec.h"

namespace twinkle {
namespace {

// Element offsets of the rows (every dim but the last) of several strided tensors of one
// shape, visited in logical order. Advancing is an odometer step: no division per row.
template <size_t kTensors>
class RowWalker {
 public:
  RowWalker(at::IntArrayRef sizes, const std::array<at::IntArrayRef, kTensors>& strides)
      : sizes_(sizes.begin(), sizes.end() - 1), index_(sizes_.size(), 0) {
    for (size_t t = 0; t < kTensors; ++t) {
      strides_[t].assign(strides[t].begin(), strides[t].end() - 1);
    }
  }

  void seek(int64_t row) {
    offsets_.fill(0);
    for (int64_t dim = static_cast<int64_t>(sizes_.size()) - 1; dim >= 0; --dim) {
      index_[dim] = row % sizes_[dim];
      row /= sizes_[dim];
      for (size_t t = 0; t < kTensors; ++t) offsets_[t] += index_[dim] * strides_[t][dim];
    }
  }

  void next() {
    for (int64_t dim = static_cast<int64_t>(sizes_.size()) - 1; dim >= 0; --dim) {
      if (++index_[dim] < sizes_[dim]) {
        for (size_t t = 0; t < kTensors; ++t) offsets_[t] += strides_[t][dim];
        return;
      }
      index_[dim] = 0;
      for (size_t t = 0; t < kTensors; ++t) offsets_[t] -= strides_[t][dim] * (sizes_[dim] - 1);
    }
  }

  int64_t offset(size_t tensor) const { return offsets_[tensor]; }

 private:
  c10::SmallVector<int64_t, 6> sizes_, index_;
  std::array<c10::SmallVector<int64_t, 6>, kTensors> strides_;
  std::array<int64_t, kTensors> offsets_{};
};

template <typename scalar_t>
void rotate_row(const scalar_t* x, const opmath_t<scalar_t>* cos, const opmath_t<scalar_t>* sin, scalar_t* out,
                int64_t half, int64_t dim, bool inverse) {
  for_each_vector<scalar_t>(half, [&](int64_t i, int64_t n) {
    auto x1 = load(x + i, n), x2 = load(x + half + i, n);
    auto sin1 = Vec<scalar_t>::loadu(sin + i, n), sin2 = Vec<scalar_t>::loadu(sin + half + i, n);
    auto sin_of_x2 = inverse ? sin2 : sin1.neg();
    auto sin_of_x1 = inverse ? sin1.neg() : sin2;
    store(out + i, x1 * Vec<scalar_t>::loadu(cos + i, n) + x2 * sin_of_x2, n);
    store(out + half + i, x2 * Vec<scalar_t>::loadu(cos + half + i, n) + x1 * sin_of_x1, n);
  });
  std::copy(x + 2 * half, x + dim, out + 2 * half);
}

at::Tensor rope_rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  TORCH_CHECK(x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(),
              "rope_rotate: tensors must be on the CPU");
  TORCH_CHECK(x.dim() >= 1 && cos.sizes() == sin.sizes(), "rope_rotate: cos and sin must share a shape");
  const int64_t dim = x.size(-1);
  const int64_t rotary = cos.size(-1);
  TORCH_CHECK(rotary % 2 == 0 && rotary <= dim, "rope_rotate: rotary dim must be even and <= x's last dim");
  auto table_shape = x.sizes().vec();
  table_shape.back() = rotary;
  // cos/sin are small (no heads dim): converting them is cheap; expand() only sets strides.
  const auto math_type = at::toOpMathType(x.scalar_type());
  const auto cos_rows = cos.to(math_type).contiguous().expand(table_shape);
  const auto sin_rows = sin.to(math_type).contiguous().expand(table_shape);
  const auto x_rows = x.stride(-1) == 1 ? x : x.contiguous();
  auto out = at::empty(x.sizes(), x.options());
  const int64_t rows = dim == 0 ? 0 : x.numel() / dim;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope_rotate", [&] {
    const auto* x_data = x_rows.const_data_ptr<scalar_t>();
    const auto* cos_data = cos_rows.const_data_ptr<opmath_t<scalar_t>>();
    const auto* sin_data = sin_rows.const_data_ptr<opmath_t<scalar_t>>();
    auto* out_data = out.mutable_data_ptr<scalar_t>();
    parallel_rows(rows, dim, [&](int64_t begin, int64_t end) {
      RowWalker<3> walker(x.sizes(), {x_rows.strides(), cos_rows.strides(), sin_rows.strides()});
      walker.seek(begin);
      for (int64_t row = begin; row < end; ++row, walker.next()) {
        rotate_row<scalar_t>(x_data + walker.offset(0), cos_data + walker.offset(1), sin_data + walker.offset(2),
                             out_data + row * dim, rotary / 2, dim, inverse);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace twinkle

TORCH_LIBRARY_FRAGMENT(twinkle_cpu, m) {
  m.def("rope_rotate(Tensor x, Tensor cos, Tensor sin, bool inverse) -> Tensor");
}

TORCH_LIBRARY_IMPL(twinkle_cpu, CPU, m) {
  m.impl("rope_rotate", &twinkle::rope_rotate);
}
