// ckpt — nn::Embedding: a features x vocabulary table whose columns are looked up by token id.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/core/parameter.hpp"
#include "ckpt/core/tape.hpp"
#include "ckpt/ops/layout.hpp"

#include <cstdint>
#include <initializer_list>
#include <random>
#include <span>
#include <vector>

namespace ckpt::nn {

/// A lookup table: `embedding(tape, ids)` is the features x ids.size() tensor whose column j is
/// the table's column ids[j] (ckpt::gather_cols). Its reverse adds into the gradient of the
/// looked-up columns only. The table is a Parameter, so it can also be used directly, e.g. as
/// a tied output layer: `matmul(transpose(embedding.weight()), h)`.
template <class T, Backend B = backend::cpu>
class Embedding {
 public:
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;

  /// Entries drawn from N(0, 1) with the given seed, as PyTorch's nn.Embedding does.
  Embedding(int vocabulary, int features, std::uint64_t seed = 0, bool frozen = false)
      : table_(normal_init(vocabulary, features, seed), frozen) {}
  template <class D>
  explicit Embedding(const Eigen::MatrixBase<D>& table, bool frozen = false) : table_(table, frozen) {}

  Var<T, B> operator()(Tape<T, B>& tape, std::span<const int> ids) {
    ckpt::detail::check_gather_ids(table_.dims(), ids, "embedding");  // before tape.param() records the table
    return ckpt::detail::record_gather(tape.param(table_), ids, "embedding");
  }
  Var<T, B> operator()(Tape<T, B>& tape, const std::vector<int>& ids) { return (*this)(tape, std::span<const int>(ids)); }
  Var<T, B> operator()(Tape<T, B>& tape, std::initializer_list<int> ids) {
    return (*this)(tape, std::span<const int>(ids.begin(), ids.size()));
  }

  Parameter<T, B>& weight() { return table_; }
  int vocabulary() const { return table_.cols(); }
  int features() const { return table_.rows(); }
  void set_frozen(bool f) { table_.set_frozen(f); }
  bool frozen() const { return table_.frozen(); }
  void zero_grad() { table_.zero_grad(); }

 private:
  static Matrix normal_init(int vocabulary, int features, std::uint64_t seed) {
    if (vocabulary <= 0 || features <= 0)
      throw shape_error(ckpt::detail::cat("Embedding: sizes must be positive, got vocabulary ", vocabulary, ", features ", features));
    std::mt19937_64 gen(seed);
    std::normal_distribution<double> d(0.0, 1.0);
    Matrix m(features, vocabulary);
    for (int j = 0; j < vocabulary; ++j)
      for (int i = 0; i < features; ++i) m(i, j) = static_cast<T>(d(gen));
    return m;
  }

  Parameter<T, B> table_;
};

}  // namespace ckpt::nn
