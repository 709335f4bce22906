// ckpt — Parameter: a leaf that outlives a training step (a weight), with its own gradient.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/backend/cpu/cpu.hpp"
#include "ckpt/core/backend.hpp"
#include "ckpt/core/error.hpp"
#include "ckpt/core/shape.hpp"

#include <Eigen/Core>

#include <type_traits>
#include <utility>

namespace ckpt {

namespace detail {
/// A host copy of the s.size() values at p on backend B.
template <class B, class T>
Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> download(const T* p, shape s) {
  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> m(s.rows, s.cols);
  B::to_host(m.data(), p, m.size());
  return m;
}
/// Writes a host matrix (cast to T) to p on backend B. A plain column-major matrix of T is
/// copied from where it is; anything else (another scalar type, an expression, a block) is
/// evaluated into a host matrix of T first.
template <class B, class T, class Derived>
void upload(T* p, const Eigen::MatrixBase<Derived>& m) {
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  constexpr bool contiguous_T = std::is_base_of_v<Eigen::PlainObjectBase<Derived>, Derived> && std::is_same_v<typename Derived::Scalar, T> &&
                                (!(Derived::Flags & Eigen::RowMajorBit) || Derived::IsVectorAtCompileTime);
  if constexpr (std::is_same_v<B, backend::cpu>) {
    Eigen::Map<Matrix>(p, m.rows(), m.cols()) = m.template cast<T>();
  } else if constexpr (contiguous_T) {
    B::from_host(p, m.derived().data(), m.size());
  } else {
    const Matrix host = m.template cast<T>();
    B::from_host(p, host.data(), host.size());
  }
}
}  // namespace detail

/// Owns one backend buffer of rows x cols values; moves, never copies implicitly.
template <class T, Backend B>
class buffer {
 public:
  buffer() = default;
  explicit buffer(shape s) : shape_(s) {
    if (s.size() > 0) data_ = static_cast<T*>(B::allocate(bytes()));
  }
  buffer(buffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), shape_(std::exchange(o.shape_, {})) {}
  buffer& operator=(buffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      shape_ = std::exchange(o.shape_, {});
    }
    return *this;
  }
  buffer(const buffer&) = delete;
  buffer& operator=(const buffer&) = delete;
  ~buffer() { release(); }

  T* data() { return data_; }
  const T* data() const { return data_; }
  ckpt::shape dims() const { return shape_; }
  std::size_t bytes() const { return static_cast<std::size_t>(shape_.size()) * sizeof(T); }

 private:
  void release() noexcept {
    if (data_) B::deallocate(data_, bytes());
    data_ = nullptr;
  }
  T* data_ = nullptr;
  ckpt::shape shape_;
};

/// A trainable (or frozen) weight. Its value and gradient live outside any tape, so they
/// persist across steps; every use on a tape accumulates into grad(). A frozen parameter has
/// no gradient buffer at all: products with it skip the GEMM that would compute one.
template <class T, Backend B = backend::cpu>
class Parameter {
 public:
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  using Map = Eigen::Map<Matrix, Eigen::Aligned16>;
  using ConstMap = Eigen::Map<const Matrix, Eigen::Aligned16>;

  Parameter() = default;

  /// A parameter with the value `init` (a host matrix, copied to the backend).
  template <class Derived>
  explicit Parameter(const Eigen::MatrixBase<Derived>& init, bool frozen = false)
      : value_(shape{static_cast<int>(init.rows()), static_cast<int>(init.cols())}), frozen_(frozen) {
    assign(init);
    if (!frozen_) {
      grad_ = buffer<T, B>(value_.dims());
      zero_grad();
    }
  }

  shape dims() const { return value_.dims(); }
  int rows() const { return value_.dims().rows; }
  int cols() const { return value_.dims().cols; }
  bool frozen() const { return frozen_; }

  /// Freezing drops the gradient buffer; unfreezing allocates a zeroed one.
  void set_frozen(bool f) {
    if (f == frozen_) return;
    frozen_ = f;
    grad_ = f ? buffer<T, B>() : buffer<T, B>(value_.dims());
    if (!f) zero_grad();
  }

  void zero_grad() {
    if (grad_.data()) B::fill_zero(grad_.data(), grad_.dims().size());
  }

  T* value_data() { return value_.data(); }
  const T* value_data() const { return value_.data(); }
  /// Null when frozen.
  T* grad_data() { return grad_.data(); }
  const T* grad_data() const { return grad_.data(); }

  /// Overwrites the value with a host matrix of the same shape (copied to the backend).
  template <class Derived>
  void assign(const Eigen::MatrixBase<Derived>& m) {
    if (m.rows() != rows() || m.cols() != cols())
      throw shape_error(detail::cat("Parameter::assign: a ", shape{static_cast<int>(m.rows()), static_cast<int>(m.cols())},
                                    " matrix for a ", dims(), " parameter"));
    detail::upload<B>(value_.data(), m);
  }
  /// A host copy of the value (any backend).
  Matrix to_host() const { return detail::download<B>(value_.data(), dims()); }
  /// A host copy of the gradient (any backend); throws for a frozen parameter.
  Matrix grad_to_host() const {
    if (frozen_) throw tape_error(detail::cat("grad: parameter ", dims(), " is frozen and has no gradient"));
    return detail::download<B>(grad_.data(), dims());
  }

  /// The value in place, as an Eigen map (CPU backend; elsewhere use to_host() and assign()).
  Map value()
    requires std::is_same_v<B, backend::cpu>
  {
    return Map(value_.data(), rows(), cols());
  }
  ConstMap value() const
    requires std::is_same_v<B, backend::cpu>
  {
    return ConstMap(value_.data(), rows(), cols());
  }
  /// The accumulated gradient; throws for a frozen parameter, which has none.
  ConstMap grad() const
    requires std::is_same_v<B, backend::cpu>
  {
    if (frozen_) throw tape_error(detail::cat("grad: parameter ", dims(), " is frozen and has no gradient"));
    return ConstMap(grad_.data(), rows(), cols());
  }

 private:
  buffer<T, B> value_;
  buffer<T, B> grad_;
  bool frozen_ = false;
};

}  // namespace ckpt
