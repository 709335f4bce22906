// ckpt — nn::Linear: y = W x + b, with W out x in and b out x 1 (columns are samples).
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/core/parameter.hpp"
#include "ckpt/ops/elementwise.hpp"
#include "ckpt/ops/matmul.hpp"

#include <cmath>
#include <cstdint>
#include <random>

namespace ckpt::nn {

namespace detail {

/// Uniform(-bound, bound) initialisation from a seed, bound = 1 / sqrt(fan_in) (PyTorch's
/// default for nn.Linear).
template <class T>
Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> uniform_init(int rows, int cols, int fan_in, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  const double bound = 1.0 / std::sqrt(static_cast<double>(std::max(fan_in, 1)));
  std::uniform_real_distribution<double> d(-bound, bound);
  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> m(rows, cols);
  for (int j = 0; j < cols; ++j)
    for (int i = 0; i < rows; ++i) m(i, j) = static_cast<T>(d(gen));
  return m;
}

/// Returns `out` after checking that both sizes are positive.
inline int positive(const char* op, int out, int in) {
  if (in <= 0 || out <= 0) throw shape_error(ckpt::detail::cat(op, ": sizes must be positive, got in ", in, ", out ", out));
  return out;
}

}  // namespace detail

/// A dense layer. Trainable by default; a frozen Linear computes no weight or bias gradient
/// (its products in reverse skip the weight GEMM).
template <class T, Backend B = backend::cpu>
class Linear {
 public:
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;

  Linear(int in, int out, std::uint64_t seed = 0, bool bias = true, bool frozen = false)
      : W_(detail::uniform_init<T>(detail::positive("Linear", out, in), in, in, seed), frozen),
        b_(bias ? Matrix(detail::uniform_init<T>(out, 1, in, seed ^ 0x9e3779b97f4a7c15ull)) : Matrix(Matrix::Zero(out, 1)),
           frozen || !bias),
        has_bias_(bias) {
  }
  template <class DW, class Db>
  Linear(const Eigen::MatrixBase<DW>& W, const Eigen::MatrixBase<Db>& b, bool frozen = false) : W_(W, frozen), b_(b, frozen), has_bias_(true) {
    if (b.rows() != W.rows() || b.cols() != 1)
      throw shape_error(ckpt::detail::cat("Linear: bias ", shape{int(b.rows()), int(b.cols())}, " does not fit weight ",
                                          shape{int(W.rows()), int(W.cols())}, " (expected ", shape{int(W.rows()), 1}, ")"));
  }

  /// W x + b as an expression: an activation around it fuses with the bias add.
  /// (Without a bias, b is a frozen zero vector, so the type stays one expression.)
  template <class X>
  auto operator()(X&& x) {
    check_input(x);
    return matmul(W_, std::forward<X>(x)) + b_;
  }
  /// W x without the bias.
  template <class X>
  Var<T, B> product(X&& x) {
    check_input(x);
    return matmul(W_, std::forward<X>(x));
  }

  Parameter<T, B>& weight() { return W_; }
  Parameter<T, B>& bias() { return b_; }
  bool has_bias() const { return has_bias_; }
  int in_features() const { return W_.cols(); }
  int out_features() const { return W_.rows(); }
  void set_frozen(bool f) {
    W_.set_frozen(f);
    if (has_bias_) b_.set_frozen(f);
  }
  bool frozen() const { return W_.frozen(); }
  void zero_grad() {
    W_.zero_grad();
    if (has_bias_) b_.zero_grad();
  }

 private:
  /// Names the layer and the shapes in the error (matmul's own message would name only the
  /// product), before an expression operand is recorded.
  template <class X>
  void check_input(const X& x) const {
    if constexpr (!is_transposed_v<std::remove_cvref_t<X>>) {
      const shape s = ckpt::detail::shape_of(x, "linear");
      if (s.rows != W_.cols())
        throw shape_error(ckpt::detail::cat("linear: input ", s, " has ", s.rows, " features, W ", W_.dims(), " expects ", W_.cols()));
    }
  }

  Parameter<T, B> W_;
  Parameter<T, B> b_;
  bool has_bias_;
};

}  // namespace ckpt::nn
