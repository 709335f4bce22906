// ckpt — elementwise expression templates. An expression is a compile-time tree of nodes that
// hold operand references by value (never references to temporaries, so an `auto` expression
// cannot dangle). Assigning one to a Var records ONE tape entry: the forward is one loop over
// the elements, the reverse is derived from the tree at compile time (expr/record.hpp).
//
// Every node offers:
//   dims()            its shape (broadcast rules checked when the node is built)
//   tape_ptr()        the tape of its Var operands (null for parameters and scalars)
//   at(i) / at(r, c)  its value at a flat index (dense case) or at output coordinates
//   back(i, g) / back(r, c, g)  adds g * d(node)/d(leaf) into every leaf's adjoint
//   plus set_strides(out), dense(out), bind(tape), requires_grad(), validate(tape), and
//   visit_leaves<Offset>(f), which calls f(std::integral_constant<int, k>, leaf) for each leaf
//   share<K>(r, c, g)  what back(r, c, g) would add into leaf K's adjoint, returned instead:
//                      the reverse of a broadcast leaf sums these (expr/record.hpp)
//
// The reverse loop is fast only when the compiler can vectorise it, which a run-time "does
// this leaf have an adjoint?" test inside the loop prevents (a conditional store). So `back`
// takes the set of leaves to write as a compile-time bit mask (`Mask`, leaves numbered left to
// right from `Offset`): expr/record.hpp reads the mask once with adjoint_mask() and runs the
// loop instantiated for it; `checked` (the default) keeps the run-time test. Every node also
// states its number of leaves, `leaf_count`.
//
// Memory: a Var passed to an expression as a temporary (`relu(matmul(W, h) + b)`) is freed
// once the expression is computed (Tape::consume) if this leaf is the node's one use (nodes
// count operand references and passed-on handles) and the entry's reverse never reads it,
// which each node states at compile time (`reads_values`: does `back` read its leaves'
// values?). The reverse of `relu(linear in its leaves)` reads only the expression's own output
// (`reverse_from_output`), so the product is not kept: the tape holds per layer what PyTorch's
// autograd holds. Each copy of an expression used as an lvalue counts as one more use of its
// temporaries (`keep_temporaries`), so no use frees what another reads.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/core/tape.hpp"
#include "ckpt/expr/functors.hpp"
#include "ckpt/expr/rng.hpp"

#include <concepts>
#include <type_traits>
#include <utility>

namespace ckpt::expr {

template <class E>
concept Expression = requires { typename E::is_expression; };

/// Broadcast shape of two operands: each dimension equal, or 1 on one side.
inline shape broadcast(shape a, shape b, const char* op) {
  auto dim = [&](int x, int y) {
    if (x == y || y == 1) return x;
    if (x == 1) return y;
    throw shape_error(detail::cat(op, ": shapes ", a, " and ", b, " do not match (nor broadcast: a dimension must be equal or 1)"));
  };
  return {dim(a.rows, b.rows), dim(a.cols, b.cols)};
}

/// `back`'s default mask: test each leaf's adjoint at run time.
inline constexpr unsigned checked = ~0u;

/// Whether `Mask` selects any of the `Count` leaves numbered from `Offset`.
template <unsigned Mask, int Offset, int Count>
inline constexpr bool selects =
    Mask == checked || (Count > 0 && ((Mask >> Offset) & ((Count >= 32 ? ~0u : (1u << Count) - 1u))) != 0);

template <class TapeT>
TapeT* common_tape(TapeT* a, TapeT* b, const char* op) {
  if (a && b && a != b) throw tape_error(detail::cat(op, ": the operands belong to different tapes"));
  return a ? a : b;
}

/// Element (r, c) of an operand broadcast to an expression's shape: rs is 1, or 0 along a
/// broadcast column; cs is the operand's rows, or 0 along a broadcast row. GCC takes the test
/// in `rs ? r : 0` out of a column's loop (one version per broadcast pattern, each with plain
/// strides) and vectorises them all, where `r * rs` left a 1 x cols operand's loop scalar (9x
/// slower). Clang does not unswitch it, but versions `r * rs` for rs == 1 itself, where the
/// test left a rows x 1 operand's loop scalar (3.4x slower). See docs/design/reverse-loops.md.
CKPT_HOST_DEVICE inline long broadcast_offset(int r, int c, long rs, long cs) {
#if defined(__clang__)
  return r * rs + c * cs;
#else
  return (rs ? r : 0) + c * cs;
#endif
}

/// A tensor operand: a Var on a tape, or a parameter's buffers.
template <class T, class B>
struct leaf {
  using is_expression = void;
  using value_type = T;
  using backend_type = B;
  static constexpr const char* name = "copy";

