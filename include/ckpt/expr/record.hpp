// ckpt — assigning an expression: one tape node, one fused forward loop, one entry whose
// reverse walks the same tree. (The CUDA backend runs the same two loops as kernels.)
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/core/tape.hpp"
#include "ckpt/expr/expression.hpp"

#include <utility>

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

namespace reverse {

/// The reverse loop for one set of leaves with adjoints (Mask), or `checked`.
template <unsigned Mask, class E, class G>
void back_loop(const E& e, const G& g, shape s, bool dense) {
  if (dense) {
    const long n = s.size();
    for (long i = 0; i < n; ++i) e.template back<Mask, 0>(i, g(i));
  } else {
    for (int c = 0; c < s.cols; ++c)
      for (int r = 0; r < s.rows; ++r) e.template back<Mask, 0>(r, c, g(r + static_cast<long>(c) * s.rows));
  }
}

template <class E, class G, unsigned... Masks>
void back_dispatch(unsigned mask, const E& e, const G& g, shape s, bool dense,
                   std::integer_sequence<unsigned, Masks...>) {
  (void)((mask == Masks ? (back_loop<Masks>(e, g, s, dense), true) : false) || ...);
}

/// Trees with more leaves than this keep the run-time test per leaf (2^leaves loop versions
/// would cost more compile time than they save).
inline constexpr int max_dispatched_leaves = 4;

}  // namespace reverse

/// Adds g(i) * d(e)/d(leaf) into the adjoints of e's leaves (e bound to a tape); g(i) is the
/// output's gradient at flat index i. Which leaves have an adjoint is read once, and the loop
/// compiled for exactly those runs, free of per-element tests, so that it vectorises.
template <class E, class G>
void backpropagate_with(const E& e, const G& g, shape s, bool dense) {
  constexpr int leaves = E::leaf_count;
  if constexpr (leaves <= reverse::max_dispatched_leaves) {
    reverse::back_dispatch(e.template adjoint_mask<0>(), e, g, s, dense,
                           std::make_integer_sequence<unsigned, (1u << leaves)>{});
  } else {
    reverse::back_loop<checked>(e, g, s, dense);
  }
}

/// Adds g * d(e)/d(leaf) into the leaves' adjoints.
template <class E, class T>
void backpropagate(const E& e, const T* g, shape s, bool dense) {
  backpropagate_with(e, [g](long i) { return g[i]; }, s, dense);
}

template <class E>
inline constexpr bool reverse_from_output = requires { requires E::reverse_from_output; };

template <class E>
struct elementwise_entry {
  E e;
  std::uint32_t out;
  shape dims;
  bool dense;

  /// The root's derivative comes from the stored output (relu(W x + b): y > 0), and what lies
  /// below it is linear in the leaves: the reverse reads no operand value.
  static constexpr bool from_output = reverse_from_output<E>;
  static constexpr bool reads_operands = !from_output && E::reads_values;

  template <class TapeT>
  void backward(TapeT& t) const {
    const auto* g = t.adjoint_if(out);
    if (!g) return;
    E bound = e;
    bound.bind(t);
    if constexpr (from_output) {
      const auto* y = t.node(out).value;
      backpropagate_with(bound.e, [&bound, g, y](long i) { return bound.chain_out(y[i], g[i]); }, dims, dense);
    } else {
      backpropagate(bound, g, dims, dense);
    }
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
  const std::uint32_t out = t->new_output(s, E::name, op_kind::elementwise, grad, true, &detail::form_tag<E>);
  if (!t->is_replayed(out)) evaluate(e, t->node(out).value, s, dense);
  if (grad) t->push_entry(elementwise_entry<E>{e, out, s, dense}, begin);
  // Nothing reads the temporaries again when the reverse reads no operand (or there is none).
  if (!grad || !elementwise_entry<E>::reads_operands) e.consume_temporaries();
  if (!grad || !elementwise_entry<E>::from_output) t->set_consumable(out);
  return t->var_of(out);
}

}  // namespace ckpt::expr

namespace ckpt {

template <class T, Backend B>
template <class E>
  requires requires { typename std::remove_cvref_t<E>::is_expression; }
Var<T, B>::Var(E&& expression) : Var(expr::record(expr::to_expr(std::forward<E>(expression), "assign"))) {
  using X = std::remove_cvref_t<E>;
  static_assert(std::is_same_v<typename X::value_type, T>, "ckpt: assigning a double expression to a float Var or back");
  static_assert(std::is_same_v<typename X::backend_type, B>, "ckpt: assigning an expression to a Var of another backend");
}

/// Records an expression explicitly (what `Var y = expression;` does).
template <class E>
  requires expr::Expression<std::remove_cvref_t<E>>
auto eval(E&& expression) {
  return expr::record(expr::to_expr(std::forward<E>(expression), "eval"));
}
template <class T, Backend B>
Var<T, B> eval(const Var<T, B>& v) {
  if (v.tape()) {
    v.tape()->check(v, "eval");
    v.tape()->count_use(v.index());  // the copy returned is no temporary of its own
  }
  return v;
}

}  // namespace ckpt
