// ckpt — the CUDA backend's process-wide state: the compute stream every kernel and product
// runs on, the cuBLAS handle bound to it, the reductions' scratch, and counters. Errors from
// the CUDA runtime and cuBLAS become ckpt::cuda_error naming the call and the error string.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/core/error.hpp"
#include "ckpt/detail/staging.hpp"

#if !defined(__CUDACC__)
#error "ckpt/backend/cuda/ is compiled by nvcc only: include <ckpt/cuda.hpp> from a .cu file"
#endif

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <string>
#include <thread>
#include <vector>

namespace ckpt {

/// A CUDA runtime or cuBLAS call that failed: the call and the error string.
class cuda_error : public error {
  using error::error;
};

/// The CUDA backend called from a host thread that does not hold it (see context::adopt_this_thread).
class cuda_thread_error : public error {
  using error::error;
};

namespace backend::cuda_detail {

inline void check(cudaError_t e, const char* call) {
  if (e != cudaSuccess) {
    // Clear the runtime's last error too: a caught failure must not reappear at the next
    // kernel launch's check (check_launch reads cudaGetLastError).
    (void)cudaGetLastError();
    throw cuda_error(ckpt::detail::cat(call, ": ", cudaGetErrorString(e), " (", cudaGetErrorName(e), ")"));
  }
}
inline void check(cublasStatus_t s, const char* call) {
  if (s != CUBLAS_STATUS_SUCCESS) throw cuda_error(ckpt::detail::cat(call, ": ", cublasGetStatusString(s), " (cuBLAS status ", static_cast<int>(s), ")"));
}
/// After a kernel launch: a bad configuration shows here, a fault at the next synchronisation.
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

/// Blocks of the reductions' first pass: fixed, so that a sum adds in the same order on every
/// device and every run (no atomics anywhere).
inline constexpr int reduce_blocks = 256;
inline constexpr int block_threads = 256;

struct counters {
  std::size_t device_allocations = 0;  ///< cudaMalloc calls (the tape's pool caches buffers)
  std::size_t device_frees = 0;
  std::size_t host_allocations = 0;    ///< pinned host buffers (offload, upload staging)
  std::size_t staged_uploads = 0;      ///< uploads that went through a staging buffer, not waiting
  std::size_t waited_uploads = 0;      ///< uploads larger than the staging limit, which waited
};

class context;

/// Pinned host memory, as an allocator (core/pool.hpp): offload's buffers (cuda::host_allocate)
/// and upload staging's come from here.
struct pinned_memory {
  static constexpr std::size_t alignment = 64;
  static void* allocate(std::size_t bytes);
  static void deallocate(void* p, std::size_t) noexcept { cudaFreeHost(p); }
};

/// Upload staging's device side (see detail/staging.hpp): copies on the compute stream with an
/// event after each. (Its buffers are pinned_memory's, cached in a pool.)
struct staging_device {
  context* c;
  cudaEvent_t copy_from_staging(void* dst, const void* staged, std::size_t bytes);
  bool passed(cudaEvent_t e);
  void release(cudaEvent_t e) noexcept;
  void wait_all();
  void copy_and_wait(void* dst, const void* host, std::size_t bytes);
};

class context {
 public:
  using upload_staging = ckpt::detail::upload_staging<staging_device, pinned_memory>;