  Tape<T, B>* tape = nullptr;  // null for a parameter
  std::uint32_t epoch = 0;
  detail::operand<T> ref;
  T* adj = nullptr;
  long rs = 1, cs = 0;
  bool temporary = false;  // made from an rvalue Var: freed after this use if it is the only one

  shape dims() const { return ref.dims; }
  Tape<T, B>* tape_ptr() const { return tape; }
  bool requires_grad() const { return ref.requires_grad; }
  bool dense(shape out) const { return ref.dims == out; }
  void set_strides(shape out) {
    rs = ref.dims.rows == out.rows ? 1 : 0;
    cs = ref.dims.cols == out.cols ? ref.dims.rows : 0;
  }
  void validate(const char* op) const {
    if (tape) tape->check(Var<T, B>(tape, ref.node, epoch), op);
  }
  void bind(Tape<T, B>& t) { adj = t.adjoint_of(ref); }
  /// A copy for another use: the node now has one use more, so no use frees it.
  void keep_temporaries() {
    if (temporary && tape) tape->count_use(ref.node);
    temporary = false;
  }
  void consume_temporaries() const {
    if (temporary && tape) tape->consume(ref.node);
  }
  template <int Offset = 0, class F>
  void visit_leaves(F&& f) {
    f(std::integral_constant<int, Offset>{}, *this);
  }
  static constexpr int leaf_count = 1;
  static constexpr bool reads_values = false;
  template <int Offset>
  unsigned adjoint_mask() const {
    return adj ? 1u << Offset : 0u;
  }
  CKPT_HOST_DEVICE T at(long i) const { return ref.value[i]; }
  CKPT_HOST_DEVICE T at(int r, int c) const { return ref.value[offset(r, c)]; }
  CKPT_HOST_DEVICE long offset(int r, int c) const { return broadcast_offset(r, c, rs, cs); }
  template <unsigned Mask = checked, int Offset = 0>
  CKPT_HOST_DEVICE void back(long i, T g) const {
    if constexpr (Mask == checked) {
      if (adj) adj[i] += g;
    } else if constexpr (selects<Mask, Offset, 1>) {
      adj[i] += g;
    }
  }
  template <unsigned Mask = checked, int Offset = 0>
  CKPT_HOST_DEVICE void back(int r, int c, T g) const {
    if constexpr (Mask == checked) {
      if (adj) adj[offset(r, c)] += g;
    } else if constexpr (selects<Mask, Offset, 1>) {
      adj[offset(r, c)] += g;
    }
  }
  template <int K, int Offset = 0>
  CKPT_HOST_DEVICE T share(int, int, T g) const {
    static_assert(K == Offset, "ckpt: share<K> called on a subtree without leaf K");
    return g;
  }
};

/// A constant number; broadcasts against anything.
template <class T>
struct scalar {
  using is_expression = void;
  using value_type = T;
  using backend_type = void;
  T v;
  shape dims() const { return {1, 1}; }
  template <class TapeT = void>
  std::nullptr_t tape_ptr() const { return nullptr; }
  bool requires_grad() const { return false; }
  bool dense(shape) const { return true; }
  void set_strides(shape) {}
  void validate(const char*) const {}
  template <class TapeT>
  void bind(TapeT&) {}
  void keep_temporaries() {}
  void consume_temporaries() const {}
  template <int Offset = 0, class F>
  void visit_leaves(F&&) {}
  static constexpr int leaf_count = 0;
  static constexpr bool reads_values = false;
  template <int Offset>
  unsigned adjoint_mask() const {
    return 0u;
  }
  CKPT_HOST_DEVICE T at(long) const { return v; }
  CKPT_HOST_DEVICE T at(int, int) const { return v; }
  template <unsigned Mask = checked, int Offset = 0>
  CKPT_HOST_DEVICE void back(long, T) const {}
  template <unsigned Mask = checked, int Offset = 0>
  CKPT_HOST_DEVICE void back(int, int, T) const {}
  template <int K, int Offset = 0>
  CKPT_HOST_DEVICE T share(int, int, T) const {
    static_assert(K < 0, "ckpt: share<K> called on a constant");
    return T(0);
  }
};

template <class E>
using backend_of = typename E::backend_type;

template <class L, class R>
using common_backend = std::conditional_t<std::is_void_v<backend_of<L>>, backend_of<R>, backend_of<L>>;

template <class L, class R>
inline constexpr bool same_backend =
    std::is_void_v<backend_of<L>> || std::is_void_v<backend_of<R>> || std::is_same_v<backend_of<L>, backend_of<R>>;

template <class E>
auto tape_of(const E& e) {
  if constexpr (std::is_void_v<backend_of<E>>)
    return static_cast<Tape<typename E::value_type, backend::cpu>*>(nullptr);
  else
    return e.tape_ptr();
}

template <class F, class E>
struct unary {
  using is_expression = void;
  using value_type = typename E::value_type;
  using backend_type = typename E::backend_type;
  using T = value_type;
  static constexpr const char* name = F::name;

