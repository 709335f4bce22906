// ckpt — the CUDA backend: device memory, cuBLAS products, and the loop primitives as kernels.
//
// Every op's forward and reverse body is a CKPT_HOST_DEVICE functor (see backend/cpu/cpu.hpp
// for the primitives' contracts); here each primitive is one kernel launch on the context's
// compute stream, so an assigned elementwise expression is one fused kernel forward and one in
// reverse (plus one per broadcast operand, expr/record.hpp). Nothing uses atomics: sums go
// through a fixed two-pass tree and every element has one writer, so a run repeated on the
// same inputs repeats its bits. Buffers are cached by the tape's pool: a training step that
// repeats its shapes calls no cudaMalloc after the first (counters().device_allocations).
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/backend/cuda/context.cuh"
#include "ckpt/core/shape.hpp"
#include "ckpt/detail/accumulate.hpp"
#include "ckpt/detail/runs.hpp"
#include "ckpt/expr/functors.hpp"

#include <algorithm>
#include <cstddef>
#include <string>
#include <type_traits>

namespace ckpt::backend {

namespace cuda_detail {

inline unsigned grid_for(long n) {
  const long blocks = (n + block_threads - 1) / block_threads;
  return static_cast<unsigned>(std::clamp<long>(blocks, 1, 65535L * 16));
}

template <class F>
__global__ void for_each_kernel(long n, F f) {
  const long stride = static_cast<long>(gridDim.x) * blockDim.x;
  for (long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) f(i);
}
/// Values each thread of assign_kernel computes before it stores any: its loads (three per
/// value for a * sigmoid(b) + c) are then in flight together, where one value per thread left
/// too few bytes in flight per SM to keep the memory busy.
inline constexpr int assign_per_thread = 4;
/// assign_2d's value at flat index i = r + c * rows, in 32-bit division where Index is
/// unsigned (64-bit division is emulated).
template <class V, class Index>
struct at_coordinates {
  V value;
  Index rows;
  CKPT_HOST_DEVICE auto operator()(long i) const {
    const Index u = static_cast<Index>(i);
    return value(static_cast<int>(u % rows), static_cast<int>(u / rows));
  }
};

/// out[i] = value(i): thread t of block b takes i = base + t + k * block_threads, k < 4, so
/// each of its loads is a warp's coalesced read, and grid-strides on by whole blocks of values.
template <class T, class V>
__global__ void assign_kernel(long n, T* out, V value) {
  constexpr int per_thread = assign_per_thread;
  constexpr long per_block = static_cast<long>(block_threads) * per_thread;
  const long stride = static_cast<long>(gridDim.x) * per_block;
  for (long base = static_cast<long>(blockIdx.x) * per_block + threadIdx.x; base < n; base += stride) {
    T v[per_thread] = {};
    if (base + (per_thread - 1) * block_threads < n) {  // all four in range: no branch between the loads
#pragma unroll
      for (int k = 0; k < per_thread; ++k) v[k] = value(base + k * block_threads);
#pragma unroll
      for (int k = 0; k < per_thread; ++k) out[base + k * block_threads] = v[k];
    } else {  // the last block's tail
#pragma unroll
      for (int k = 0; k < per_thread; ++k)
        if (base + k * block_threads < n) out[base + k * block_threads] = value(base + k * block_threads);
    }
  }
}
template <class F>
__global__ void for_each_2d_kernel(int rows, long n, F f) {
  const long stride = static_cast<long>(gridDim.x) * blockDim.x;
  if (n <= 0xffffffffL) {  // 32-bit division where it suffices: 64-bit division is emulated
    const unsigned ur = static_cast<unsigned>(rows);
    for (long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
      const unsigned u = static_cast<unsigned>(i);
      f(static_cast<int>(u % ur), static_cast<int>(u / ur));
    }
  } else {
    for (long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
      f(static_cast<int>(i % rows), static_cast<int>(i / rows));
  }
}

/// The 32 lanes of a warp, which take one column together in for_each_column. Their sums and
/// maxima go through a butterfly of shuffles: at each step lanes l and l ^ offset add the same
/// two values (in the other order, which IEEE addition does not mind), so every lane ends with
/// the same sum, and the tree is fixed, so a repeated run gives the same bits again. (A max
/// may differ between lanes in the sign of a zero tie only.) (Host code never
/// calls these; the host pass of nvcc compiles them as no-ops.)
struct warp_lanes {
  static constexpr int size = 32;
  int index;
  CKPT_HOST_DEVICE int lane() const { return index; }
  CKPT_HOST_DEVICE int width() const { return size; }
  template <class T>
  CKPT_HOST_DEVICE T sum(T x) const {
#if defined(__CUDA_ARCH__)
    for (int offset = size / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
#endif
    return x;
  }
  template <class T>
  CKPT_HOST_DEVICE T max(T x) const {
#if defined(__CUDA_ARCH__)
    for (int offset = size / 2; offset > 0; offset /= 2) x = ckpt::fn::max_(x, __shfl_xor_sync(0xffffffffu, x, offset));
#endif
    return x;
  }
};

/// One warp per column, striding over the columns by the grid's warps. A warp's lanes share
/// j, so they call f (and its shuffles) together.
template <class F>
__global__ void for_each_column_kernel(long cols, F f) {
  const long warps = static_cast<long>(gridDim.x) * (blockDim.x / warp_lanes::size);
  const warp_lanes lanes{static_cast<int>(threadIdx.x % warp_lanes::size)};
  for (long j = (static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x) / warp_lanes::size; j < cols; j += warps) f(j, lanes);
}

static_assert(block_threads % warp_lanes::size == 0, "ckpt: for_each_column keeps each warp on one column");

/// Adds the block's block_threads values of s in a fixed tree; s[0] holds the sum.
__device__ inline void block_tree_sum(double* s) {
  for (int w = block_threads / 2; w > 0; w >>= 1) {
    if (static_cast<int>(threadIdx.x) < w) s[threadIdx.x] += s[threadIdx.x + w];
    __syncthreads();
  }
}

/// First pass: block b adds the terms i = b * threads + t + k * (blocks * threads).
template <class Term>
__global__ void partial_sums_kernel(long n, Term term, double* partials) {
  __shared__ double s[block_threads];
  double acc = 0;
  const long stride = static_cast<long>(reduce_blocks) * block_threads;
  for (long i = static_cast<long>(blockIdx.x) * block_threads + threadIdx.x; i < n; i += stride) acc += static_cast<double>(term(i));
  s[threadIdx.x] = acc;
  __syncthreads();
  block_tree_sum(s);
  if (threadIdx.x == 0) partials[blockIdx.x] = s[0];
}
/// Second pass: one block adds the partial sums and writes finish(total).
template <class T, class Finish>
__global__ void finish_sum_kernel(const double* partials, T* out, Finish finish) {
  __shared__ double s[block_threads];
  double acc = 0;
  for (int i = threadIdx.x; i < reduce_blocks; i += block_threads) acc += partials[i];
  s[threadIdx.x] = acc;
  __syncthreads();
  block_tree_sum(s);
  if (threadIdx.x == 0) *out = finish(static_cast<ckpt::detail::accumulator_t<T>>(s[0]));
}

/// term(i) of a rows x cols tensor's element i = r + c * rows, as term(r, c).
template <class Term>
struct by_coordinates {
  Term term;
  int rows;
  CKPT_HOST_DEVICE auto operator()(long i) const { return term(static_cast<int>(i % rows), static_cast<int>(i / rows)); }
};

}  // namespace cuda_detail

/// Tensors in device memory; products through cuBLAS; loops as kernels on one stream.
struct cuda {
  static constexpr const char* name = "cuda";
  static constexpr std::size_t alignment = 256;

  /// The process's context (stream, cuBLAS handle, scratch, staging), from the host thread that
  /// holds it; another thread gets cuda_thread_error until it calls adopt_this_thread().
  static cuda_detail::context& context() { return cuda_detail::ctx(); }
  /// This host thread takes the backend over (the one that drove it must be done with it).
  static void adopt_this_thread() { cuda_detail::any_thread_ctx().adopt_this_thread(); }
  static cudaStream_t stream() { return context().stream(); }
  static const cuda_detail::counters& counters() { return context().count(); }
  /// TF32 tensor-core products for float (off by default; see context::set_tf32).
  static void set_tf32(bool on) { context().set_tf32(on); }
  /// Whether this process sees a CUDA device at all (tests skip without one).
  static bool available() { return unavailable_reason().empty(); }
  /// Why no device is usable ("no CUDA device", or the runtime's error, e.g. a driver older
  /// than the runtime), or empty when one is.
  static std::string unavailable_reason() {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      return ckpt::detail::cat("cudaGetDeviceCount: ", cudaGetErrorString(e), " (", cudaGetErrorName(e), ")");
    }
    return n > 0 ? std::string() : std::string("no CUDA device");
  }

  static void* allocate(std::size_t bytes) {
    auto& c = context();  // first: from a thread that does not hold it, nothing is allocated
    void* p = nullptr;
    cuda_detail::check(cudaMalloc(&p, bytes), "cudaMalloc");
    ++c.count().device_allocations;
    return p;
  }
  static void deallocate(void* p, std::size_t) noexcept {
    cudaFree(p);  // cannot throw here; a failure shows at the next checked call
    // Counted by the holder only: another thread (a tape destroyed there) must not race on the
    // counters; cudaFree itself is thread-safe.
    if (auto& c = cuda_detail::any_thread_ctx(); c.held_here()) ++c.count().device_frees;
  }
  template <class T>
  static void fill_zero(T* p, long n) {
    if (n <= 0) return;
    cuda_detail::check(cudaMemsetAsync(p, 0, static_cast<std::size_t>(n) * sizeof(T), stream()), "cudaMemsetAsync");
  }
  /// Device to device, in stream order.
  template <class T>
  static void copy(T* dst, const T* src, long n) {
    if (n <= 0) return;
    cuda_detail::check(cudaMemcpyAsync(dst, src, static_cast<std::size_t>(n) * sizeof(T), cudaMemcpyDeviceToDevice, stream()),
                       "cudaMemcpyAsync(device to device)");
  }
  /// Device to host: waits for the queued work that writes src.
  template <class T>
  static void to_host(T* host, const T* src, long n) {
    if (n <= 0) return;
    cuda_detail::check(cudaMemcpyAsync(host, src, static_cast<std::size_t>(n) * sizeof(T), cudaMemcpyDeviceToHost, stream()),
                       "cudaMemcpyAsync(device to host)");
    synchronize();
  }
  /// Host to device, in stream order; the host buffer may be reused as soon as this returns.
  /// The values go through a pinned staging buffer (context::upload), so the host does not
  /// wait for the stream: CUDA documents no point at which an asynchronous copy straight from
  /// pageable memory is done reading it, and callers free temporaries right after.
  template <class T>
  static void from_host(T* dst, const T* host, long n) {
    if (n <= 0) return;
    context().upload(dst, host, static_cast<std::size_t>(n) * sizeof(T));
  }
  static void synchronize() { cuda_detail::check(cudaStreamSynchronize(stream()), "cudaStreamSynchronize"); }
  /// Room for n values of partial sums, valid until the next call (in stream order).
  template <class T>
  static T* scratch(long n) {
    return static_cast<T*>(context().scratch(static_cast<std::size_t>(n > 0 ? n : 1) * sizeof(T)));
  }

  // ---------------------------------------------------------------- offload (see Tape::offload)
  // Copies run on the context's copy stream, ordered against the compute stream by events, so
  // they overlap with kernels; an event handle is returned for each copy in flight.

  static constexpr bool offloads = true;
  static void* host_allocate(std::size_t bytes) { return cuda_detail::pinned_memory::allocate(bytes); }
  static void host_deallocate(void* p) noexcept { cuda_detail::pinned_memory::deallocate(p, 0); }
  /// Starts host <- device once the compute stream's queued work (which writes `dev`) is done.
  static void* copy_to_host_async(void* host, const void* dev, std::size_t bytes) {
    return copy_behind_compute(host, dev, bytes, cudaMemcpyDeviceToHost, "cudaMemcpyAsync(offload to host)");
  }
  /// Starts device <- host once the compute stream's queued work (which may still read the
  /// buffer `dev` was before the pool handed it out again) is done.
  static void* copy_to_device_async(void* dev, const void* host, std::size_t bytes) {
    return copy_behind_compute(dev, host, bytes, cudaMemcpyHostToDevice, "cudaMemcpyAsync(prefetch to device)");
  }
  static bool event_done(void* e) noexcept {
    const cudaError_t r = cudaEventQuery(static_cast<cudaEvent_t>(e));
    if (r == cudaErrorNotReady) (void)cudaGetLastError();  // "not yet" is no error to keep
    return r == cudaSuccess;
  }
  /// The compute stream waits for the copy (the host does not), and the event is given back.
  static void wait_event(void* e) {
    cuda_detail::check(cudaStreamWaitEvent(stream(), static_cast<cudaEvent_t>(e), 0), "cudaStreamWaitEvent");
    release_event(e);
  }
  /// The host waits for the copy, and the event is given back.
  static void finish_event(void* e) noexcept {
    cudaEventSynchronize(static_cast<cudaEvent_t>(e));
    release_event(e);
  }
  static void release_event(void* e) noexcept { cuda_detail::any_thread_ctx().give_event(static_cast<cudaEvent_t>(e)); }

  // ---------------------------------------------------------------- loops (see backend/cpu/cpu.hpp)

  template <class F>
  static void for_each(long n, const F& f) {
    static_assert(std::is_trivially_copyable_v<F>, "ckpt::backend::cuda: a loop body is copied to the device");
    if (n <= 0) return;
    cuda_detail::for_each_kernel<<<cuda_detail::grid_for(n), cuda_detail::block_threads, 0, stream()>>>(n, f);
    cuda_detail::check_launch("for_each kernel");
  }
  template <class T, class V>
  static void assign(long n, T* out, const V& value) {
    static_assert(std::is_trivially_copyable_v<V>, "ckpt::backend::cuda: a loop body is copied to the device");
    if (n <= 0) return;
    const long threads = (n + cuda_detail::assign_per_thread - 1) / cuda_detail::assign_per_thread;
    cuda_detail::assign_kernel<<<cuda_detail::grid_for(threads), cuda_detail::block_threads, 0, stream()>>>(n, out, value);
    cuda_detail::check_launch("assign kernel");
  }
  template <class T, class V>
  static void assign_2d(shape s, T* out, const V& value) {
    if (s.size() <= 0xffffffffL)
      assign(s.size(), out, cuda_detail::at_coordinates<V, unsigned>{value, static_cast<unsigned>(s.rows)});
    else
      assign(s.size(), out, cuda_detail::at_coordinates<V, long>{value, s.rows});
  }
  template <class F>
  static void for_each_2d(shape s, const F& f) {
    static_assert(std::is_trivially_copyable_v<F>, "ckpt::backend::cuda: a loop body is copied to the device");
    const long n = s.size();
    if (n <= 0) return;
    cuda_detail::for_each_2d_kernel<<<cuda_detail::grid_for(n), cuda_detail::block_threads, 0, stream()>>>(s.rows, n, f);
    cuda_detail::check_launch("for_each_2d kernel");
  }
  /// A warp per column (see warp_lanes): a column's reads are contiguous across the lanes.
  template <class F>
  static void for_each_column(shape s, const F& f) {
    static_assert(std::is_trivially_copyable_v<F>, "ckpt::backend::cuda: a loop body is copied to the device");
    if (s.cols <= 0) return;
    cuda_detail::for_each_column_kernel<<<cuda_detail::grid_for(static_cast<long>(s.cols) * cuda_detail::warp_lanes::size),
                                          cuda_detail::block_threads, 0, stream()>>>(s.cols, f);
    cuda_detail::check_launch("for_each_column kernel");
  }
  /// Row sums in fixed runs (detail/runs.hpp): about 64k threads, each summing its run in a
  /// register, then a warp per row adding its runs (for_each_column).
  template <class T, class Term>
  static void add_row_sums(T* out, shape s, const Term& term) {
    ckpt::detail::add_row_sums_in_runs<cuda>(out, s, term);
  }
  /// A broadcast operand's gradient (see backend::cpu): the grid-wide sum for 1 x 1, row runs
  /// for rows x 1, for 1 x cols a column's rows in interleaved runs (a warp reads consecutive
  /// rows), then a warp per column adding its runs (detail/runs.hpp).
  template <class T, class Term>
  static void add_broadcast_sums(T* out, shape leaf, shape s, const Term& term) {
    ckpt::detail::add_broadcast_sums_in_runs<cuda>(out, leaf, s, term);
  }
  template <class T, class F, class Finish>
  static void sum(T* out, long n, const F& term, const Finish& finish) {
    auto& c = context();
    cuda_detail::partial_sums_kernel<<<cuda_detail::reduce_blocks, cuda_detail::block_threads, 0, c.stream()>>>(n, term, c.partials());
    cuda_detail::check_launch("sum kernel (partial sums)");
    cuda_detail::finish_sum_kernel<<<1, cuda_detail::block_threads, 0, c.stream()>>>(c.partials(), out, finish);
    cuda_detail::check_launch("sum kernel (total)");
  }
  template <class T, class F, class Finish>
  static void sum_2d(T* out, shape s, const F& term, const Finish& finish) {
    sum(out, s.size(), cuda_detail::by_coordinates<F>{term, s.rows > 0 ? s.rows : 1}, finish);
  }

  static void* copy_behind_compute(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind, const char* call) {
    auto& c = context();
    cudaEvent_t computed = c.take_event();
    cuda_detail::check(cudaEventRecord(computed, c.stream()), "cudaEventRecord(compute)");
    cuda_detail::check(cudaStreamWaitEvent(c.copy_stream(), computed, 0), "cudaStreamWaitEvent(copy)");
    c.give_event(computed);  // the wait took the event's state at the call
    cuda_detail::check(cudaMemcpyAsync(dst, src, bytes, kind, c.copy_stream()), call);
    cudaEvent_t copied = c.take_event();
    cuda_detail::check(cudaEventRecord(copied, c.copy_stream()), "cudaEventRecord(copy)");
    return copied;
  }

  /// C = alpha * op(A) * op(B) + beta * C, column-major, on the compute stream.
  template <class T>
  static void gemm(bool trans_a, bool trans_b, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c,
                   int ldc) {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "ckpt::backend::cuda::gemm: float or double");
    if (m == 0 || n == 0) return;
    const cublasOperation_t oa = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, ob = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    lda = std::max(lda, 1);
    ldb = std::max(ldb, 1);
    if constexpr (std::is_same_v<T, float>)
      cuda_detail::check(cublasSgemm(context().blas(), oa, ob, m, n, k, &alpha, a, lda, b, ldb, &beta, c, ldc), "cublasSgemm");
    else
      cuda_detail::check(cublasDgemm(context().blas(), oa, ob, m, n, k, &alpha, a, lda, b, ldb, &beta, c, ldc), "cublasDgemm");
  }
  /// `count` products C_i = alpha * op(A_i) * op(B_i) + beta * C_i, X_i at x + i * stride_x,
  /// in one cuBLAS call on the compute stream.
  template <class T>
  static void gemm_batched(bool trans_a, bool trans_b, int m, int n, int k, T alpha, const T* a, int lda, long stride_a, const T* b,
                           int ldb, long stride_b, T beta, T* c, int ldc, long stride_c, int count) {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "ckpt::backend::cuda::gemm_batched: float or double");
    if (m == 0 || n == 0 || count == 0) return;
    const cublasOperation_t oa = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, ob = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    lda = std::max(lda, 1);
    ldb = std::max(ldb, 1);
    if constexpr (std::is_same_v<T, float>)
      cuda_detail::check(cublasSgemmStridedBatched(context().blas(), oa, ob, m, n, k, &alpha, a, lda, stride_a, b, ldb, stride_b, &beta, c,
                                                   ldc, stride_c, count),
                         "cublasSgemmStridedBatched");
    else
      cuda_detail::check(cublasDgemmStridedBatched(context().blas(), oa, ob, m, n, k, &alpha, a, lda, stride_a, b, ldb, stride_b, &beta, c,
                                                   ldc, stride_c, count),
                         "cublasDgemmStridedBatched");
  }
};

}  // namespace ckpt::backend
