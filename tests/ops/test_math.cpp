// expr/math.hpp: exp and tanh against long double, their special values, and the promise that
// makes a checkpoint's recomputation exact: a value computed in a vectorised loop has the bits of
// the same value computed alone, wherever it sits in the buffer. (This file is compiled with
// FMA contraction on, as users compile, unlike the rest of test_ops.)
#include <ckpt/ckpt.hpp>

#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

namespace {

namespace bf = ckpt::fn::branchfree;

/// |got - want| in units of the last place of want rounded to T (the least subnormal below the
/// normal range); 0 when both are the same NaN or infinity, and a huge value when only one is.
template <class T>
double ulp_error(T got, long double want) {
  if (std::isnan(want)) return std::isnan(got) ? 0.0 : 1e30;
  const T rounded = static_cast<T>(want);
  if (std::isinf(rounded) || std::isinf(got)) return got == rounded ? 0.0 : 1e30;
  const T magnitude = std::fabs(rounded);
  long double unit = static_cast<long double>(std::nextafter(magnitude, std::numeric_limits<T>::infinity())) - magnitude;
  if (magnitude < std::numeric_limits<T>::min()) unit = std::numeric_limits<T>::denorm_min();
  return static_cast<double>(std::fabs(static_cast<long double>(got) - want) / unit);
}

/// Inputs that cover the whole range: float bit patterns at a fixed stride (every exponent, both
/// signs), or random double bit patterns; then uniform draws over exp's range and near 0.
template <class T>
std::vector<T> sample_inputs() {
  std::vector<T> xs;
  std::mt19937_64 gen(7);
  if constexpr (sizeof(T) == 4) {
    for (std::uint64_t b = 0; b <= 0xffffffffu; b += 4099) xs.push_back(std::bit_cast<float>(static_cast<std::uint32_t>(b)));
  } else {
    for (int i = 0; i < 300000; ++i) xs.push_back(std::bit_cast<double>(static_cast<std::uint64_t>(gen())));
  }
  std::uniform_real_distribution<T> wide(T(-760), T(760)), narrow(T(-3), T(3)), tiny(T(-1e-3), T(1e-3));
  for (int i = 0; i < 200000; ++i) {
    xs.push_back(wide(gen));
    xs.push_back(narrow(gen));
    xs.push_back(tiny(gen));
  }
  return xs;
}

template <class T>
T exp_alone(T x) {
  return bf::exp(x);
}
template <class T>
T tanh_alone(T x) {
  return bf::tanh(x);
}

}  // namespace

TEST_CASE_TEMPLATE("branchfree exp is within 1.25 ulp and tanh within 3 ulp of the exact value", T, float, double) {
  if (sizeof(T) == 8 && std::numeric_limits<long double>::digits < 64) {
    MESSAGE("long double is no wider than double here: no exact reference for double");
    return;
  }
  double worst_exp = 0, worst_tanh = 0;
  T at_exp = 0, at_tanh = 0;
  for (const T x : sample_inputs<T>()) {
    const double e = ulp_error(bf::exp(x), std::exp(static_cast<long double>(x)));
    const double t = ulp_error(bf::tanh(x), std::tanh(static_cast<long double>(x)));
    if (e > worst_exp) worst_exp = e, at_exp = x;
    if (t > worst_tanh) worst_tanh = t, at_tanh = x;
  }
  INFO("worst exp error " << worst_exp << " ulp at " << at_exp << ", worst tanh error " << worst_tanh << " ulp at " << at_tanh);
  // An exhaustive run over every float measured 1.05 (exp) and 2.42 (tanh); 2e8 doubles 0.99
  // and 2.54.
  CHECK(worst_exp <= 1.25);
  CHECK(worst_tanh <= 3.0);
}

TEST_CASE_TEMPLATE("branchfree exp and tanh: special values, overflow and underflow", T, float, double) {
  constexpr T inf = std::numeric_limits<T>::infinity(), nan = std::numeric_limits<T>::quiet_NaN();
  using C = bf::exp_constants<T>;
  CHECK(std::isnan(bf::exp(nan)));
  CHECK(bf::exp(inf) == inf);
  CHECK(bf::exp(-inf) == T(0));
  CHECK(bf::exp(T(0)) == T(1));
  CHECK(bf::exp(-T(0)) == T(1));
  // Just under log(max), a finite result; just over, infinity.
  const T top = std::log(std::numeric_limits<T>::max());
  const T below = std::nextafter(top, T(0)), above = std::nextafter(std::nextafter(top, inf), inf);
  CHECK(std::isfinite(bf::exp(below)));
  CHECK(ulp_error(bf::exp(below), std::exp(static_cast<long double>(below))) <= 1.25);
  CHECK(bf::exp(above) == inf);
  CHECK(bf::exp(std::nextafter(C::overflow, inf)) == inf);
  // Through the subnormals to zero.
  const T deep = sizeof(T) == 4 ? T(-100) : T(-740);
  CHECK(bf::exp(deep) > T(0));
  CHECK(bf::exp(deep) < std::numeric_limits<T>::min());
  CHECK(ulp_error(bf::exp(deep), std::exp(static_cast<long double>(deep))) <= 1.0);
  CHECK(bf::exp(std::nextafter(C::underflow, -inf)) == T(0));
  CHECK(bf::exp(T(-2000)) == T(0));

  CHECK(std::isnan(bf::tanh(nan)));
  CHECK(bf::tanh(inf) == T(1));
  CHECK(bf::tanh(-inf) == T(-1));
  CHECK(bf::tanh(T(0)) == T(0));
  CHECK(std::signbit(bf::tanh(-T(0))));
  CHECK(bf::tanh(T(1e-30)) == T(1e-30));
  CHECK(bf::tanh(T(25)) == T(1));
  CHECK(bf::tanh(T(-25)) == T(-1));

  // What the ops see: fn::exp_ and fn::tanh_ are these on the host.
  CHECK(std::bit_cast<std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>>(ckpt::fn::exp_(T(0.3))) ==
        std::bit_cast<std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>>(bf::exp(T(0.3))));
}

TEST_CASE_TEMPLATE("branchfree exp and tanh give the same bits in a vectorised loop as alone, at any offset", T, float, double) {
  using U = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
  std::mt19937 gen(3);
  std::uniform_real_distribution<T> u(T(-30), T(30));
  constexpr int n = 1000, offsets = 16;
  std::vector<T> in(n + offsets), out_exp(n + offsets), out_tanh(n + offsets);
  for (T& x : in) x = u(gen);
  in[5] = T(0);
  in[6] = -T(0);
  in[7] = std::numeric_limits<T>::infinity();
  in[8] = std::numeric_limits<T>::quiet_NaN();
  // Called through a volatile pointer, so that they run alone and are not vectorised.
  T (*volatile exp_one)(T) = &exp_alone<T>;
  T (*volatile tanh_one)(T) = &tanh_alone<T>;
  int differ = 0;
  for (int off = 0; off < offsets; ++off) {
    const T* x = in.data() + off;
    T* e = out_exp.data() + off;
    T* t = out_tanh.data() + off;
    const int count = n - off;
    for (int i = 0; i < count; ++i) e[i] = bf::exp(x[i]);
    for (int i = 0; i < count; ++i) t[i] = bf::tanh(x[i]);
    for (int i = 0; i < count; ++i) {
      differ += std::bit_cast<U>(e[i]) != std::bit_cast<U>(exp_one(x[i]));
      differ += std::bit_cast<U>(t[i]) != std::bit_cast<U>(tanh_one(x[i]));
    }
  }
  CHECK(differ == 0);
}
