// Test support: generic gradient checkers in the style of Stan's expect_ad.
#pragma once
#include <ckpt/ckpt.hpp>
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace ckpt::test {

using Mat = Eigen::MatrixXd;

/// A deterministic random matrix with entries in [lo, hi).
inline Mat random_matrix(int rows, int cols, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> d(lo, hi);
  Mat m(rows, cols);
  for (int j = 0; j < cols; ++j)
    for (int i = 0; i < rows; ++i) m(i, j) = d(gen);
  return m;
}

/// Entries with magnitude in [lo, hi) and random signs: keeps kinks (relu) and poles (1/x)
/// further than a finite-difference step away.
inline Mat random_away_from_zero(int rows, int cols, std::uint64_t seed, double lo = 0.2, double hi = 1.0) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> d(lo, hi);
  std::bernoulli_distribution sign(0.5);
  Mat m(rows, cols);
  for (int j = 0; j < cols; ++j)
    for (int i = 0; i < rows; ++i) m(i, j) = sign(gen) ? d(gen) : -d(gen);
  return m;
}

/// The shapes every op is checked on: a random one (both sides in [2, 5]), batch 1 (cols = 1),
/// width 1 (rows = 1) and 1x1.
inline std::vector<shape> test_shapes(std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int> d(2, 5);
  const int r = d(gen), c = d(gen);
  return {{r, c}, {r, 1}, {1, c}, {1, 1}};
}

/// Central finite differences of a scalar function of several matrices, in double.
using scalar_function = std::function<double(const std::vector<Mat>&)>;
inline std::vector<Mat> numeric_grad(const scalar_function& f, const std::vector<Mat>& inputs, double h = 1e-6) {
  std::vector<Mat> grads;
  for (std::size_t k = 0; k < inputs.size(); ++k) {
    Mat g(inputs[k].rows(), inputs[k].cols());
    for (int j = 0; j < inputs[k].cols(); ++j) {
      for (int i = 0; i < inputs[k].rows(); ++i) {
        std::vector<Mat> plus = inputs, minus = inputs;
        plus[k](i, j) += h;
        minus[k](i, j) -= h;
        g(i, j) = (f(plus) - f(minus)) / (2 * h);
      }
    }
    grads.push_back(std::move(g));
  }
  return grads;
}

/// Elementwise |analytic - numeric| <= tol * max(1, |analytic|, |numeric|).
inline void expect_close(const Mat& analytic, const Mat& numeric, double tol, const std::string& what) {
  REQUIRE(analytic.rows() == numeric.rows());
  REQUIRE(analytic.cols() == numeric.cols());
  for (int j = 0; j < analytic.cols(); ++j) {
    for (int i = 0; i < analytic.rows(); ++i) {
      const double a = analytic(i, j), n = numeric(i, j);
      const double scale = std::max({1.0, std::abs(a), std::abs(n)});
      INFO(what, " element (", i, ", ", j, "): got ", a, ", expected ", n);
      CHECK(std::abs(a - n) <= tol * scale);
    }
  }
}

/// Matrix-wise relative error: max |a - b| <= rel * max |b| (absolute when b is all zeros).
inline bool close_rel(const Mat& a, const Mat& b, double rel) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  if (a.size() == 0) return true;
  const double scale = std::max(b.cwiseAbs().maxCoeff(), 1e-300);
  return (a - b).cwiseAbs().maxCoeff() <= rel * scale;
}

/// f builds an output from its inputs (recorded as tape variables); any output shape works:
/// the checker reduces it with fixed random weights to a scalar.
using program = std::function<Var<double>(Tape<double>&, std::span<const Var<double>>)>;

/// Checks the reverse-mode gradient of every input against central finite differences in
/// double, with a relative tolerance (absolute near zero).
inline void expect_grad(const program& f, const std::vector<Mat>& inputs, double tol = 1e-6, double h = 1e-6,
                        std::uint64_t seed = 7) {
  Mat weights;
  auto run = [&](const std::vector<Mat>& xs, std::vector<Mat>* grads) {
    Tape<double> tape;
    std::vector<Var<double>> vars;
    for (const auto& x : xs) vars.push_back(tape.variable(x));
    Var<double> out = f(tape, vars);
    if (weights.size() == 0) weights = random_matrix(out.rows(), out.cols(), seed, 0.5, 1.5);
    Var<double> loss = sum(out * tape.constant(weights));
    const double value = loss.item();
    if (grads) {
      tape.backward(loss);
      for (const auto& v : vars) grads->push_back(tape.grad(v));
    }
    return value;
  };
  std::vector<Mat> analytic;
  run(inputs, &analytic);
  const std::vector<Mat> numeric = numeric_grad([&](const std::vector<Mat>& xs) { return run(xs, nullptr); }, inputs, h);
  for (std::size_t k = 0; k < inputs.size(); ++k) expect_close(analytic[k], numeric[k], tol, "gradient of input " + std::to_string(k));
}

/// Checks the forward value of f on inputs (recorded as tape variables) against a reference.
inline void expect_value(const program& f, const std::vector<Mat>& inputs, const Mat& expected, double tol = 1e-12) {
  Tape<double> tape;
  std::vector<Var<double>> vars;
  for (const auto& x : inputs) vars.push_back(tape.variable(x));
  const Var<double> out = f(tape, vars);
  REQUIRE(out.rows() == expected.rows());
  REQUIRE(out.cols() == expected.cols());
  expect_close(out.value(), expected, tol, "value");
}

/// Both checks: the forward against a reference, the reverse against finite differences.
inline void expect_op(const program& f, const std::vector<Mat>& inputs, const Mat& expected, double tol = 1e-6) {
  expect_value(f, inputs, expected);
  expect_grad(f, inputs, tol);
}

/// Bitwise equality of two matrices (memcmp: also the signs of zeros and NaN payloads).
template <class M1, class M2>
bool same_bits(const M1& a, const M2& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  if (a.size() == 0) return true;  // (memcmp takes no null pointer, even for 0 bytes)
  using S = typename M1::Scalar;
  const Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic> ea = a, eb = b;
  return std::memcmp(ea.data(), eb.data(), sizeof(S) * static_cast<std::size_t>(ea.size())) == 0;
}

}  // namespace ckpt::test
