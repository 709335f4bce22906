// ckpt — the CUDA backend's process-wide state: the compute stream every kernel and product
// runs on, the cuBLAS handle bound to it, the reductions' scratch, and counters. Errors from
// the CUDA runtime and cuBLAS become ckpt::cuda_error naming the call and the error string.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/core/error.hpp"

#if !defined(__CUDACC__)
#error "ckpt/backend/cuda/ is compiled by nvcc only: include <ckpt/cuda.hpp> from a .cu file"
#endif

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace ckpt {

/// A CUDA runtime or cuBLAS call that failed: the call and the error string.
class cuda_error : public error {
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

class context {
 public:
  context() {
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags(compute)");
    check(cudaStreamCreateWithFlags(&copy_stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags(copy)");
    check(cublasCreate(&blas_), "cublasCreate");
    check(cublasSetStream(blas_, stream_), "cublasSetStream");
    check(cudaMalloc(&partials_, sizeof(double) * reduce_blocks), "cudaMalloc(reduction scratch)");
  }
  context(const context&) = delete;
  context& operator=(const context&) = delete;
  ~context() {  // at exit the driver may be gone already: errors are ignored here
    for (staging_buffer& b : staging_) {
      if (b.copied) cudaEventDestroy(b.copied);
      cudaFreeHost(b.data);
    }
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
    cudaFree(scratch_);
    cudaFree(partials_);
    cublasDestroy(blas_);
    cudaStreamDestroy(copy_stream_);
    cudaStreamDestroy(stream_);
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
    try {
      events_.push_back(e);
    } catch (...) {
      cudaEventDestroy(e);
    }
  }

  /// Host to device in stream order, without waiting for the stream: the values are copied
  /// into a pinned staging buffer (so the caller may reuse or free `host` at once) and the
  /// device copy is queued from there; the buffer is reused once the event recorded after its
  /// copy has passed. Staging buffers hold at most staging_limit() bytes in all: an upload
  /// larger than that waits for its copy instead (and a run of uploads that would pass the
  /// limit first waits for the stream, which frees every buffer).
  void upload(void* dst, const void* host, std::size_t bytes) {
    if (bytes > staging_limit_) {
      check(cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync(host to device)");
      check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize(upload)");
      ++count_.waited_uploads;
      return;
    }
    staging_buffer& b = staging_for(bytes);
    std::memcpy(b.data, host, bytes);
    check(cudaMemcpyAsync(dst, b.data, bytes, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync(host to device, staged)");
    cudaEvent_t e = take_event();
    if (const cudaError_t r = cudaEventRecord(e, stream_); r != cudaSuccess) {
      give_event(e);
      check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize(upload)");  // the buffer is free again once this returns
      check(r, "cudaEventRecord(upload)");
    }
    b.copied = e;
    ++count_.staged_uploads;
  }
  std::size_t staging_limit() const { return staging_limit_; }
  /// Pinned bytes upload staging may hold (256 MiB unless set); buffers beyond it are freed.
  void set_staging_limit(std::size_t bytes) {
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize(staging limit)");
    all_staging_free();
    staging_limit_ = bytes;
    release_staging([&] { return staged_bytes_ > staging_limit_; });
  }
  std::size_t staged_bytes() const { return staged_bytes_; }

 private:
  struct staging_buffer {
    void* data = nullptr;
    std::size_t bytes = 0;
    cudaEvent_t copied = nullptr;  ///< recorded after the copy reading it; null when free
  };

  /// The smallest free staging buffer of at least `bytes` (those whose copies have passed are
  /// free again), or a new one; when a new one would pass the limit, the host waits for the
  /// stream first (which frees every buffer) and, if none fits still, frees buffers, smallest
  /// first, until the new one fits.
  staging_buffer& staging_for(std::size_t bytes) {
    if (staging_buffer* b = free_staging(bytes)) return *b;
    const std::size_t size = (bytes + granule - 1) / granule * granule;
    if (staged_bytes_ + size > staging_limit_) {
      check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize(upload staging)");
      all_staging_free();
      if (staging_buffer* b = free_staging(bytes)) return *b;
      release_staging([&] { return staged_bytes_ + size > staging_limit_; });
    }
    staging_.reserve(staging_.size() + 1);  // so that push_back cannot throw after the allocation
    staging_buffer fresh;
    check(cudaMallocHost(&fresh.data, size), "cudaMallocHost(upload staging)");
    ++count_.host_allocations;
    fresh.bytes = size;
    staged_bytes_ += size;
    staging_.push_back(fresh);
    return staging_.back();
  }
  /// The smallest free staging buffer of at least `bytes`, or null; buffers whose copies have
  /// passed become free on the way.
  staging_buffer* free_staging(std::size_t bytes) {
    staging_buffer* best = nullptr;
    for (staging_buffer& b : staging_) {
      if (b.copied) {
        const cudaError_t r = cudaEventQuery(b.copied);
        if (r == cudaErrorNotReady) {
          (void)cudaGetLastError();  // "not yet" is no error to keep
          continue;
        }
        check(r, "cudaEventQuery(upload)");
        give_event(std::exchange(b.copied, nullptr));
      }
      if (b.bytes >= bytes && (!best || b.bytes < best->bytes)) best = &b;
    }
    return best;
  }
  /// After a stream synchronisation: every staging buffer's copy has passed.
  void all_staging_free() noexcept {
    for (staging_buffer& b : staging_)
      if (b.copied) give_event(std::exchange(b.copied, nullptr));
  }
  /// Frees free staging buffers, smallest first, while too_much() holds.
  template <class TooMuch>
  void release_staging(TooMuch too_much) {
    std::sort(staging_.begin(), staging_.end(), [](const staging_buffer& a, const staging_buffer& b) { return a.bytes < b.bytes; });
    for (auto it = staging_.begin(); it != staging_.end() && too_much();) {
      if (it->copied) {
        ++it;
        continue;
      }
      check(cudaFreeHost(it->data), "cudaFreeHost(upload staging)");
      staged_bytes_ -= it->bytes;
      it = staging_.erase(it);
    }
  }
  static constexpr std::size_t granule = std::size_t(64) << 10;

  cudaStream_t stream_ = nullptr;
  cudaStream_t copy_stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  double* partials_ = nullptr;
  void* scratch_ = nullptr;
  std::size_t scratch_bytes_ = 0;
  counters count_;
  std::vector<cudaEvent_t> events_;
  std::vector<staging_buffer> staging_;
  std::size_t staged_bytes_ = 0;
  std::size_t staging_limit_ = std::size_t(256) << 20;
  bool tf32_ = false;
};

/// The process's context on the current device, made on first use.
inline context& ctx() {
  static context c;
  return c;
}

}  // namespace backend::cuda_detail
}  // namespace ckpt
