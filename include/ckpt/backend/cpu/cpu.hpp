// ckpt — the CPU backend: host memory, Eigen containers and loops, BLAS (or Eigen) products.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/core/shape.hpp"
#include "ckpt/detail/accumulate.hpp"

#include <Eigen/Core>

#include <cctype>
#include <cstddef>
#include <cstdlib>
#include <string>
#include <string_view>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

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
// OpenBLAS only; weak, so that other BLAS vendors link too (then it is null).
char* openblas_get_corename(void) __attribute__((weak));
}
#endif

namespace ckpt::backend {

namespace detail {
/// Whether products go to the BLAS. They do, unless the BLAS is OpenBLAS running a kernel for
/// an old core (it falls back to "Prescott", SSE3, on processors newer than its release, e.g.
/// Debian 12's 0.3.21 on Emerald Rapids: 13 GFLOP/s) while Eigen was compiled for AVX2 or
/// AVX-512 (90 GFLOP/s on the same machine). CKPT_GEMM=blas or CKPT_GEMM=eigen in the
/// environment overrides the choice. Decided once per process.
inline bool use_blas() {
#if defined(CKPT_USE_BLAS)
  static const bool use = [] {
    if (const char* e = std::getenv("CKPT_GEMM")) return std::string_view(e) != "eigen";
#if defined(EIGEN_VECTORIZE_AVX2) || defined(EIGEN_VECTORIZE_AVX512)
    if (openblas_get_corename != nullptr) {
      std::string core = openblas_get_corename();
      for (char& c : core) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      for (const char* old : {"prescott", "core2", "penryn", "dunnington", "nehalem", "atom", "katmai", "coppermine",
                              "northwood", "banias", "generic"})
        if (core == old) return false;
    }
#endif
    return true;
  }();
  return use;
#else
  return false;
#endif
}
}  // namespace detail

/// The lanes that work on one column together in for_each_column: here one, so the column's
/// loops run in order and a lane reduction returns its argument. (backend::cuda's are a warp.)
struct one_lane {
  /// One lane takes the whole column, so detail::column_sum and column_max may split it into
  /// eight interleaved partial results, which vectorise.
  static constexpr bool single = true;
  CKPT_HOST_DEVICE int lane() const { return 0; }
  CKPT_HOST_DEVICE int width() const { return 1; }
  template <class T>
  CKPT_HOST_DEVICE T sum(T x) const {
    return x;
  }
  template <class T>
  CKPT_HOST_DEVICE T max(T x) const {
    return x;
  }
};

/// Tensors live in host memory; products go to BLAS when CKPT_USE_BLAS is defined. The loops
/// (for_each, assign, assign_2d, for_each_2d, add_row_sums, add_broadcast_sums, sum) run in
/// order on the calling thread: the orders they promise are the orders the reverse-mode tests
/// compare bit for bit.
struct cpu {
  static constexpr const char* name = "cpu";
  static constexpr std::size_t alignment = 64;
  /// Values are in host memory already: policy::offload keeps boundaries in place.
  static constexpr bool offloads = false;