  F f;
  E e;

  shape dims() const { return e.dims(); }
  auto tape_ptr() const { return e.tape_ptr(); }
  bool requires_grad() const { return e.requires_grad(); }
  bool dense(shape out) const { return e.dense(out); }
  void set_strides(shape out) { e.set_strides(out); }
  void validate(const char* op) const { e.validate(op); }
  template <class TapeT>
  void bind(TapeT& t) { e.bind(t); }
  void keep_temporaries() { e.keep_temporaries(); }
  void consume_temporaries() const { e.consume_temporaries(); }
  template <int Offset = 0, class V>
  void visit_leaves(V&& v) {
    e.template visit_leaves<Offset>(v);
  }
  static constexpr int leaf_count = E::leaf_count;
  static constexpr bool reads_values = E::leaf_count > 0;  // chain() reads e's value
  /// The derivative is a function of the output (f.d reads only y) and e is linear in its
  /// leaves: as the root of an expression, the reverse reads the stored output and no leaf.
  static constexpr bool reverse_from_output = fn::derivative_from_output<F> && !E::reads_values;
  template <int Offset>
  unsigned adjoint_mask() const {
    return e.template adjoint_mask<Offset>();
  }
  CKPT_HOST_DEVICE T at(long i) const { return f(e.at(i)); }
  CKPT_HOST_DEVICE T at(int r, int c) const { return f(e.at(r, c)); }
  /// g * f'(x). A functor may supply the product itself (`back(x, y, g)`): relu selects g
  /// rather than multiplying it by 0 or 1, a conditional multiply the compiler may not
  /// vectorise (it could trap).
  CKPT_HOST_DEVICE T chain(T x, T g) const {
    if constexpr (requires { f.back(x, x, g); })
      return f.back(x, f(x), g);
    else
      return g * f.d(x, f(x));
  }
  /// g * f'(x) from the output y = f(x) (when reverse_from_output).
  CKPT_HOST_DEVICE T chain_out(T y, T g) const {
    if constexpr (requires { f.back_out(y, g); })
      return f.back_out(y, g);
    else
      return g * f.d(y, y);  // d reads only its second argument here
  }
  template <unsigned Mask = checked, int Offset = 0>
  CKPT_HOST_DEVICE void back(long i, T g) const {
    if constexpr (selects<Mask, Offset, leaf_count>) e.template back<Mask, Offset>(i, chain(e.at(i), g));
  }
  template <unsigned Mask = checked, int Offset = 0>
  CKPT_HOST_DEVICE void back(int r, int c, T g) const {
    if constexpr (selects<Mask, Offset, leaf_count>) e.template back<Mask, Offset>(r, c, chain(e.at(r, c), g));
  }
  template <int K, int Offset = 0>
  CKPT_HOST_DEVICE T share(int r, int c, T g) const {
    return e.template share<K, Offset>(r, c, chain(e.at(r, c), g));
  }
};

template <class F, class L, class R>
struct binary {
  static_assert(same_backend<L, R>, "ckpt: an expression mixes tensors of different backends");
  static_assert(std::is_same_v<typename L::value_type, typename R::value_type>,
                "ckpt: an expression mixes float and double tensors");
  using is_expression = void;
  using value_type = typename L::value_type;
  using backend_type = common_backend<L, R>;
  using T = value_type;
  static constexpr const char* name = F::name;

