// ckpt — elementwise ops: + - * / (tensor with tensor or scalar, with 2-D broadcasting, e.g.
// a rows x 1 bias over a rows x batch tensor), activations and powers. Each returns an
// expression; a whole expression becomes one tape entry when assigned to a Var.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/expr/expression.hpp"
#include "ckpt/expr/record.hpp"

#include <type_traits>
#include <utility>

namespace ckpt {

template <class S>
concept Scalar = std::is_arithmetic_v<S>;

#define CKPT_BINARY_OPERATOR(OP, F)                                            \
  template <expr::Operand L, expr::Operand R>                                  \
  auto operator OP(L&& l, R&& r) {                                             \
    return expr::make_binary(fn::F{}, std::forward<L>(l), std::forward<R>(r)); \
  }                                                                            \
  template <expr::Operand L, Scalar S>                                         \
  auto operator OP(L&& l, S s) {                                               \
    return expr::make_binary_scalar(fn::F{}, std::forward<L>(l), s);           \
  }                                                                            \
  template <Scalar S, expr::Operand R>                                         \
  auto operator OP(S s, R&& r) {                                               \
    return expr::make_scalar_binary(fn::F{}, s, std::forward<R>(r));           \
  }

CKPT_BINARY_OPERATOR(+, add)
CKPT_BINARY_OPERATOR(-, sub)
CKPT_BINARY_OPERATOR(*, mul)
CKPT_BINARY_OPERATOR(/, div)
#undef CKPT_BINARY_OPERATOR

template <expr::Operand X>
auto operator-(X&& x) {
  return expr::make_unary(fn::neg{}, std::forward<X>(x));
}

#define CKPT_UNARY_FUNCTION(NAME)                            \
  template <expr::Operand X>                                 \
  auto NAME(X&& x) {                                         \
    return expr::make_unary(fn::NAME{}, std::forward<X>(x)); \
  }

CKPT_UNARY_FUNCTION(relu)
CKPT_UNARY_FUNCTION(gelu)
CKPT_UNARY_FUNCTION(gelu_erf)
CKPT_UNARY_FUNCTION(silu)
CKPT_UNARY_FUNCTION(sigmoid)
CKPT_UNARY_FUNCTION(tanh)
CKPT_UNARY_FUNCTION(exp)
CKPT_UNARY_FUNCTION(log)
CKPT_UNARY_FUNCTION(sqrt)
CKPT_UNARY_FUNCTION(square)
#undef CKPT_UNARY_FUNCTION

/// x^p elementwise, p a constant.
template <expr::Operand X, Scalar S>
auto pow(X&& x, S p) {
  using T = expr::value_t<X>;
  return expr::make_unary(fn::pow<T>{static_cast<T>(p)}, std::forward<X>(x));
}


// Found by argument-dependent lookup for expression arguments too (expressions live in
// ckpt::expr), so that `tanh(a + b)` means ckpt::tanh without `using namespace ckpt`.
namespace expr {
using ckpt::operator+, ckpt::operator-, ckpt::operator*, ckpt::operator/, ckpt::relu, ckpt::gelu, ckpt::gelu_erf, ckpt::silu, ckpt::sigmoid, ckpt::tanh, ckpt::exp, ckpt::log, ckpt::sqrt, ckpt::square, ckpt::pow;
}  // namespace expr

}  // namespace ckpt
