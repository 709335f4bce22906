// ckpt — assigning an expression: one tape node, one fused forward loop, one entry whose
// reverse walks the same tree. (The CUDA backend runs the same two loops as kernels.)
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/core/tape.hpp"
#include "ckpt/expr/expression.hpp"

namespace ckpt::expr {

/// Writes e into out (rows x cols, column-major): one pass, no temporaries.
template <class E, class T>
void evaluate(const E& e, T* out, shape s, bool dense) {
  if (dense) {
    const long n = s.size();
    for (long i = 0; i < n; ++i) out[i] = e.at(i);
  } else {
    for (int c = 0; c < s.cols; ++c)
      for (int r = 0; r < s.rows; ++r) out[r + static_cast<long>(c) * s.rows] = e.at(r, c);
  }
}

/// Adds g * d(e)/d(leaf) into the leaves' adjoints.
template <class E, class T>
void backpropagate(const E& e, const T* g, shape s, bool dense) {
  if (dense) {
    const long n = s.size();
    for (long i = 0; i < n; ++i) e.back(i, g[i]);
  } else {
    for (int c = 0; c < s.cols; ++c)
      for (int r = 0; r < s.rows; ++r) e.back(r, c, g[r + static_cast<long>(c) * s.rows]);
  }
}

template <class E>
struct elementwise_entry {
  E e;
  std::uint32_t out;
  shape dims;
  bool dense;

  template <class TapeT>
  void backward(TapeT& t) const {
    const auto* g = t.adjoint_if(out);
    if (!g) return;
    E bound = e;
    bound.bind(t);
    backpropagate(bound, g, dims, dense);
  }
};

template <Expression E>
auto record(const E& expression) {
  using T = typename E::value_type;
  using B = typename E::backend_type;
  static_assert(!std::is_void_v<B>, "ckpt: an expression needs at least one tensor operand");
  Tape<T, B>* t = expression.tape_ptr();
  if (!t)
    throw tape_error(detail::cat(E::name, ": the expression has no Var operand, so no tape to record on; "
                                          "bring a parameter onto a tape with tape.param(p)"));
  E e = expression;
  e.validate(E::name);  // its Vars may have been invalidated since the expression was built
  const shape s = e.dims();
  const bool dense = e.dense(s);
  if (!dense) e.set_strides(s);
  const bool grad = e.requires_grad();
  const std::uint32_t begin = static_cast<std::uint32_t>(t->node_count());
  const std::uint32_t out = t->new_output(s, E::name, op_kind::elementwise, grad);
  if (!t->is_replayed(out)) evaluate(e, t->node(out).value, s, dense);
  if (grad) t->push_entry(elementwise_entry<E>{e, out, s, dense}, begin);
  return t->var_of(out);
}

}  // namespace ckpt::expr

namespace ckpt {

template <class T, Backend B>
template <class E>
  requires requires { typename E::is_expression; }
Var<T, B>::Var(const E& expression) : Var(expr::record(expression)) {
  static_assert(std::is_same_v<typename E::value_type, T>, "ckpt: assigning a double expression to a float Var or back");
  static_assert(std::is_same_v<typename E::backend_type, B>, "ckpt: assigning an expression to a Var of another backend");
}

/// Records an expression explicitly (what `Var y = expression;` does).
template <expr::Expression E>
auto eval(const E& expression) {
  return expr::record(expression);
}
template <class T, Backend B>
Var<T, B> eval(const Var<T, B>& v) {
  return v;
}

}  // namespace ckpt