  F f;
  L l;
  R r;
  shape shape_;

  binary(F f_, L l_, R r_) : f(f_), l(l_), r(r_), shape_(broadcast(l.dims(), r.dims(), F::name)) {
    if constexpr (!std::is_void_v<backend_of<L>> && !std::is_void_v<backend_of<R>>)
      (void)common_tape(l.tape_ptr(), r.tape_ptr(), F::name);
  }

  shape dims() const { return shape_; }
  auto tape_ptr() const {
    if constexpr (std::is_void_v<backend_of<L>>)
      return r.tape_ptr();
    else if constexpr (std::is_void_v<backend_of<R>>)
      return l.tape_ptr();
    else
      return common_tape(l.tape_ptr(), r.tape_ptr(), F::name);
  }
  bool requires_grad() const { return l.requires_grad() || r.requires_grad(); }
  bool dense(shape out) const { return l.dense(out) && r.dense(out); }
  void set_strides(shape out) {
    l.set_strides(out);
    r.set_strides(out);
  }
  void validate(const char* op) const {
    l.validate(op);
    r.validate(op);
  }
  template <class TapeT>
  void bind(TapeT& t) {
    l.bind(t);
    r.bind(t);
  }
  void keep_temporaries() {
    l.keep_temporaries();
    r.keep_temporaries();
  }
  void consume_temporaries() const {
    l.consume_temporaries();
    r.consume_temporaries();
  }
  template <int Offset = 0, class V>
  void visit_leaves(V&& v) {
    l.template visit_leaves<Offset>(v);
    r.template visit_leaves<Offset + L::leaf_count>(v);
  }
  static constexpr int leaf_count = L::leaf_count + R::leaf_count;
  /// Which operand values the reverse loads (bit 0: l's, bit 1: r's), given which sides take
  /// an adjoint: add reads neither, mul by a scalar only the scalar.
  CKPT_HOST_DEVICE static constexpr unsigned loads(bool to_l, bool to_r) {
    return (to_l ? fn::da_args<F> : 0u) | (to_r ? fn::db_args<F> : 0u);
  }
  static constexpr unsigned all_loads = loads(L::leaf_count > 0, R::leaf_count > 0);
  static constexpr bool reads_values = ((all_loads & 1u) && L::leaf_count > 0) || ((all_loads & 2u) && R::leaf_count > 0) ||
                                       L::reads_values || R::reads_values;
  template <int Offset>
  unsigned adjoint_mask() const {
    return l.template adjoint_mask<Offset>() | r.template adjoint_mask<Offset + L::leaf_count>();
  }
  CKPT_HOST_DEVICE T at(long i) const { return f(l.at(i), r.at(i)); }
  CKPT_HOST_DEVICE T at(int rr, int c) const { return f(l.at(rr, c), r.at(rr, c)); }
  // Only the operand values the derivatives read are loaded: a value the reverse does not read
  // may have been freed (see the top of this file).
  template <unsigned Mask = checked, int Offset = 0>
  CKPT_HOST_DEVICE void back(long i, T g) const {
    constexpr int right = Offset + L::leaf_count;
    constexpr bool to_l = L::leaf_count > 0 && selects<Mask, Offset, L::leaf_count>;
    constexpr bool to_r = R::leaf_count > 0 && selects<Mask, right, R::leaf_count>;
    constexpr unsigned need = loads(to_l, to_r);
    T a{}, b{};
    if constexpr ((need & 1u) != 0) a = l.at(i);
    if constexpr ((need & 2u) != 0) b = r.at(i);
    if constexpr (to_l) l.template back<Mask, Offset>(i, g * f.da(a, b));
    if constexpr (to_r) r.template back<Mask, right>(i, g * f.db(a, b));
  }
  template <unsigned Mask = checked, int Offset = 0>
  CKPT_HOST_DEVICE void back(int rr, int c, T g) const {
    constexpr int right = Offset + L::leaf_count;
    constexpr bool to_l = L::leaf_count > 0 && selects<Mask, Offset, L::leaf_count>;
    constexpr bool to_r = R::leaf_count > 0 && selects<Mask, right, R::leaf_count>;
    constexpr unsigned need = loads(to_l, to_r);
    T a{}, b{};
    if constexpr ((need & 1u) != 0) a = l.at(rr, c);
    if constexpr ((need & 2u) != 0) b = r.at(rr, c);
    if constexpr (to_l) l.template back<Mask, Offset>(rr, c, g * f.da(a, b));
    if constexpr (to_r) r.template back<Mask, right>(rr, c, g * f.db(a, b));
  }
  template <int K, int Offset = 0>
  CKPT_HOST_DEVICE T share(int rr, int c, T g) const {
    constexpr int right = Offset + L::leaf_count;
    constexpr bool to_l = K < right;
    constexpr unsigned need = loads(to_l, !to_l);
    T a{}, b{};
    if constexpr ((need & 1u) != 0) a = l.at(rr, c);
    if constexpr ((need & 2u) != 0) b = r.at(rr, c);
    if constexpr (to_l)
      return l.template share<K, Offset>(rr, c, g * f.da(a, b));
    else
      return r.template share<K, right>(rr, c, g * f.db(a, b));
  }
};

/// Inverted dropout: keeps an element with probability 1 - p and scales it by 1 / (1 - p).
/// The mask is a pure function of (seed, step, op, element index), so a re-trace reproduces it
/// and the reverse recomputes it instead of storing it.
template <class E>
struct dropout_node {
  using is_expression = void;
  using value_type = typename E::value_type;
  using backend_type = typename E::backend_type;
  using T = value_type;
  static constexpr const char* name = "dropout";