  context() {
    check(cudaGetDevice(&device_), "cudaGetDevice");
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags(compute)");
    check(cudaStreamCreateWithFlags(&copy_stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags(copy)");
    check(cublasCreate(&blas_), "cublasCreate");
    check(cublasSetStream(blas_, stream_), "cublasSetStream");
    check(cudaMalloc(&partials_, sizeof(double) * reduce_blocks), "cudaMalloc(reduction scratch)");
  }
  context(const context&) = delete;
  context& operator=(const context&) = delete;
  ~context() {  // at exit the driver may be gone already: errors are ignored here
    cudaStreamSynchronize(stream_);  // staged copies may still read the buffers freed next
    staging_.clear();                 // its events go back to the cache, destroyed next
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
    cudaFree(scratch_);
    cudaFree(partials_);
    cublasDestroy(blas_);
    cudaStreamDestroy(copy_stream_);
    cudaStreamDestroy(stream_);
  }

  /// The context serves one host thread at a time: its compute stream orders every kernel, and
  /// the reductions' scratch and partial sums are reused call after call, so two threads queueing
  /// at once would interleave their uses of them. The thread that made it holds it; another one
  /// takes it over with adopt_this_thread() once the first is done with it (work both queued
  /// stays ordered: it is one stream), and until then gets cuda_thread_error. (A thread that
  /// ends while holding it should hand it over: the id of an ended thread may be given to a new
  /// one, which would then pass for the holder.)
  bool held_here() const noexcept { return owner_.load(std::memory_order_relaxed) == std::this_thread::get_id(); }
  void adopt_this_thread() {
    check(cudaSetDevice(device_), "cudaSetDevice(the context's device)");
    owner_.store(std::this_thread::get_id(), std::memory_order_relaxed);
  }

  cudaStream_t stream() const { return stream_; }
  cudaStream_t copy_stream() const { return copy_stream_; }
  cublasHandle_t blas() const { return blas_; }
  double* partials() const { return partials_; }
  counters& count() { return count_; }

  /// A device buffer of at least `bytes` for partial sums, reused by every call (stream order
  /// keeps its users apart); it only grows, so a steady state allocates nothing.
  void* scratch(std::size_t bytes) {
    if (bytes > scratch_bytes_) {
      if (scratch_) check(cudaFree(scratch_), "cudaFree(scratch)");
      scratch_ = nullptr;
      scratch_bytes_ = 0;
      check(cudaMalloc(&scratch_, bytes), "cudaMalloc(scratch)");
      ++count_.device_allocations;
      scratch_bytes_ = bytes;
    }
    return scratch_;
  }

  /// TF32 tensor-core products for float (about 10 mantissa bits in the products): off by
  /// default, so that float results match the CPU backend to 1e-5.
  void set_tf32(bool on) {
    check(cublasSetMathMode(blas_, on ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
    tf32_ = on;
  }
  bool tf32() const { return tf32_; }

  /// Events for ordering the copy stream against the compute stream, reused.
  cudaEvent_t take_event() {
    if (!events_.empty()) {
      cudaEvent_t e = events_.back();
      events_.pop_back();
      return e;
    }
    cudaEvent_t e = nullptr;
    check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    return e;
  }
  void give_event(cudaEvent_t e) noexcept {
    if (!held_here()) {  // from another thread (a tape released there): not into the holder's cache
      cudaEventDestroy(e);
      return;
    }
    try {
      events_.push_back(e);
    } catch (...) {
      cudaEventDestroy(e);
    }
  }

  /// Host to device in stream order, without waiting for the stream: through a pinned staging
  /// buffer (detail/staging.hpp), so the caller may reuse `host` at once. Staging holds at most
  /// staging().limit() bytes (256 MiB unless set): a larger upload waits for its copy.
  void upload(void* dst, const void* host, std::size_t bytes) { staging_.upload(dst, host, bytes); }
  upload_staging& staging() { return staging_; }

 private:
  cudaStream_t stream_ = nullptr;
  cudaStream_t copy_stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  double* partials_ = nullptr;
  void* scratch_ = nullptr;
  std::size_t scratch_bytes_ = 0;
  counters count_;
  std::vector<cudaEvent_t> events_;
  bool tf32_ = false;
  int device_ = 0;
  std::atomic<std::thread::id> owner_{std::this_thread::get_id()};
  upload_staging staging_{staging_device{this}, std::size_t(256) << 20};
};

inline cudaEvent_t staging_device::copy_from_staging(void* dst, const void* staged, std::size_t bytes) {
  cudaEvent_t e = c->take_event();  // before the copy: once it is queued, nothing may throw before the event
  if (const cudaError_t r = cudaMemcpyAsync(dst, staged, bytes, cudaMemcpyHostToDevice, c->stream()); r != cudaSuccess) {
    c->give_event(e);
    check(r, "cudaMemcpyAsync(host to device, staged)");
  }
  if (const cudaError_t r = cudaEventRecord(e, c->stream()); r != cudaSuccess) {
    c->give_event(e);
    check(cudaStreamSynchronize(c->stream()), "cudaStreamSynchronize(upload)");  // the buffer is free again
    check(r, "cudaEventRecord(upload)");
  }
  ++c->count().staged_uploads;
  return e;
}
inline bool staging_device::passed(cudaEvent_t e) {
  const cudaError_t r = cudaEventQuery(e);
  if (r == cudaErrorNotReady) {
    (void)cudaGetLastError();  // "not yet" is no error to keep
    return false;
  }
  check(r, "cudaEventQuery(upload)");
  return true;
}
inline void staging_device::release(cudaEvent_t e) noexcept { c->give_event(e); }
inline void staging_device::wait_all() { check(cudaStreamSynchronize(c->stream()), "cudaStreamSynchronize(upload staging)"); }
inline void staging_device::copy_and_wait(void* dst, const void* host, std::size_t bytes) {
  check(cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, c->stream()), "cudaMemcpyAsync(host to device)");
  check(cudaStreamSynchronize(c->stream()), "cudaStreamSynchronize(upload)");
  ++c->count().waited_uploads;
}

/// The process's context on the current device, made on first use, from any thread: for what
/// must not throw (giving memory and events back).
inline context& any_thread_ctx() {
  static context c;
  return c;
}
/// The context, from the thread that holds it.
inline context& ctx() {
  context& c = any_thread_ctx();
  if (!c.held_here()) [[unlikely]]
    throw cuda_thread_error(
        "backend::cuda: called from a host thread that does not hold the CUDA context (the thread that first used it, or "
        "the last to call backend::cuda::adopt_this_thread()); one thread at a time drives its stream and scratch: call "
        "adopt_this_thread() in this thread once the other is done with the backend");
  return c;
}

inline void* pinned_memory::allocate(std::size_t bytes) {
  auto& c = ctx();  // first: from a thread that does not hold it, nothing is allocated
  void* p = nullptr;
  check(cudaMallocHost(&p, bytes), "cudaMallocHost");
  ++c.count().host_allocations;
  return p;
}

}  // namespace backend::cuda_detail
}  // namespace ckpt
