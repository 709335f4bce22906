// ckpt — exp, expm1 and tanh for host loops, written so that a compiler vectorises the loops
// that call them: no branches, no table, no library call, only arithmetic, selects and
// bit casts. libm's expf and tanhf are calls the loop cannot vectorise, so an expression with a
// sigmoid, silu, gelu or tanh, and softmax's exponentials, ran one element at a time.
//
// Every lane of a vectorised loop runs the same operations as the scalar remainder, so a value
// does not depend on where in a buffer it sits or on the buffer's alignment: a checkpoint's
// recomputation gives the bits of the first forward (of a NaN, the sign may differ: see
// docs/design/math.md). Accuracy against long double (tests/ops/test_math.cpp; the figures in
// docs/design/math.md): exp within about 1 ulp, tanh within 2.5, float and double; NaN,
// infinities, overflow to inf and underflow through the subnormals to 0 as libm.
// Device code uses CUDA's own functions (fn::exp_ and fn::tanh_ choose).
#pragma once
#include "ckpt/config.hpp"

#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace ckpt::fn::branchfree {

template <class T>
struct exp_constants;

template <>
struct exp_constants<float> {
  using bits = std::uint32_t;
  static constexpr int mantissa = 23, bias = 127;
  static constexpr float round_shift = 12582912.0f;  // 1.5 * 2^23: x + it rounds x to an integer
  static constexpr float log2e = 1.44269504088896341f;
  // ln 2 in two parts, the first with trailing zero bits so that k * ln2_hi is exact.
  static constexpr float ln2_hi = 0.693145751953125f, ln2_lo = 1.428606765330187045e-06f;
  // exp(x) overflows above `overflow`; below `underflow` it is under half the least subnormal.
  static constexpr float overflow = 88.72283935546875f, underflow = -103.97208f;
  // tanh(x) rounds to 1 beyond this.
  static constexpr float tanh_one = 9.5f;
  // Taylor coefficients 1/n! of e^r - 1 - r, from n = 2 up, for |r| <= ln2 / 2: the first
  // omitted term is under 0.01 ulp (one term fewer left 0.09 ulp, and exp's worst case at 1.06).
  static constexpr int terms = 7;
  static constexpr float c[terms] = {1.0f / 2, 1.0f / 6, 1.0f / 24, 1.0f / 120, 1.0f / 720, 1.0f / 5040, 1.0f / 40320};
};

template <>
struct exp_constants<double> {
  using bits = std::uint64_t;
  static constexpr int mantissa = 52, bias = 1023;
  static constexpr double round_shift = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double log2e = 1.4426950408889634074;
  static constexpr double ln2_hi = 0.693147180369123816490, ln2_lo = 1.90821492927058770002e-10;
  static constexpr double overflow = 709.782712893383973096, underflow = -745.2;
  static constexpr double tanh_one = 20.0;
  static constexpr int terms = 12;
  static constexpr double c[terms] = {1.0 / 2,        1.0 / 6,         1.0 / 24,         1.0 / 120,
                                      1.0 / 720,      1.0 / 5040,      1.0 / 40320,      1.0 / 362880,
                                      1.0 / 3628800,  1.0 / 39916800,  1.0 / 479001600,  1.0 / 6227020800};
};

/// c ? a : b, through the bits. GCC 12 turned the ternaries back into branches (duplicated per
/// arm, and under the default -ftrapping-math it would not make them selects again), which kept
/// every loop calling exp scalar unless AVX-512's masked operations took the branches; a mask
/// vectorises on any x86-64, SSE2 included.
template <class T>
CKPT_ALWAYS_INLINE T pick(bool c, T a, T b) {
  using U = typename exp_constants<T>::bits;
  const U m = U(0) - U(c);
  return std::bit_cast<T>((std::bit_cast<U>(a) & m) | (std::bit_cast<U>(b) & ~m));
}