  E e;
  std::uint64_t key;
  float p;
  T scale;
  long rs = 1, cs = 0;

  shape dims() const { return e.dims(); }
  auto tape_ptr() const { return e.tape_ptr(); }
  bool requires_grad() const { return e.requires_grad(); }
  bool dense(shape out) const { return e.dims() == out && e.dense(out); }
  void set_strides(shape out) {
    const shape s = e.dims();
    rs = s.rows == out.rows ? 1 : 0;
    cs = s.cols == out.cols ? s.rows : 0;
    e.set_strides(out);
  }
  void validate(const char* op) const { e.validate(op); }
  template <class TapeT>
  void bind(TapeT& t) { e.bind(t); }
  void keep_temporaries() { e.keep_temporaries(); }
  void consume_temporaries() const { e.consume_temporaries(); }
  template <int Offset = 0, class V>
  void visit_leaves(V&& v) {
    e.template visit_leaves<Offset>(v);
  }
  static constexpr int leaf_count = E::leaf_count;
  static constexpr bool reads_values = E::reads_values;  // the mask is recomputed, not read
  template <int Offset>
  unsigned adjoint_mask() const {
    return e.template adjoint_mask<Offset>();
  }
  CKPT_HOST_DEVICE bool keep(long i) const { return rng::uniform(key, static_cast<std::uint64_t>(i)) >= p; }
  CKPT_HOST_DEVICE T at(long i) const { return keep(i) ? e.at(i) * scale : T(0); }
  CKPT_HOST_DEVICE T at(int r, int c) const { return keep(broadcast_offset(r, c, rs, cs)) ? e.at(r, c) * scale : T(0); }
  template <unsigned Mask = checked, int Offset = 0>
  CKPT_HOST_DEVICE void back(long i, T g) const {
    if constexpr (selects<Mask, Offset, leaf_count>)
      if (keep(i)) e.template back<Mask, Offset>(i, g * scale);
  }
  template <unsigned Mask = checked, int Offset = 0>
  CKPT_HOST_DEVICE void back(int r, int c, T g) const {
    if constexpr (selects<Mask, Offset, leaf_count>)
      if (keep(broadcast_offset(r, c, rs, cs))) e.template back<Mask, Offset>(r, c, g * scale);
  }
  template <int K, int Offset = 0>
  CKPT_HOST_DEVICE T share(int r, int c, T g) const {
    return keep(broadcast_offset(r, c, rs, cs)) ? e.template share<K, Offset>(r, c, g * scale) : T(0);
  }
};

// ------------------------------------------------------------------ operands

template <class X>
struct is_var : std::false_type {};
template <class T, class B>
struct is_var<Var<T, B>> : std::true_type {};
template <class X>
struct is_parameter : std::false_type {};
template <class T, class B>
struct is_parameter<Parameter<T, B>> : std::true_type {};

/// Anything that can stand for a tensor in an op: a Var, a Parameter or an expression.
template <class X>
concept Operand = is_var<std::remove_cvref_t<X>>::value || is_parameter<std::remove_cvref_t<X>>::value ||
                  Expression<std::remove_cvref_t<X>>;

template <class T, class B>
leaf<T, B> to_expr(const Var<T, B>& v, const char* op) {
  if (v.tape() == nullptr) throw tape_error(detail::cat(op, ": the Var is empty (default-constructed)"));
  return leaf<T, B>{v.tape(), v.epoch(), v.tape()->operand_of(v, op)};
}
/// A temporary Var: the expression is its last use (see the top of this file).
template <class T, class B>
leaf<T, B> to_expr(Var<T, B>&& v, const char* op) {
  leaf<T, B> l = to_expr(static_cast<const Var<T, B>&>(v), op);
  l.temporary = true;
  return l;
}
template <class T, class B>
leaf<T, B> to_expr(Parameter<T, B>& p, const char*) {
  return leaf<T, B>{nullptr, 0, Tape<T, B>::operand_of(p)};
}
template <class T, class B>
leaf<T, B> to_expr(Parameter<T, B>&& p, const char* op) {  // std::move(p): still p's buffers
  return to_expr(static_cast<Parameter<T, B>&>(p), op);
}
/// An expression that may be used again: its temporaries must outlive this use.
template <Expression E>
E to_expr(const E& e, const char*) {
  E copy = e;
  copy.keep_temporaries();
  return copy;
}
/// An expression used once (an rvalue): its temporaries die with this use.
template <Expression E>
E to_expr(E&& e, const char*) {
  return static_cast<E&&>(e);
}

template <class X>
using expr_t = std::remove_cvref_t<decltype(to_expr(std::declval<X&>(), ""))>;

template <class X>
using value_t = typename expr_t<X>::value_type;

template <class F, class X>
unary<F, expr_t<X>> make_unary(F f, X&& x) {
  return {f, to_expr(std::forward<X>(x), F::name)};
}
template <class F, class L, class R>
binary<F, expr_t<L>, expr_t<R>> make_binary(F f, L&& l, R&& r) {
  return {f, to_expr(std::forward<L>(l), F::name), to_expr(std::forward<R>(r), F::name)};
}
template <class F, class L, class S>
binary<F, expr_t<L>, scalar<value_t<L>>> make_binary_scalar(F f, L&& l, S s) {
  return {f, to_expr(std::forward<L>(l), F::name), scalar<value_t<L>>{static_cast<value_t<L>>(s)}};
}
template <class F, class S, class R>
binary<F, scalar<value_t<R>>, expr_t<R>> make_scalar_binary(F f, S s, R&& r) {
  return {f, scalar<value_t<R>>{static_cast<value_t<R>>(s)}, to_expr(std::forward<R>(r), F::name)};
}

}  // namespace ckpt::expr
