// What every twinkle CPU kernel shares: vector loads that upcast any floating dtype to its math
// type (fp32 for fp32/bf16/fp16, fp64 for fp64), stores that round once, a loop over a row in
// vector-sized steps, and the row-parallel loop. Kernels are written once against these and
// instantiated per dtype by AT_DISPATCH.
#pragma once

// Narrow includes (not ATen/ATen.h): they halve the first-use build time.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <type_traits>

namespace twinkle {

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

template <typename scalar_t>
using Vec = at::vec::Vectorized<opmath_t<scalar_t>>;

template <typename scalar_t>
constexpr int64_t kLanes = Vec<scalar_t>::size();

// Loads `count` (<= kLanes) elements; lanes past `count` are zero.
template <typename scalar_t>
inline Vec<scalar_t> load(const scalar_t* data, int64_t count = kLanes<scalar_t>) {
  if constexpr (std::is_same_v<scalar_t, opmath_t<scalar_t>>) {
    return Vec<scalar_t>::loadu(data, count);
  } else {
    return at::vec::convert<opmath_t<scalar_t>>(at::vec::Vectorized<scalar_t>::loadu(data, count));
  }
}

template <typename scalar_t>
inline void store(scalar_t* data, const Vec<scalar_t>& value, int64_t count = kLanes<scalar_t>) {
  if constexpr (std::is_same_v<scalar_t, opmath_t<scalar_t>>) {
    value.store(data, count);
  } else {
    at::vec::convert<scalar_t>(value).store(data, count);
  }
}

// Calls step(offset, count) over [0, length) in vectors of the math type; only the last is partial.
template <typename scalar_t, typename Step>
inline void for_each_vector(int64_t length, const Step& step) {
  int64_t offset = 0;
  for (; offset + kLanes<scalar_t> <= length; offset += kLanes<scalar_t>) {
    step(offset, kLanes<scalar_t>);
  }
  if (offset < length) {
    step(offset, length - offset);
  }
}

template <typename T>
inline T reduce_sum(const at::vec::Vectorized<T>& value) {
  return at::vec::vec_reduce_all<T>([](auto& a, auto& b) { return a + b; }, value);
}

// Rows are independent: split them over the intra-op threads, each task large enough
// (~64K elements) that the fork costs nothing next to the work.
template <typename Body>
inline void parallel_rows(int64_t rows, int64_t row_length, const Body& body) {
  constexpr int64_t kGrainElements = 1 << 16;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, row_length));
  at::parallel_for(0, rows, grain, body);
}

}  // namespace twinkle
