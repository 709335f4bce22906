// ckpt — the CPU backend: host memory, Eigen containers and loops, BLAS (or Eigen) products.
#pragma once
#include "ckpt/config.hpp"

#include <Eigen/Core>

#include <cstddef>
#include <cstring>
#include <new>
#include <type_traits>

#if defined(CKPT_USE_BLAS)
// The CBLAS entry points, declared here rather than through a header because the header's
// location differs between BLAS vendors while the symbols do not.
extern "C" {
void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float* a, int lda, const float* b, int ldb, float beta, float* c,
                 int ldc);
void cblas_dgemm(int order, int trans_a, int trans_b, int m, int n, int k, double alpha,
                 const double* a, int lda, const double* b, int ldb, double beta, double* c,
                 int ldc);
}
#endif

namespace ckpt::backend {

/// Tensors live in host memory; products go to BLAS when CKPT_USE_BLAS is defined.
struct cpu {
  static constexpr const char* name = "cpu";
  static constexpr std::size_t alignment = 64;

  static void* allocate(std::size_t bytes) {
    return ::operator new(bytes, std::align_val_t{alignment});
  }
  static void deallocate(void* p, std::size_t) noexcept {
    ::operator delete(p, std::align_val_t{alignment});
  }
  template <class T>
  static void fill_zero(T* p, long n) {
    std::memset(p, 0, static_cast<std::size_t>(n) * sizeof(T));
  }
  template <class T>
  static void copy(T* dst, const T* src, long n) {
    std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(T));
  }

  /// C = alpha * op(A) * op(B) + beta * C, column-major; op(A) is m x k, op(B) is k x n.
  template <class T>
  static void gemm(bool trans_a, bool trans_b, int m, int n, int k, T alpha, const T* a, int lda,
                   const T* b, int ldb, T beta, T* c, int ldc) {
    if (m == 0 || n == 0) return;
#if defined(CKPT_USE_BLAS)
    constexpr int col_major = 102, no_trans = 111, trans = 112;
    if constexpr (std::is_same_v<T, float>) {
      cblas_sgemm(col_major, trans_a ? trans : no_trans, trans_b ? trans : no_trans, m, n, k,
                  alpha, a, lda, b, ldb, beta, c, ldc);
      return;
    } else if constexpr (std::is_same_v<T, double>) {
      cblas_dgemm(col_major, trans_a ? trans : no_trans, trans_b ? trans : no_trans, m, n, k,
                  alpha, a, lda, b, ldb, beta, c, ldc);
      return;
    }
#endif
    eigen_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }

  template <class T>
  static void eigen_gemm(bool trans_a, bool trans_b, int m, int n, int k, T alpha, const T* a,
                         int lda, const T* b, int ldb, T beta, T* c, int ldc) {
    using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
    using Stride = Eigen::OuterStride<>;
    Eigen::Map<Mat, 0, Stride> C(c, m, n, Stride(ldc));
    Eigen::Map<const Mat, 0, Stride> A(a, trans_a ? k : m, trans_a ? m : k, Stride(lda));
    Eigen::Map<const Mat, 0, Stride> B(b, trans_b ? n : k, trans_b ? k : n, Stride(ldb));
    if (beta == T(0)) {
      C.setZero();
    } else if (beta != T(1)) {
      C *= beta;
    }
    if (k == 0) return;
    if (!trans_a && !trans_b) C.noalias() += alpha * A * B;
    if (trans_a && !trans_b) C.noalias() += alpha * A.transpose() * B;
    if (!trans_a && trans_b) C.noalias() += alpha * A * B.transpose();
    if (trans_a && trans_b) C.noalias() += alpha * A.transpose() * B.transpose();
  }
};

}  // namespace ckpt::backend
