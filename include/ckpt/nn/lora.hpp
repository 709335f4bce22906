// ckpt — nn::LoRALinear: y = W x + (alpha / r) B (A x) + b with W (and b) frozen.
//
// Forward records two entries: u = A x (rank r, tagged with ckpt::keep so that every enclosing
// checkpoint keeps it, under any policy: a re-trace recomputes W x but never A x), and the
// fused output, whose two products accumulate into one buffer (no temporary the size of y).
// Reverse: dx = W^T g + A^T (s B^T g), dA = (s B^T g) x^T, dB = s g u^T, and never dW: W is a
// frozen parameter, so no buffer for its gradient exists at all.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/checkpoint/save.hpp"
#include "ckpt/nn/linear.hpp"
#include "ckpt/ops/dropout.hpp"
#include "ckpt/ops/matmul.hpp"
#include "ckpt/ops/operand.hpp"
#include "ckpt/ops/rowwise.hpp"

#include <optional>

namespace ckpt::nn {

namespace detail {

/// y(i, j) += b(i): the bias over every column.
template <class T>
struct add_bias {
  T* y;
  const T* b;
  int rows;
  CKPT_HOST_DEVICE void operator()(int i, int j) const { y[i + static_cast<long>(j) * rows] += b[i]; }
};

template <class T>
struct lora_entry {
  ckpt::detail::operand<T> W, x, B, u, bias;  // bias.value null when absent
  std::uint32_t out;
  T scale;

  template <class TapeT>
  void backward(TapeT& t) const {
    using Bk = typename TapeT::backend_type;
    const T* g = t.adjoint_if(out);
    if (!g) return;
    const int m = W.dims.rows, k = W.dims.cols, n = x.dims.cols, r = u.dims.rows;
    if (T* dx = t.adjoint_of(x)) {  // W^T g; the adapter's A^T du comes from u's own entry
      ++t.counters().gemms;
      Bk::gemm(true, false, k, n, m, T(1), W.value, m, g, m, T(1), dx, k);
    }
    if (T* du = t.adjoint_of(u)) {  // s B^T g
      ++t.counters().gemms;
      Bk::gemm(true, false, r, n, m, scale, B.value, m, g, m, T(1), du, r);
    }
    if (T* dB = t.adjoint_of(B)) {  // s g u^T
      ++t.counters().gemms;
      Bk::gemm(false, true, m, r, n, scale, g, m, u.value, r, T(1), dB, m);
    }
    if (T* db = bias.value ? t.adjoint_of(bias) : nullptr) Bk::add_row_sums(db, shape{m, n}, ckpt::detail::element_term<T>{g, m});
  }
};

}  // namespace detail

template <class T, Backend B = backend::cpu>
class LoRALinear {
 public:
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;

  /// W: out x in (frozen); rank r >= 1; A (r x in) small random, B (out x r) zero, so the
  /// adapter starts as the identity change. dropout applies to the adapter's input only.
  template <class DW>
  LoRALinear(const Eigen::MatrixBase<DW>& W, int rank, double alpha, std::uint64_t seed = 0, double dropout = 0.0)
      : W_(W, true),
        b_(Matrix::Zero(W.rows(), 1), true),
        A_(init_A(static_cast<int>(W.rows()), static_cast<int>(W.cols()), rank, seed)),
        B_(Matrix::Zero(W.rows(), rank)),
        scale_(static_cast<T>(alpha / rank)),
        dropout_(dropout),
        has_bias_(false) {
    if (!(dropout >= 0.0 && dropout < 1.0)) throw error(ckpt::detail::cat("LoRALinear: dropout must be in [0, 1), got ", dropout));
  }
  template <class DW, class Db>
  LoRALinear(const Eigen::MatrixBase<DW>& W, const Eigen::MatrixBase<Db>& bias, int rank, double alpha, std::uint64_t seed = 0,
             double dropout = 0.0)
      : LoRALinear(W, rank, alpha, seed, dropout) {
    if (bias.rows() != W.rows() || bias.cols() != 1)
      throw shape_error(ckpt::detail::cat("LoRALinear: bias ", shape{int(bias.rows()), int(bias.cols())}, " does not fit weight ",
                                          shape{int(W.rows()), int(W.cols())}, " (expected ", shape{int(W.rows()), 1}, ")"));
    b_ = Parameter<T, B>(bias, true);
    has_bias_ = true;
  }
  /// Wraps a Linear's weights (copied, then frozen).
  explicit LoRALinear(Linear<T, B>& base, int rank, double alpha, std::uint64_t seed = 0, double dropout = 0.0)
      : LoRALinear(base.weight().to_host(), base.bias().to_host(), rank, alpha, seed, dropout) {
    has_bias_ = base.has_bias();
  }