  /// "blas" or "eigen": where this process sends matrix products.
  static const char* gemm_engine() { return detail::use_blas() ? "blas" : "eigen"; }

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
    if (n <= 0) return;  // an empty tensor's buffer may be null, which memcpy must not see
    std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(T));
  }

  /// Host <-> backend copies: the same memory here.
  template <class T>
  static void to_host(T* host, const T* src, long n) {
    copy(host, src, n);
  }
  template <class T>
  static void from_host(T* dst, const T* host, long n) {
    copy(dst, host, n);
  }
  /// Waits for queued work (none on the CPU).
  static void synchronize() {}

  // ---------------------------------------------------------------- loops
  // The loop primitives every op is written with. f is a functor whose call operator is
  // CKPT_HOST_DEVICE, so that the CUDA backend runs the same body in a kernel.

  /// f(i) for i in [0, n). Iterations may run concurrently on other backends.
  template <class F>
  static void for_each(long n, const F& f) {
    for (long i = 0; i < n; ++i) f(i);
  }
  /// out[i] = value(i) for i in [0, n): an elementwise result whose values are computed from
  /// reads alone (value(i) reads no element of out but perhaps out[i]). The same loop as
  /// for_each here; backend::cuda has each thread compute several values before it stores
  /// any, so that their loads are in flight together.
  template <class T, class V>
  static void assign(long n, T* out, const V& value) {
    for (long i = 0; i < n; ++i) out[i] = value(i);
  }
  /// out(r, c) = value(r, c) over a rows x cols output (column-major), column by column here:
  /// assign for an expression whose operands broadcast.
  template <class T, class V>
  static void assign_2d(shape s, T* out, const V& value) {
    for (int c = 0; c < s.cols; ++c)
      for (int r = 0; r < s.rows; ++r) out[r + static_cast<long>(c) * s.rows] = value(r, c);
  }
  /// f(r, c) for every element of a rows x cols tensor (column by column here).
  template <class F>
  static void for_each_2d(shape s, const F& f) {
    for (int c = 0; c < s.cols; ++c)
      for (int r = 0; r < s.rows; ++r) f(r, c);
  }
  /// f(j, lanes) for each column j of a rows x cols tensor: the column-wise work of row-wise
  /// ops (softmax, norms, cross-entropy). `lanes` is a group of lanes that all call f(j, ...)
  /// together: lane l takes rows l, l + width, ..., and lanes.sum(x) / lanes.max(x) combine
  /// the lanes' partial values (every lane gets the result; every lane must call them alike).
  /// Here one lane, column by column: a column's loops run in row order, and its sums and
  /// maxima (detail::column_sum, column_max) in eight interleaved partial results.
  template <class F>
  static void for_each_column(shape s, const F& f) {
    for (long j = 0; j < s.cols; ++j) f(j, one_lane{});
  }
  /// Room for n values, valid until the next call (for a pass's per-column partial results).
  template <class T>
  static T* scratch(long n) {
    return buffer<T, 0>(n);
  }
  /// Scratch of its own for each slot: scratch() is slot 0; add_broadcast_sums's row totals 1.
  template <class T, int Slot>
  static T* buffer(long n) {
    thread_local std::vector<T> storage;
    if (static_cast<long>(storage.size()) < n) storage.resize(static_cast<std::size_t>(n));
    return storage.data();
  }
  /// out[r] += the sum over c of term(r, c): a row's terms over the batch (a bias's
  /// gradient). Here each row adds its terms in increasing c, column by column, in
  /// accumulator_t<T> (double for float), and the total is rounded into out[r] once: what
  /// add_broadcast_sums does for a rows x 1 operand.
  template <class T, class Term>
  static void add_row_sums(T* out, shape s, const Term& term) {
    add_sums(out, ckpt::detail::summed::over_columns, s, term);
  }
  /// A broadcast operand's gradient: out (the operand's adjoint, of shape `leaf`: 1 x 1,
  /// rows x 1 or 1 x cols) += the sum of term(r, c) over the dimensions along which the operand
  /// was broadcast to `s`. Each is added in accumulator_t<T> and rounded into out once: a
  /// 1 x 1's terms in the order of detail/accumulate.hpp (term r + c rows into partial sum
  /// (r + c rows) mod 8, as sum_2d adds them), a 1 x cols's column by column in that order,
  /// a rows x 1's row by row in column order (as add_row_sums). One loop computes the terms, a
  /// block of a column at a time into a buffer: each operand of an expression instantiates it
  /// once, not once per shape, and it vectorises (the additions that follow do not depend on
  /// the expression).
  template <class T, class Term>
  static void add_broadcast_sums(T* out, shape leaf, shape s, const Term& term) {
    add_sums(out, ckpt::detail::summed_for(leaf, s), s, term);
  }
  /// out[0], out[r] or out[c] += the sum of term(r, c) over everything, each row's columns or
  /// each column's rows (detail::summed).
  template <class T, class Term>
  static void add_sums(T* out, ckpt::detail::summed over, shape s, const Term& term) {
    using ckpt::detail::summed;
    using A = ckpt::detail::accumulator_t<T>;
    using R = std::remove_cvref_t<decltype(term(0, 0))>;
    constexpr int block = ckpt::detail::term_block;
    const bool by_row = over == summed::over_columns, by_column = over == summed::over_rows;
    A* total = by_row ? buffer<A, 1>(s.rows) : nullptr;
    if (by_row)
      for (int r = 0; r < s.rows; ++r) total[r] = A(0);
    ckpt::detail::lane_accumulator<A> acc;
    R terms[block];
    for (int c = 0; c < s.cols; ++c) {
      for (int r0 = 0; r0 < s.rows; r0 += block) {
        const int n = s.rows - r0 < block ? s.rows - r0 : block;
        for (int j = 0; j < n; ++j) terms[j] = term(r0 + j, c);
        if (by_row)
          for (int j = 0; j < n; ++j) total[r0 + j] += static_cast<A>(terms[j]);
        else
          acc.add(terms, n);
      }
      if (by_column) {
        out[c] += static_cast<T>(acc.total());
        acc = {};
      }
    }
    if (by_row)
      for (int r = 0; r < s.rows; ++r) out[r] += static_cast<T>(total[r]);
    else if (!by_column && s.size() > 0)
      out[0] += static_cast<T>(acc.total());
  }
  /// out[0] = finish(sum of term(i) for i < n), added in the order of detail/accumulate.hpp.
  template <class T, class F, class Finish>
  static void sum(T* out, long n, const F& term, const Finish& finish) {
    *out = finish(ckpt::detail::lane_sum<T>(n, term));
  }
  /// The same over the elements of a rows x cols tensor, term(r, c), element (r, c) being
  /// term number r + c * rows.
  template <class T, class F, class Finish>
  static void sum_2d(T* out, shape s, const F& term, const Finish& finish) {
    *out = finish(ckpt::detail::lane_sum<T>(s, term));
  }

  /// C = alpha * op(A) * op(B) + beta * C, column-major; op(A) is m x k, op(B) is k x n.
  template <class T>
  static void gemm(bool trans_a, bool trans_b, int m, int n, int k, T alpha, const T* a, int lda,
                   const T* b, int ldb, T beta, T* c, int ldc) {
    if (m == 0 || n == 0) return;
#if defined(CKPT_USE_BLAS)
    constexpr int col_major = 102, no_trans = 111, trans = 112;
    if (!detail::use_blas()) {
      eigen_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      return;
    }
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

  /// `count` products C_i = alpha * op(A_i) * op(B_i) + beta * C_i, where X_i starts at
  /// x + i * stride_x (cuBLAS's strided batched GEMM): one GEMM after the other here.
  template <class T>
  static void gemm_batched(bool trans_a, bool trans_b, int m, int n, int k, T alpha, const T* a, int lda, long stride_a, const T* b,
                           int ldb, long stride_b, T beta, T* c, int ldc, long stride_c, int count) {
    for (int i = 0; i < count; ++i)
      gemm(trans_a, trans_b, m, n, k, alpha, a + i * stride_a, lda, b + i * stride_b, ldb, beta, c + i * stride_c, ldc);
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