/// x = k ln2 + r with k an integer and |r| <= ln2 / 2 (a little more at the rounding edge);
/// returns r and sets k. x must be finite or NaN, and small enough that k fits the mantissa.
template <class T>
CKPT_ALWAYS_INLINE T reduce(T x, std::make_signed_t<typename exp_constants<T>::bits>& k) {
  using C = exp_constants<T>;
  using U = typename C::bits;
  using S = std::make_signed_t<U>;
  // Rounding by adding 1.5 * 2^mantissa leaves k in the low bits of the sum, so k comes from
  // the bits and never from a float-to-integer conversion (undefined for NaN).
  const T shifted = x * C::log2e + C::round_shift;
  k = static_cast<S>(std::bit_cast<U>(shifted) - std::bit_cast<U>(C::round_shift));
  // k as a T by conversion, not as shifted - round_shift: -ffast-math (or x87 excess precision)
  // folds that subtraction to x * log2e, which broke every result.
  const T kf = static_cast<T>(static_cast<std::int32_t>(k));
  const T r = x - kf * C::ln2_hi;
  return r - kf * C::ln2_lo;
}

/// e^r - 1 for the reduced r: r + r^2 (1/2 + r/6 + ...), accurate when the result is small.
template <class T>
CKPT_ALWAYS_INLINE T expm1_reduced(T r) {
  using C = exp_constants<T>;
  T q = C::c[C::terms - 1];
  for (int n = C::terms - 2; n >= 0; --n) q = q * r + C::c[n];
  return r + r * r * q;
}

/// 2^k for k in the normal exponent range.
template <class T>
CKPT_ALWAYS_INLINE T pow2(std::make_signed_t<typename exp_constants<T>::bits> k) {
  using C = exp_constants<T>;
  using U = typename C::bits;
  return std::bit_cast<T>(static_cast<U>(k + C::bias) << C::mantissa);
}

/// e^x.
template <class T>
CKPT_ALWAYS_INLINE T exp(T x) {
  using C = exp_constants<T>;
  // Outside the range the result is a constant, selected below; computing exp(0) there instead
  // of exp(underflow) keeps subnormal products out of the lanes: each one costs a microcode
  // assist on Intel, and with a causal mask's -inf scores a small attention step took 1.7x.
  const T clamped = pick(x > C::overflow, T(0), pick(x < C::underflow, T(0), x));  // NaN stays
  std::make_signed_t<typename C::bits> k;
  const T p = T(1) + expm1_reduced(reduce(clamped, k));
  // 2^k in two factors, each a normal number, so that results in the subnormal range come
  // out right too (k goes down to about -150 for float and -1075 for double).
  const auto half = k >> 1;
  T y = p * pow2<T>(half) * pow2<T>(k - half);
  y = pick(x > C::overflow, static_cast<T>(__builtin_huge_val()), y);
  return pick(x < C::underflow, T(0), y);
}

/// e^x - 1, accurate near 0, for |x| up to 2 tanh_one: what tanh needs (beyond, x is clamped).
template <class T>
CKPT_ALWAYS_INLINE T expm1_bounded(T x) {
  using C = exp_constants<T>;
  const T clamped = pick(x > 2 * C::tanh_one, 2 * C::tanh_one, pick(x < -2 * C::tanh_one, -2 * C::tanh_one, x));
  std::make_signed_t<typename C::bits> k;
  const T m = expm1_reduced(reduce(clamped, k));
  // e^x - 1 = 2^k (e^r - 1) + (2^k - 1): no cancellation where the result is small, k = 0.
  const T s = pow2<T>(k);
  return s * m + (s - T(1));
}

/// tanh(x) = e / (e + 2) with e = e^(2|x|) - 1, the sign put back.
template <class T>
CKPT_ALWAYS_INLINE T tanh(T x) {
  using C = exp_constants<T>;
  const T a = std::fabs(x);
  const T e = expm1_bounded(T(2) * pick(a > C::tanh_one, C::tanh_one, a));
  return std::copysign(e / (e + T(2)), x);
}

/// Whether T has the functions above (float and double); other types use libm.
template <class T>
inline constexpr bool available = std::is_same_v<T, float> || std::is_same_v<T, double>;

}  // namespace ckpt::fn::branchfree