  template <class X>
    requires expr::Operand<X>
  Var<T, B> operator()(X&& input) {
    if (merged_) throw tape_error("LoRALinear: the adapter is merged into W (inference mode); unmerge() before training");
    // Shapes first: an expression operand is recorded only once it is known to fit.
    const shape xs = ckpt::detail::shape_of(input, "lora_linear");
    if (xs.rows != W_.cols())
      throw shape_error(ckpt::detail::cat("lora_linear: input ", xs, " has ", xs.rows, " features, W ", W_.dims(), " expects ", W_.cols()));
    auto x = ckpt::detail::resolve(std::forward<X>(input), "lora_linear");
    auto& t = ckpt::detail::tape_of(x, "lora_linear");
    Var<T, B> xv = t.var_of(x.ref.node);
    // The adapter path: u = A dropout(x), kept by every enclosing checkpoint.
    Var<T, B> u = dropout_ > 0 ? matmul(A_, dropout(xv, dropout_)) : matmul(A_, xv);
    keep(u);
    auto ur = ckpt::detail::resolve(u, "lora_linear");
    auto Wr = Tape<T, B>::operand_of(W_);
    auto Br = Tape<T, B>::operand_of(B_);
    auto br = has_bias_ ? Tape<T, B>::operand_of(b_) : ckpt::detail::operand<T>{};
    const int m = W_.rows(), k = W_.cols(), n = x.ref.dims.cols, r = rank();
    const bool grad = x.ref.requires_grad || ur.ref.requires_grad || Br.requires_grad || br.requires_grad;
    const std::uint32_t begin = static_cast<std::uint32_t>(t.node_count());
    const std::uint32_t out = t.new_output({m, n}, "lora_linear", op_kind::matmul, grad);
    if (!t.is_replayed(out)) {
      T* y = t.node(out).value;
      t.counters().gemms += 2;
      B::gemm(false, false, m, n, k, T(1), W_.value_data(), m, x.ref.value, k, T(0), y, m);
      B::gemm(false, false, m, n, r, scale_, B_.value_data(), m, ur.ref.value, r, T(1), y, m);
      if (has_bias_) B::for_each_2d(shape{m, n}, detail::add_bias<T>{y, b_.value_data(), m});
    }
    if (grad) t.push_entry(detail::lora_entry<T>{Wr, x.ref, Br, ur.ref, br, out, scale_}, begin);
    t.set_consumable(out);  // the reverse reads x, u and the parameters, never y
    return t.var_of(out);
  }

  /// Folds s B A into W for inference; unmerge() restores W exactly (from a host copy).
  void merge() {
    if (merged_) return;
    backup_ = W_.to_host();
    W_.assign(*backup_ + scale_ * (B_.to_host() * A_.to_host()));
    merged_ = true;
  }
  void unmerge() {
    if (!merged_) return;
    W_.assign(*backup_);
    backup_.reset();
    merged_ = false;
  }
  bool merged() const { return merged_; }
  /// Inference with the merged weight: one product.
  template <class X>
  Var<T, B> merged_forward(X&& x) {
    if (!merged_) throw tape_error("LoRALinear: merged_forward() needs merge() first");
    return eval(matmul(W_, std::forward<X>(x)) + b_);
  }

  Parameter<T, B>& weight() { return W_; }
  Parameter<T, B>& bias() { return b_; }
  Parameter<T, B>& A() { return A_; }
  Parameter<T, B>& B_matrix() { return B_; }
  int rank() const { return A_.rows(); }
  T scale() const { return scale_; }
  void zero_grad() {
    A_.zero_grad();
    B_.zero_grad();
  }

 private:
  static Matrix init_A(int out, int in, int rank, std::uint64_t seed) {
    if (rank < 1 || rank > std::min(out, in))
      throw shape_error(ckpt::detail::cat("LoRALinear: rank ", rank, " must be in [1, min(out, in) = ", std::min(out, in), "] for W ",
                                          shape{out, in}));
    return detail::uniform_init<T>(rank, in, in, seed);
  }

  Parameter<T, B> W_;
  Parameter<T, B> b_;
  Parameter<T, B> A_;
  Parameter<T, B> B_;
  T scale_;
  double dropout_;
  bool has_bias_;
  bool merged_ = false;
  std::optional<Matrix> backup_;
};

}  // namespace ckpt::nn
