// ckpt — reductions to a 1x1 value: sum, mean, mean squared error. The reduced expression is
// fused into the reduction's own loop (no temporary for `sum(square(a - b))`).
// The additions go in the order of detail/accumulate.hpp.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/detail/accumulate.hpp"
#include "ckpt/expr/expression.hpp"
#include "ckpt/expr/record.hpp"

namespace ckpt {

namespace detail {

/// The terms of a reduction: the expression's elements, by flat index or by coordinates.
template <class E>
struct flat_term {
  E e;
  CKPT_HOST_DEVICE typename E::value_type operator()(long i) const { return e.at(i); }
};
template <class E>
struct grid_term {
  E e;
  CKPT_HOST_DEVICE typename E::value_type operator()(int r, int c) const { return e.at(r, c); }
};
/// The accumulated sum times a scale, rounded to T once.
template <class T>
struct scaled_total {
  accumulator_t<T> scale;
  CKPT_HOST_DEVICE T operator()(accumulator_t<T> total) const { return static_cast<T>(total * scale); }
};

template <class E>
struct reduce_entry {
  using T = typename E::value_type;
  E e;
  std::uint32_t out;
  shape dims;
  bool dense;
  T scale;

  template <class TapeT>
  void backward(TapeT& t) const {
    const T* g = t.adjoint_if(out);
    if (!g) return;
    E bound = e;
    bound.bind(t);
    expr::backpropagate_with(bound, expr::scalar_source<T>{g, scale}, dims, dense);
  }
};

template <expr::Expression E>
auto record_reduce(const E& expression, const char* op, bool average) {
  using T = typename E::value_type;
  auto* t = expression.tape_ptr();
  if (!t) throw tape_error(cat(op, ": the operand is not on a tape; bring a parameter onto one with tape.param(p)"));
  E e = expression;
  e.validate(op);
  const shape s = e.dims();
  const bool dense = e.dense(s);
  if (!dense) e.set_strides(s);
  const T scale = average ? (s.size() > 0 ? T(1) / static_cast<T>(s.size()) : T(0)) : T(1);
  const bool grad = e.requires_grad();
  const std::uint32_t begin = static_cast<std::uint32_t>(t->node_count());
  const std::uint32_t out = t->new_output({1, 1}, op, op_kind::reduction, grad, true, &form_tag<E>);
  if (!t->is_replayed(out)) {
    using A = accumulator_t<T>;
    using Bk = typename E::backend_type;
    const scaled_total<T> finish{average ? (s.size() > 0 ? A(1) / static_cast<A>(s.size()) : A(0)) : A(1)};
    if (dense)
      Bk::sum(t->node(out).value, s.size(), flat_term<E>{e}, finish);
    else
      Bk::sum_2d(t->node(out).value, s, grid_term<E>{e}, finish);
  }
  if (grad) t->push_entry(reduce_entry<E>{e, out, s, dense, scale}, begin);
  return t->var_of(out);
}

}  // namespace detail

/// Sum of all elements, 1x1.
template <expr::Operand X>
auto sum(X&& x) {
  return detail::record_reduce(expr::to_expr(x, "sum"), "sum", false);
}

/// Mean of all elements, 1x1.
template <expr::Operand X>
auto mean(X&& x) {
  return detail::record_reduce(expr::to_expr(x, "mean"), "mean", true);
}

/// Mean squared error mean((a - b)^2) over all elements; a and b must have the same shape.
template <expr::Operand A, expr::Operand Bv>
auto mse(A&& a, Bv&& b) {
  auto ea = expr::to_expr(a, "mse");
  auto eb = expr::to_expr(b, "mse");
  if (ea.dims() != eb.dims()) throw shape_error(detail::cat("mse: prediction ", ea.dims(), " and target ", eb.dims(), " differ"));
  auto diff = expr::binary<fn::sub, decltype(ea), decltype(eb)>(fn::sub{}, ea, eb);
  return detail::record_reduce(expr::unary<fn::square, decltype(diff)>{fn::square{}, diff}, "mse", true);
}


// Found by argument-dependent lookup for expression arguments too (expressions live in
// ckpt::expr), so that `tanh(a + b)` means ckpt::tanh without `using namespace ckpt`.
namespace expr {
using ckpt::sum, ckpt::mean, ckpt::mse;
}  // namespace expr

}  // namespace ckpt
