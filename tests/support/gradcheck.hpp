// Test support: generic gradient checkers in the style of Stan's expect_ad.
#pragma once
#include <ckpt/ckpt.hpp>
#include <doctest/doctest.h>

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
  for (std::size_t k = 0; k < inputs.size(); ++k) {
    for (int j = 0; j < inputs[k].cols(); ++j) {
      for (int i = 0; i < inputs[k].rows(); ++i) {
        std::vector<Mat> plus = inputs, minus = inputs;
        plus[k](i, j) += h;
        minus[k](i, j) -= h;
        const double numeric = (run(plus, nullptr) - run(minus, nullptr)) / (2 * h);
        const double a = analytic[k](i, j);
        const double scale = std::max({1.0, std::abs(a), std::abs(numeric)});
        INFO("input ", k, " element (", i, ", ", j, "): analytic ", a, " numeric ", numeric);
        CHECK(std::abs(a - numeric) <= tol * scale);
      }
    }
  }
}

/// Bitwise equality of two matrices (memcmp: also the signs of zeros and NaN payloads).
template <class M1, class M2>
bool same_bits(const M1& a, const M2& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  using S = typename M1::Scalar;
  const Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic> ea = a, eb = b;
  return std::memcmp(ea.data(), eb.data(), sizeof(S) * static_cast<std::size_t>(ea.size())) == 0;
}

}  // namespace ckpt::test
