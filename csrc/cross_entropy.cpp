// Cross-entropy of each row of an fp32 logits buffer, and in place its gradient: the per-chunk step
// of the chunked fused linear cross-entropy (kernels/fused_linear_cross_entropy/chunked.py).
//
//   loss = logsumexp(x) - (1 - smoothing) * x[label] - smoothing / V * sum(x)
//   d loss / d x = softmax(x) - smoothing / V - (1 - smoothing) * [column == label]
//
// One exponential per logit, and the row reread from this core's L2 (600 KB at a 152k vocabulary)
// rather than from memory: pass 1 finds the row's max, pass 2 writes exp(x - max) over the row and
// sums it, pass 3 (gradients wanted) scales it by 1 / sum and applies the smoothing and label terms.
// PyTorch's in-place step makes five passes. The exponentials dominate (a row costs ~10x more
// in exp than in L2 reads), which is why this does not use the online two-pass max-and-sum (two
// exponentials per logit).
// With a softcap (x -> softcap * tanh(x / softcap), Gemma-2) the chain rule needs tanh in backward,
// which pass 2's overwrite would lose: that path recomputes it, with an online max-and-sum pass.
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>

#include "cpu_vec.h"

namespace twinkle {
namespace {

using FVec = at::vec::Vectorized<float>;
constexpr int64_t kFloatLanes = FVec::size();

// softcap * tanh(x / softcap) and the tanh (for the chain rule), or x unchanged.
inline FVec capped(const FVec& x, float softcap, FVec* tanh_out) {
  if (softcap <= 0.f) {
    return x;
  }
  const FVec tanh = (x / FVec(softcap)).tanh();
  if (tanh_out != nullptr) {
    *tanh_out = tanh;
  }
  return tanh * FVec(softcap);
}

inline float capped(float x, float softcap) {
  return softcap > 0.f ? softcap * std::tanh(x / softcap) : x;
}

struct RowStats {
  float log_sum_exp;
  float logit_sum;
};

// Pass 1: lanes keep their own running max and sum, merged once at the end.
RowStats row_stats(const float* row, int64_t cols, float softcap, bool want_sum) {
  const float minus_inf = -std::numeric_limits<float>::infinity();
  FVec lane_max(minus_inf), lane_sum(0.f), lane_logits(0.f);
  int64_t col = 0;
  for (; col + kFloatLanes <= cols; col += kFloatLanes) {
    const FVec x = capped(FVec::loadu(row + col), softcap, nullptr);
    const FVec new_max = at::vec::maximum(lane_max, x);
    // A lane that has seen only -inf (a masked column) keeps sum 0 rather than exp(-inf - -inf) = NaN.
    const FVec empty = new_max == FVec(minus_inf);
    const FVec grown = lane_sum * (lane_max - new_max).exp() + (x - new_max).exp();
    lane_sum = FVec::blendv(grown, FVec(0.f), empty);
    lane_max = new_max;
    if (want_sum) {
      lane_logits = lane_logits + x;
    }
  }
  float values[kFloatLanes], sums[kFloatLanes], logits[kFloatLanes];
  lane_max.store(values);
  lane_sum.store(sums);
  lane_logits.store(logits);
  float row_max = minus_inf, logit_sum = 0.f;
  for (int64_t lane = 0; lane < kFloatLanes; ++lane) {
    row_max = std::max(row_max, values[lane]);
    logit_sum += logits[lane];
  }
  for (int64_t tail = col; tail < cols; ++tail) {
    const float x = capped(row[tail], softcap);
    row_max = std::max(row_max, x);
    logit_sum += want_sum ? x : 0.f;
  }
  double exp_sum = 0.0;  // the merge: a few dozen terms, in double
  for (int64_t lane = 0; lane < kFloatLanes; ++lane) {
    if (values[lane] != minus_inf) {
      exp_sum += static_cast<double>(sums[lane]) * std::exp(static_cast<double>(values[lane] - row_max));
    }
  }
  for (int64_t tail = col; tail < cols; ++tail) {
    exp_sum += std::exp(static_cast<double>(capped(row[tail], softcap) - row_max));
  }
  return {row_max + static_cast<float>(std::log(exp_sum)), logit_sum};
}

// Pass 2: the gradient over the row, in place (the label's column corrected afterwards).
void write_gradient(float* row, int64_t cols, int64_t label, float log_sum_exp, float smoothing, float softcap) {
  const float uniform = smoothing / static_cast<float>(cols);
  const FVec lse(log_sum_exp), uniform_vec(uniform), one(1.f);
  const float label_tanh = softcap > 0.f ? std::tanh(row[label] / softcap) : 0.f;
  for_each_vector<float>(cols, [&](int64_t col, int64_t count) {
    FVec tanh;
    const FVec x = capped(FVec::loadu(row + col, count), softcap, &tanh);
    FVec grad = (x - lse).exp() - uniform_vec;
    if (softcap > 0.f) {
      grad = grad * (one - tanh * tanh);
    }
    grad.store(row + col, count);
  });
  row[label] -= (1.f - smoothing) * (softcap > 0.f ? 1.f - label_tanh * label_tanh : 1.f);
}

// No softcap: max, exp-and-sum in place, scale (see the top of this file). Returns the row's loss.
float plain_row(float* row, int64_t cols, int64_t label, bool want_grad, float smoothing) {
  const float minus_inf = -std::numeric_limits<float>::infinity();
  FVec lane_max(minus_inf), lane_logits(0.f);
  for_each_vector<float>(cols, [&](int64_t col, int64_t count) {
    const FVec x = FVec::loadu(row + col, count);
    lane_max = FVec::set(lane_max, at::vec::maximum(lane_max, x), count);  // lanes past count stay
    if (smoothing != 0.f) {
      lane_logits = lane_logits + x;  // loaded as zero past count; skipped unless used (-inf * 0 is NaN)
    }
  });
  const float row_max = at::vec::vec_reduce_all<float>([](auto& a, auto& b) { return at::vec::maximum(a, b); },
                                                      lane_max);
  const float label_logit = row[label];
  const FVec max_vec(row_max);
  FVec lane_sum(0.f);
  for_each_vector<float>(cols, [&](int64_t col, int64_t count) {
    const FVec e = (FVec::loadu(row + col, count) - max_vec).exp();
    lane_sum = lane_sum + FVec::set(FVec(0.f), e, count);
    if (want_grad) {
      e.store(row + col, count);
    }
  });
  const float exp_sum = reduce_sum(lane_sum);
  if (want_grad) {
    const FVec inverse(1.f / exp_sum), uniform(smoothing / static_cast<float>(cols));
    for_each_vector<float>(cols, [&](int64_t col, int64_t count) {
      at::vec::fmsub(FVec::loadu(row + col, count), inverse, uniform).store(row + col, count);
    });
    row[label] -= 1.f - smoothing;
  }
  const float smoothing_term = smoothing != 0.f ? smoothing / static_cast<float>(cols) * reduce_sum(lane_logits) : 0.f;
  return row_max + std::log(exp_sum) - (1.f - smoothing) * label_logit - smoothing_term;
}

// With a softcap: online max-and-sum, then the gradient with tanh recomputed.
float softcapped_row(float* row, int64_t cols, int64_t label, bool want_grad, float smoothing, float softcap) {
  const RowStats stats = row_stats(row, cols, softcap, smoothing != 0.f);
  const float loss = stats.log_sum_exp - (1.f - smoothing) * capped(row[label], softcap) -
                     smoothing / static_cast<float>(cols) * stats.logit_sum;
  if (want_grad) {
    write_gradient(row, cols, label, stats.log_sum_exp, smoothing, softcap);
  }
  return loss;
}

at::Tensor cross_entropy_rows_(at::Tensor& logits, const at::Tensor& labels, bool want_grad, double label_smoothing,
                               std::optional<double> softcap) {
  TORCH_CHECK(logits.device().is_cpu() && labels.device().is_cpu(), "cross_entropy_rows_: tensors must be on the CPU");
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1,
              "cross_entropy_rows_: logits must be a 2-D fp32 buffer with contiguous rows");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0) && labels.scalar_type() == at::kLong,
              "cross_entropy_rows_: labels must be int64 with one entry per row of logits");
  TORCH_CHECK(!softcap.has_value() || *softcap > 0, "cross_entropy_rows_: softcap must be > 0");
  const int64_t rows = logits.size(0), cols = logits.size(1), stride = logits.stride(0);
  const auto label_values = labels.contiguous();
  const int64_t* label_of = label_values.const_data_ptr<int64_t>();
  for (int64_t row = 0; row < rows; ++row) {
    TORCH_CHECK(label_of[row] >= 0 && label_of[row] < cols, "cross_entropy_rows_: label ", label_of[row],
                " of row ", row, " is outside [0, ", cols, ")");
  }
  auto loss = at::empty({rows}, logits.options());
  float* data = logits.mutable_data_ptr<float>();
  float* loss_of = loss.mutable_data_ptr<float>();
  const float smoothing = static_cast<float>(label_smoothing);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      float* values = data + row * stride;
      loss_of[row] = softcap.has_value()
                         ? softcapped_row(values, cols, label_of[row], want_grad, smoothing, static_cast<float>(*softcap))
                         : plain_row(values, cols, label_of[row], want_grad, smoothing);
    }
  });
  return loss;
}

}  // namespace
}  // namespace twinkle

TORCH_LIBRARY_FRAGMENT(twinkle_cpu, m) {
  m.def("cross_entropy_rows_(Tensor(a!) logits, Tensor labels, bool want_grad, float label_smoothing, "
        "float? softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(twinkle_cpu, CPU, m) {
  m.impl("cross_entropy_rows_", &twinkle::cross_entropy_rows_);
}
