// ckpt — turning what a user passes to a non-elementwise op into a tape operand: a Var is used
// as it is, a Parameter by reference to its buffers, an expression is recorded first.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/expr/expression.hpp"
#include "ckpt/expr/record.hpp"

#include <cstdint>
#include <optional>
#include <utility>

namespace ckpt {

namespace detail {

template <class T, class B>
struct resolved {
  Tape<T, B>* tape = nullptr;  // null for a parameter
  operand<T> ref;
};

template <class T, class B>
resolved<T, B> resolve(const Var<T, B>& v, const char* op) {
  if (v.tape() == nullptr) throw tape_error(cat(op, ": the Var is empty (default-constructed)"));
  return {v.tape(), v.tape()->operand_of(v, op)};
}
template <class T, class B>
resolved<T, B> resolve(Parameter<T, B>& p, const char*) {
  return {nullptr, Tape<T, B>::operand_of(p)};
}
template <class T, class B>
resolved<T, B> resolve(Parameter<T, B>&& p, const char* op) {  // std::move(p): still p's buffers
  return resolve(static_cast<Parameter<T, B>&>(p), op);
}
template <class E>
  requires expr::Expression<std::remove_cvref_t<E>>
auto resolve(E&& e, const char* op) {
  // An rvalue expression is used once: the temporaries inside it may be freed.
  return resolve(expr::record(expr::to_expr(std::forward<E>(e), op)), op);
}

/// After an op whose reverse does not read this operand: frees it if the caller passed a Var
/// as an rvalue (`softmax(attention_scores(...))`, `std::move(v)`) and this was its one use,
/// by the rule expressions follow (Tape::consume; docs/design/memory.md). X is the op's
/// deduced parameter type: a plain Var<T, B> only for an rvalue.
template <class X, class T, class B>
void consume_if_temporary(const resolved<T, B>& r) {
  if constexpr (std::is_same_v<X, Var<T, B>>)
    if (r.tape) r.tape->consume(r.ref.node);
}

/// The shape an operand will have once resolved, found without recording anything: ops check
/// shapes with it at the public edge, before an expression operand is recorded.
template <class T, class B>
shape shape_of(const Var<T, B>& v, const char* op) {
  if (v.tape() == nullptr) throw tape_error(cat(op, ": the Var is empty (default-constructed)"));
  v.tape()->check(v, op);
  return v.tape()->node(v.index()).dims;
}
template <class T, class B>
shape shape_of(const Parameter<T, B>& p, const char*) {
  return p.dims();
}
template <expr::Expression E>
shape shape_of(const E& e, const char* op) {
  e.validate(op);
  return e.dims();
}

/// The tape an op's operands share; throws if they come from two tapes or none has one.
template <class R, class... Rs>
auto& shared_tape(const char* op, const R& a, const Rs&... rest) {
  static_assert((std::is_same_v<R, Rs> && ...), "ckpt: an op mixes tensors of different backends, or float and double tensors");
  auto* t = a.tape;
  ((t = expr::common_tape(t, rest.tape, op)), ...);
  if (!t) throw tape_error(cat(op, ": no operand is on a tape; bring a parameter onto one with tape.param(p)"));
  return *t;
}
template <class T, class B>
Tape<T, B>& tape_of(const resolved<T, B>& a, const char* op) {
  if (!a.tape) throw tape_error(cat(op, ": the operand is not on a tape; bring a parameter onto one with tape.param(p)"));
  return *a.tape;
}

/// Room for what an op's reverse reads beside its operands (norm statistics, cross-entropy's
/// labels and kept maxima, gather_cols' index). When the op records a reverse, a node of the
/// tape, not replayable (the forward always fills it), which the sweep releases after the op's
/// entry; otherwise a temporary from the tape's pool, given back when this object goes out of
/// scope, so that an op run without gradients leaves nothing on the tape but its output.
template <class T, class B>
class kept_for_reverse {
 public:
  kept_for_reverse(Tape<T, B>& t, shape s, const char* op, op_kind kind, bool reverse) {
    if (reverse) {
      node_ = t.new_output(s, op, kind, false, false);
      data_ = t.node(node_).value;
    } else {
      temporary_.emplace(t.pool(), Tape<T, B>::bytes_of(s));
      data_ = temporary_->template as<T>();
    }
  }
  /// The buffer, as T or as another type no larger (int indices in T-sized slots).
  template <class U = T>
  U* data() const {
    static_assert(sizeof(U) <= sizeof(T) && alignof(U) <= alignof(T));
    return reinterpret_cast<U*>(static_cast<void*>(data_));
  }
  /// The node the op's entry reads it from (only when the op records a reverse).
  std::uint32_t node() const { return node_; }

 private:
  std::optional<typename buffer_pool<B>::lease> temporary_;
  std::uint32_t node_ = 0;
  T* data_ = nullptr;
};

}  // namespace detail

}  // namespace ckpt
