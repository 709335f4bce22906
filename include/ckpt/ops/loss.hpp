// ckpt — cross-entropy with integer class labels (logits are classes x batch).
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/detail/accumulate.hpp"
#include "ckpt/ops/operand.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <span>
#include <vector>

namespace ckpt {

namespace detail {

template <class T>
struct cross_entropy_entry {
  operand<T> x;
  const int* labels;
  std::uint32_t out;
  template <class TapeT>
  void backward(TapeT& t) const {
    const T* g = t.adjoint_if(out);
    if (!g) return;
    T* dx = t.adjoint_of(x);
    const int r = x.dims.rows, n = x.dims.cols;
    const T scale = g[0] / static_cast<T>(n);
    for (int j = 0; j < n; ++j) {
      const T* in = x.value + static_cast<long>(j) * r;
      T mx = -std::numeric_limits<T>::infinity();
      for (int i = 0; i < r; ++i) mx = std::max(mx, in[i]);
      T sum(0);
      for (int i = 0; i < r; ++i) sum += std::exp(in[i] - mx);
      T* d = dx + static_cast<long>(j) * r;
      for (int i = 0; i < r; ++i) d[i] += scale * (std::exp(in[i] - mx) / sum - (i == labels[j] ? T(1) : T(0)));
    }
  }
};

}  // namespace detail

/// Mean over the batch of -log softmax(logits)[label]. logits: classes x batch; one label
/// in [0, classes) per column.
template <expr::Operand X>
auto cross_entropy(X&& logits, std::span<const int> labels) {
  const shape s = detail::shape_of(logits, "cross_entropy");
  if (static_cast<long>(labels.size()) != s.cols)
    throw shape_error(detail::cat("cross_entropy: ", labels.size(), " labels for logits ", s, " (one per column expected)"));
  for (std::size_t j = 0; j < labels.size(); ++j)
    if (labels[j] < 0 || labels[j] >= s.rows)
      throw shape_error(detail::cat("cross_entropy: label ", labels[j], " of column ", j, " is outside [0, ", s.rows, ") for logits ", s));
  auto x = detail::resolve(logits, "cross_entropy");
  auto& t = detail::tape_of(x, "cross_entropy");
  using T = typename std::remove_reference_t<decltype(t)>::value_type;
  const std::uint32_t begin = static_cast<std::uint32_t>(t.node_count());
  const std::uint32_t out = t.new_output({1, 1}, "cross_entropy", op_kind::reduction, x.ref.requires_grad);
  if (!t.is_replayed(out)) {
    // The batch's terms are added in the order of detail/accumulate.hpp.
    const auto total = detail::lane_sum<T>(s.cols, [&](long j) {
      const T* in = x.ref.value + j * s.rows;
      T mx = -std::numeric_limits<T>::infinity();
      for (int i = 0; i < s.rows; ++i) mx = std::max(mx, in[i]);
      T sum(0);
      for (int i = 0; i < s.rows; ++i) sum += std::exp(in[i] - mx);
      return mx + std::log(sum) - in[labels[static_cast<std::size_t>(j)]];
    });
    t.node(out).value[0] = s.cols > 0 ? static_cast<T>(total / s.cols) : T(0);
  }
  if (x.ref.requires_grad) {
    int* stored = t.template make_array<int>(labels.size());
    std::copy(labels.begin(), labels.end(), stored);
    t.push_entry(detail::cross_entropy_entry<T>{x.ref, stored, out}, begin);
  }
  return t.var_of(out);
}
template <expr::Operand X>
auto cross_entropy(X&& logits, const std::vector<int>& labels) {
  return cross_entropy(logits, std::span<const int>(labels));
}


// Found by argument-dependent lookup for expression arguments too (expressions live in
// ckpt::expr), so that `tanh(a + b)` means ckpt::tanh without `using namespace ckpt`.
namespace expr {
using ckpt::cross_entropy;
}  // namespace expr

}  // namespace ckpt
