// ckpt — cross-entropy with integer class labels (logits are classes x batch).
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/detail/accumulate.hpp"
#include "ckpt/ops/operand.hpp"
#include "ckpt/ops/rowwise.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <span>
#include <vector>

namespace ckpt {

namespace detail {

/// Column j's loss term, log-sum-exp minus the labelled logit, into loss[j]; the column's
/// maximum and sum of exp(x - max) into st[2j], st[2j + 1] for the reverse.
template <class T>
struct cross_entropy_term {
  const T* x;
  const int* labels;
  T* loss;
  T* st;
  int rows;
  template <class Lanes>
  CKPT_HOST_DEVICE void operator()(long j, const Lanes& lanes) const {
    const T* in = x + j * rows;
    T mx, sum;
    const T lse = column_logsumexp(in, rows, lanes, mx, sum);
    if (lanes.lane() == 0) {
      loss[j] = lse - in[labels[j]];
      st[2 * j] = mx;
      st[2 * j + 1] = sum;
    }
  }
};
template <class T>
struct element_of {
  const T* values;
  CKPT_HOST_DEVICE T operator()(long j) const { return values[j]; }
};
template <class T>
struct mean_over {
  int n;
  CKPT_HOST_DEVICE T operator()(accumulator_t<T> total) const { return n > 0 ? static_cast<T>(total / n) : T(0); }
};

/// dx of column j: scale * (softmax(x) - onehot(label)), softmax from the forward's maximum
/// and sum (the values the forward rounded to T, so the bits are those of recomputing them).
template <class T>
struct cross_entropy_back {
  const T* x;
  const int* labels;
  const T* st;
  const T* g;  // the loss's 1x1 adjoint, read where the loop runs
  T* dx;
  int rows, cols;
  template <class Lanes>
  CKPT_HOST_DEVICE void operator()(long j, const Lanes& lanes) const {
    const T scale = g[0] / static_cast<T>(cols);
    const T* in = x + j * rows;
    const T mx = st[2 * j], per_exp = scale / st[2 * j + 1];
    const int label = labels[j];
    T* d = dx + j * rows;
    for (int i = lanes.lane(); i < rows; i += lanes.width()) d[i] += fn::exp_(in[i] - mx) * per_exp - (i == label ? scale : T(0));
  }
};

/// The labels: the first slots of a node's buffer (on the backend, released with the entry like any
/// activation); a T holds an int.
template <class TapeT>
const int* labels_of(TapeT& t, std::uint32_t node) {
  static_assert(sizeof(typename TapeT::value_type) >= sizeof(int));
  return reinterpret_cast<const int*>(static_cast<const void*>(t.node(node).value));
}

template <class T>
struct cross_entropy_entry {
  operand<T> x;
  std::uint32_t kept;  // 3 x cols values: the labels (ints), then each column's maximum and sum of exps
  std::uint32_t out;
  template <class TapeT>
  void backward(TapeT& t) const {
    using B = typename TapeT::backend_type;
    const T* g = t.adjoint_if(out);
    if (!g) return;
    T* dx = t.adjoint_of(x);
    B::for_each_column(x.dims, cross_entropy_back<T>{x.value, labels_of(t, kept), t.node(kept).value + x.dims.cols, g, dx, x.dims.rows,
                                                     x.dims.cols});
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
  using B = typename std::remove_reference_t<decltype(t)>::backend_type;
  const bool grad = x.ref.requires_grad;
  const std::uint32_t begin = static_cast<std::uint32_t>(t.node_count());
  // What the kernels read besides the logits, 3 x cols values: first the labels (an int in
  // each T-sized slot), copied to the backend so that forward and reverse kernels read them
  // there; then each column's maximum and sum of exp(x - max), in pairs, kept for the reverse,
  // whose dx is then one exp an element where recomputing them was three passes over the
  // logits (the forward always computes them, and with them the loss).
  const detail::kept_for_reverse<T, B> kept(t, {3, s.cols}, "cross_entropy.kept", op_kind::reduction, grad);
  T* buffer = kept.data();
  int* label_buffer = kept.template data<int>();
  B::from_host(label_buffer, labels.data(), static_cast<long>(labels.size()));
  const std::uint32_t out = t.new_output({1, 1}, "cross_entropy", op_kind::reduction, grad, false);
  // Each column's term, then their sum in the order of detail/accumulate.hpp.
  T* losses = B::template scratch<T>(s.cols);
  B::for_each_column(s, detail::cross_entropy_term<T>{x.ref.value, label_buffer, losses, buffer + s.cols, s.rows});
  B::sum(t.node(out).value, s.cols, detail::element_of<T>{losses}, detail::mean_over<T>{s.cols});
  if (grad) t.push_entry(detail::cross_entropy_entry<T>{x.ref, kept.node(), out}, begin);
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
