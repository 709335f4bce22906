// ckpt — assigning an expression: one tape node, one fused forward loop, one entry whose
// reverse walks the same tree. (The CUDA backend runs the same two loops as kernels.)
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/core/tape.hpp"
#include "ckpt/detail/accumulate.hpp"
#include "ckpt/expr/expression.hpp"

#include <utility>

namespace ckpt::expr {

// Loop bodies are functors with a CKPT_HOST_DEVICE call operator, not lambdas: the CUDA
// backend runs the same bodies in its kernels.

/// e's element i of a dense output, or (r, c) when an operand broadcasts.
template <class E>
struct expression_at {
  E e;
  CKPT_HOST_DEVICE auto operator()(long i) const { return e.at(i); }
  CKPT_HOST_DEVICE auto operator()(int r, int c) const { return e.at(r, c); }
};

/// Writes e into out (rows x cols, column-major): one pass, no temporaries.
template <class E, class T>
void evaluate(const E& e, T* out, shape s, bool dense) {
  using B = backend_of<E>;
  if (dense)
    B::assign(s.size(), out, expression_at<E>{e});
  else
    B::assign_2d(s, out, expression_at<E>{e});
}

// ------------------------------------------------------------------ where the output's gradient comes from

/// The output's adjoint, element by element.
template <class T>
struct adjoint_source {
  const T* g;
  CKPT_HOST_DEVICE T operator()(long i) const { return g[i]; }
};
/// One number for every element (the reverse of a reduction to 1x1).
template <class T>
struct scalar_source {
  const T* g;  // 1x1, read where the loop runs (no copy to the host)
  T scale;
  CKPT_HOST_DEVICE T operator()(long) const { return g[0] * scale; }
};
/// g * f'(x) of the root f, taken from the stored output y = f(x) (reverse_from_output).
template <class Root, class T>
struct output_source {
  Root root;
  const T* y;
  const T* g;
  CKPT_HOST_DEVICE T operator()(long i) const { return root.chain_out(y[i], g[i]); }
};

namespace reverse {

template <unsigned Mask, class E, class G>
struct back_flat {
  E e;
  G g;
  CKPT_HOST_DEVICE void operator()(long i) const { e.template back<Mask, 0>(i, g(i)); }
};
template <unsigned Mask, class E, class G>
struct back_2d {
  E e;
  G g;
  int rows;
  CKPT_HOST_DEVICE void operator()(int r, int c) const { e.template back<Mask, 0>(r, c, g(r + static_cast<long>(c) * rows)); }
};

/// The reverse loop for one set of leaves with adjoints (Mask), or `checked`.
template <unsigned Mask, class E, class G>
void back_loop(const E& e, const G& g, shape s, bool dense) {
  using B = backend_of<E>;
  if (dense)
    B::for_each(s.size(), back_flat<Mask, E, G>{e, g});
  else
    B::for_each_2d(s, back_2d<Mask, E, G>{e, g, s.rows});
}

template <class E, class G, unsigned... Masks>
void back_dispatch(unsigned mask, const E& e, const G& g, shape s, bool dense,
                   std::integer_sequence<unsigned, Masks...>) {
  (void)((mask == Masks ? (back_loop<Masks>(e, g, s, dense), true) : false) || ...);
}

/// Trees with more leaves than this keep the run-time test per leaf (2^leaves loop versions
/// would cost more compile time than they save).
inline constexpr int max_dispatched_leaves = 4;

/// Which leaves have an adjoint, read once; then the loop compiled for exactly those runs,
/// free of per-element tests, so that it vectorises.
template <class E, class G>
void dispatch(const E& e, const G& g, shape s, bool dense) {
  constexpr int leaves = E::leaf_count;
  if constexpr (leaves <= max_dispatched_leaves) {
    back_dispatch(e.template adjoint_mask<0>(), e, g, s, dense, std::make_integer_sequence<unsigned, (1u << leaves)>{});
  } else {
    back_loop<checked>(e, g, s, dense);
  }
}

/// Leaf K's share of output element (r, c): what the reverse would add into its adjoint there.
template <int K, class E, class G>
struct broadcast_share {
  E e;
  G g;
  int rows;  // the output's
  CKPT_HOST_DEVICE typename E::value_type operator()(long r, long c) const {
    return e.template share<K, 0>(static_cast<int>(r), static_cast<int>(c), g(r + c * rows));
  }
};
/// The reverse of a broadcasting expression. Leaves of the output's shape take one pass over
/// the output, each element its own writer. A broadcast leaf's element receives a share from
/// every output element it was broadcast to; those shares are summed by the backend's
/// reductions (the total for a 1 x 1 leaf, row sums for rows x 1, column sums for 1 x cols),
/// which add in accumulator_t<T> (double for float) in an order fixed by the shapes, and
/// without two threads adding into one element on CUDA. (Added one by one
/// into a float adjoint, a 1x1 operand's gradient over 4096 x 4096 elements was 2% off.)
template <class E, class G>
void owner_computes(const E& e, const G& g, shape s) {
  static_assert(E::leaf_count <= 32, "ckpt: an expression with more than 32 tensor operands");
  using B = backend_of<E>;
  E same_shape = e;
  same_shape.visit_leaves([s](auto, auto& leaf) {
    if (leaf.dims() != s) leaf.adj = nullptr;
  });
  if (same_shape.template adjoint_mask<0>() != 0) dispatch(same_shape, g, s, false);
  E all = e;
  all.visit_leaves([&](auto k, auto& leaf) {
    if (!leaf.adj || leaf.dims() == s || leaf.dims().size() == 0) return;
    constexpr int K = decltype(k)::value;
    B::add_broadcast_sums(leaf.adj, leaf.dims(), s, broadcast_share<K, E, G>{e, g, s.rows});
  });
}

}  // namespace reverse

/// Adds g(i) * d(e)/d(leaf) into the adjoints of e's leaves (e bound to a tape); g(i) is the
/// output's gradient at flat index i (a functor, see adjoint_source).
template <class E, class G>
void backpropagate_with(const E& e, const G& g, shape s, bool dense) {
  if constexpr (E::leaf_count > 1) {  // one tensor operand is never broadcast (scalars are not leaves)
    if (!dense) {
      reverse::owner_computes(e, g, s);
      return;
    }
  }
  reverse::dispatch(e, g, s, dense);
}

/// Adds g * d(e)/d(leaf) into the leaves' adjoints.
template <class E, class T>
void backpropagate(const E& e, const T* g, shape s, bool dense) {
  backpropagate_with(e, adjoint_source<T>{g}, s, dense);
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
      using T = typename E::value_type;
      backpropagate_with(bound.e, output_source<E, T>{bound, t.node(out).value, g}, dims, dense);
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
