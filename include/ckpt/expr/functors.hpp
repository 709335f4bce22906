// ckpt — elementwise functions and their derivatives, written once for host and device.
// Unary rules get the input x and the output y (whichever is cheaper to use); a rule that reads
// only y says so (`from_output`), which lets an expression's reverse read its stored output
// instead of its operands. Binary rules say which arguments each derivative reads (`da_args`,
// `db_args`: bit 0 a, bit 1 b), so that the reverse loads no operand it does not need.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/expr/math.hpp"

#include <cmath>

namespace ckpt::fn {

// Plain math that is valid in host and device code (std:: overloads are host-only under nvcc).
// exp and tanh on the host are expr/math.hpp's, which vectorise with the loop that calls them;
// on the device CUDA's.
template <class T>
CKPT_HOST_DEVICE CKPT_ALWAYS_INLINE T exp_(T x) {
#if !defined(__CUDA_ARCH__)
  if constexpr (branchfree::available<T>) return branchfree::exp(x);
#endif
  using std::exp;
  return exp(x);
}
template <class T>
CKPT_HOST_DEVICE inline T log_(T x) { using std::log; return log(x); }
template <class T>
CKPT_HOST_DEVICE CKPT_ALWAYS_INLINE T tanh_(T x) {
#if !defined(__CUDA_ARCH__)
  if constexpr (branchfree::available<T>) return branchfree::tanh(x);
#endif
  using std::tanh;
  return tanh(x);
}
template <class T>
CKPT_HOST_DEVICE inline T erf_(T x) { using std::erf; return erf(x); }
template <class T>
CKPT_HOST_DEVICE inline T sqrt_(T x) { using std::sqrt; return sqrt(x); }
template <class T>
CKPT_HOST_DEVICE inline T pow_(T x, T p) { using std::pow; return pow(x, p); }
/// The larger of a and b as std::max has it (a unless a < b), usable in device code.
template <class T>
CKPT_HOST_DEVICE inline T max_(T a, T b) { return a < b ? b : a; }
/// +infinity, usable in device code (std::numeric_limits is host-only under nvcc).
template <class T>
CKPT_HOST_DEVICE inline T infinity() { return static_cast<T>(__builtin_huge_val()); }

struct neg {
  static constexpr const char* name = "neg";
  template <class T> CKPT_HOST_DEVICE T operator()(T x) const { return -x; }
  template <class T> CKPT_HOST_DEVICE T d(T, T) const { return T(-1); }
};
struct relu {
  static constexpr const char* name = "relu";
  template <class T> CKPT_HOST_DEVICE T operator()(T x) const { return x > T(0) ? x : T(0); }
  template <class T> CKPT_HOST_DEVICE T d(T x, T) const { return x > T(0) ? T(1) : T(0); }
  // g * d(x) as a select (see unary::chain): no multiply by 0, so the reverse vectorises.
  template <class T> CKPT_HOST_DEVICE T back(T x, T, T g) const { return x > T(0) ? g : T(0); }
  // The same from the output: y > 0 exactly when x > 0 (and relu(NaN) is 0, as NaN > 0 is false).
  static constexpr bool from_output = true;
  template <class T> CKPT_HOST_DEVICE T back_out(T y, T g) const { return y > T(0) ? g : T(0); }
};
struct sigmoid {
  static constexpr const char* name = "sigmoid";
  static constexpr bool from_output = true;
  template <class T> CKPT_HOST_DEVICE T operator()(T x) const { return T(1) / (T(1) + exp_(-x)); }
  template <class T> CKPT_HOST_DEVICE T d(T, T y) const { return y * (T(1) - y); }
};
struct tanh {
  static constexpr const char* name = "tanh";
  static constexpr bool from_output = true;
  template <class T> CKPT_HOST_DEVICE T operator()(T x) const { return tanh_(x); }
  template <class T> CKPT_HOST_DEVICE T d(T, T y) const { return T(1) - y * y; }
};
struct silu {
  static constexpr const char* name = "silu";
  template <class T> CKPT_HOST_DEVICE T operator()(T x) const { return x / (T(1) + exp_(-x)); }
  template <class T> CKPT_HOST_DEVICE T d(T x, T) const {
    const T s = T(1) / (T(1) + exp_(-x));
    return s * (T(1) + x * (T(1) - s));
  }
};
/// GELU, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
struct gelu {
  static constexpr const char* name = "gelu";
  template <class T> CKPT_HOST_DEVICE static T inner(T x) { return T(0.7978845608028654) * (x + T(0.044715) * x * x * x); }
  template <class T> CKPT_HOST_DEVICE T operator()(T x) const { return T(0.5) * x * (T(1) + tanh_(inner(x))); }
  template <class T> CKPT_HOST_DEVICE T d(T x, T) const {
    const T t = tanh_(inner(x));
    return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * T(0.7978845608028654) * (T(1) + T(3 * 0.044715) * x * x);
  }
};
/// GELU, erf form, the exact one (PyTorch's nn.GELU() default; `gelu` is the tanh form):
/// x Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), derivative Phi(x) + x phi(x). erf is libm's on the
/// host (a call per element: the loop does not vectorise), CUDA's on the device.
struct gelu_erf {
  static constexpr const char* name = "gelu_erf";
  template <class T> CKPT_HOST_DEVICE static T cdf(T x) { return T(0.5) * (T(1) + erf_(x * T(0.7071067811865476))); }
  template <class T> CKPT_HOST_DEVICE T operator()(T x) const { return x * cdf(x); }
  template <class T> CKPT_HOST_DEVICE T d(T x, T) const { return cdf(x) + x * T(0.3989422804014327) * exp_(T(-0.5) * x * x); }
};
struct exp {
  static constexpr const char* name = "exp";
  static constexpr bool from_output = true;
  template <class T> CKPT_HOST_DEVICE T operator()(T x) const { return exp_(x); }
  template <class T> CKPT_HOST_DEVICE T d(T, T y) const { return y; }
};
struct log {
  static constexpr const char* name = "log";
  template <class T> CKPT_HOST_DEVICE T operator()(T x) const { return log_(x); }
  template <class T> CKPT_HOST_DEVICE T d(T x, T) const { return T(1) / x; }
};
struct sqrt {
  static constexpr const char* name = "sqrt";
  static constexpr bool from_output = true;
  template <class T> CKPT_HOST_DEVICE T operator()(T x) const { return sqrt_(x); }
  template <class T> CKPT_HOST_DEVICE T d(T, T y) const { return T(0.5) / y; }
};
struct square {
  static constexpr const char* name = "square";
  template <class T> CKPT_HOST_DEVICE T operator()(T x) const { return x * x; }
  template <class T> CKPT_HOST_DEVICE T d(T x, T) const { return T(2) * x; }
};
/// x^p for a constant p.
template <class T>
struct pow {
  static constexpr const char* name = "pow";
  T p;
  CKPT_HOST_DEVICE T operator()(T x) const { return pow_(x, p); }
  CKPT_HOST_DEVICE T d(T x, T) const { return p * pow_(x, p - T(1)); }
};

struct add {
  static constexpr const char* name = "add";
  static constexpr unsigned da_args = 0, db_args = 0;
  template <class T> CKPT_HOST_DEVICE T operator()(T a, T b) const { return a + b; }
  template <class T> CKPT_HOST_DEVICE T da(T, T) const { return T(1); }
  template <class T> CKPT_HOST_DEVICE T db(T, T) const { return T(1); }
};
struct sub {
  static constexpr const char* name = "sub";
  static constexpr unsigned da_args = 0, db_args = 0;
  template <class T> CKPT_HOST_DEVICE T operator()(T a, T b) const { return a - b; }
  template <class T> CKPT_HOST_DEVICE T da(T, T) const { return T(1); }
  template <class T> CKPT_HOST_DEVICE T db(T, T) const { return T(-1); }
};
struct mul {
  static constexpr const char* name = "mul";
  static constexpr unsigned da_args = 2, db_args = 1;
  template <class T> CKPT_HOST_DEVICE T operator()(T a, T b) const { return a * b; }
  template <class T> CKPT_HOST_DEVICE T da(T, T b) const { return b; }
  template <class T> CKPT_HOST_DEVICE T db(T a, T) const { return a; }
};
struct div {
  static constexpr const char* name = "div";
  static constexpr unsigned da_args = 2, db_args = 3;
  template <class T> CKPT_HOST_DEVICE T operator()(T a, T b) const { return a / b; }
  template <class T> CKPT_HOST_DEVICE T da(T, T b) const { return T(1) / b; }
  template <class T> CKPT_HOST_DEVICE T db(T a, T b) const { return -a / (b * b); }
};

/// Whether a unary rule's derivative reads only the output (see the top of this file).
template <class F>
inline constexpr bool derivative_from_output = requires { requires F::from_output; };
/// The arguments a binary rule's derivatives read; all of them unless it says.
template <class F>
inline constexpr unsigned da_args = [] {
  if constexpr (requires { F::da_args; }) return F::da_args; else return 3u;
}();
template <class F>
inline constexpr unsigned db_args = [] {
  if constexpr (requires { F::db_args; }) return F::db_args; else return 3u;
}();

}  // namespace ckpt::fn
