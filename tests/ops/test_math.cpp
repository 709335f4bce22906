// expr/math.hpp: exp and tanh against long double, their special values, and the promise that
// makes a checkpoint's recomputation exact: a value computed in a vectorised loop has the bits of
// the same value computed alone, wherever it sits in the buffer. (This file is compiled with
// -ffp-contract=fast, GCC's default, unlike the rest of test_ops; clang's default, on,
// contracts less. The check means something in an optimised build: Debug does not vectorise.)
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
  // docs/design/math.md has the worst cases of an exhaustive run over the floats and of 2e8
  // doubles.
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

/// What a fused loop calls: exp and tanh alone, and the activations and derivatives built on
/// them (functors.hpp), as stateless functors.
struct exp_of {
  template <class T>
  T operator()(T x) const { return ckpt::fn::exp_(x); }
};
struct tanh_of {
  template <class T>
  T operator()(T x) const { return ckpt::fn::tanh_(x); }
};
template <class F>
struct derivative_of {
  template <class T>
  T operator()(T x) const { return F{}.d(x, F{}(x)); }
};

template <class T, class F>
T call_alone(T x) {
  return F{}(x);
}

/// How many elements of F over `in`, computed in a loop the compiler vectorises at each of 16
/// offsets into the buffer, differ from F called alone (through a volatile pointer, so that the
/// call is not vectorised). A NaN's sign may differ (docs/design/math.md); any NaN matches.
template <class T, class F>
int lane_differences(const std::vector<T>& in) {
  using U = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
  T (*volatile alone)(T) = &call_alone<T, F>;
  std::vector<T> out(in.size());
  int differ = 0;
  for (std::size_t off = 0; off < 16; ++off) {
    const T* x = in.data() + off;
    T* y = out.data() + off;
    const std::size_t count = in.size() - off;
    for (std::size_t i = 0; i < count; ++i) y[i] = F{}(x[i]);
    for (std::size_t i = 0; i < count; ++i) {
      const T one = alone(x[i]);
      differ += std::isnan(one) ? !std::isnan(y[i]) : std::bit_cast<U>(y[i]) != std::bit_cast<U>(one);
    }
  }
  return differ;
}

TEST_CASE_TEMPLATE("exp, tanh and the activations give the same bits in a vectorised loop as alone, at any offset", T, float, double) {
  std::mt19937 gen(3);
  // Wide enough for overflow, underflow and subnormal results (exp's range is about +-104 for
  // float and +-745 for double), and a band near 0.
  const T reach = sizeof(T) == 4 ? T(110) : T(760);
  std::uniform_real_distribution<T> wide(-reach, reach), near(T(-4), T(4));
  std::vector<T> in(2000);
  for (std::size_t i = 0; i < in.size(); ++i) in[i] = i % 2 ? wide(gen) : near(gen);
  in[5] = T(0);
  in[6] = -T(0);
  in[7] = std::numeric_limits<T>::infinity();
  in[8] = std::numeric_limits<T>::quiet_NaN();
  in[9] = -std::numeric_limits<T>::infinity();
  in[10] = std::numeric_limits<T>::denorm_min();
  using namespace ckpt::fn;
  CHECK(lane_differences<T, exp_of>(in) == 0);
  CHECK(lane_differences<T, tanh_of>(in) == 0);
  CHECK(lane_differences<T, sigmoid>(in) == 0);
  CHECK(lane_differences<T, silu>(in) == 0);
  CHECK(lane_differences<T, derivative_of<silu>>(in) == 0);
  CHECK(lane_differences<T, gelu>(in) == 0);
  CHECK(lane_differences<T, derivative_of<gelu>>(in) == 0);
  CHECK(lane_differences<T, derivative_of<ckpt::fn::tanh>>(in) == 0);
}

// ---------------------------------------------------------------- a column's sums and maxima
// On the CPU's one lane, detail::column_sum adds term i into partial sum i mod 8 (as the sums to
// a scalar do) and detail::column_max keeps eight partial maxima; both are what the row-wise
// ops (softmax, log-softmax, norms, cross-entropy) reduce a column with.

TEST_CASE("column_sum on one lane adds term i into partial sum i mod 8, then the partial sums in order") {
  // Terms whose sum depends on the order: 1e17 and -1e17 in the same partial sum (rows 0 and 8),
  // with small terms between them that one running sum loses.
  for (int rows : {1, 7, 8, 9, 19, 300, 600}) {
    std::vector<double> v(static_cast<std::size_t>(rows));
    std::mt19937 gen(static_cast<unsigned>(rows));
    std::uniform_real_distribution<double> u(0.5, 1.0);
    for (int i = 0; i < rows; ++i) v[static_cast<std::size_t>(i)] = u(gen);
    v[0] = 1e17;
    if (rows > 8) v[8] = -1e17;
    double part[8] = {};
    for (int i = 0; i < rows; ++i) part[i % 8] += v[static_cast<std::size_t>(i)];
    double expected = 0, running = 0;
    for (double p : part) expected += p;
    for (double x : v) running += x;
    const double got = ckpt::detail::column_sum<double>(rows, ckpt::backend::one_lane{}, [&](int i) { return v[static_cast<std::size_t>(i)]; });
    INFO("rows " << rows);
    CHECK(std::bit_cast<std::uint64_t>(got) == std::bit_cast<std::uint64_t>(expected));
    if (rows > 8) CHECK(expected != running);  // the data tells the orders apart
  }
  // float terms are added in double.
  const float big = 16777216.0f;  // 2^24: big + 1 is not a float
  const double sum = ckpt::detail::column_sum<float>(3, ckpt::backend::one_lane{}, [&](int i) { return i == 0 ? big : 1.0f; });
  CHECK(sum == 16777218.0);
}

TEST_CASE("column_max on one lane is the running fn::max_ of the column: NaNs skipped, -inf when empty") {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const auto running = [](const std::vector<float>& x) {
    float m = -std::numeric_limits<float>::infinity();
    for (float v : x) m = ckpt::fn::max_(m, v);
    return m;
  };
  std::mt19937 gen(5);
  std::uniform_real_distribution<float> u(-50.0f, 50.0f);
  for (int rows : {0, 1, 5, 8, 13, 64, 1000}) {
    std::vector<float> x(static_cast<std::size_t>(rows));
    for (float& v : x) v = u(gen);
    if (rows > 3) x[3] = nan;
    if (rows > 9) x[9] = 60.0f;  // the maximum, in partial 1
    const float got = ckpt::detail::column_max(x.data(), rows, ckpt::backend::one_lane{});
    INFO("rows " << rows);
    CHECK(got == running(x));
    if (rows > 9) CHECK(got == 60.0f);
  }
  CHECK(ckpt::detail::column_max<float>(nullptr, 0, ckpt::backend::one_lane{}) == -inf);
  const std::vector<float> nans(11, nan);
  CHECK(ckpt::detail::column_max(nans.data(), 11, ckpt::backend::one_lane{}) == -inf);
  const std::vector<float> last = {-inf, -3, -2, -inf, -inf, -inf, -inf, -inf, -inf, -1};  // the maximum in the remainder
  CHECK(ckpt::detail::column_max(last.data(), 10, ckpt::backend::one_lane{}) == -1.0f);
}
