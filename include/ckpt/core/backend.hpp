// ckpt — what a backend must provide. The tape and its bookkeeping stay on the host; a backend
// owns only tensor memory and the kernels that touch it: allocation, copies (within the
// backend, and to and from the host), products (gemm, gemm_batched), and the loop primitives
// every op's forward and reverse are written with (for_each, assign, assign_2d, for_each_2d,
// for_each_column, add_row_sums, add_broadcast_sums, sum, sum_2d, and scratch for passes that
// hand partial results on; see backend/cpu/cpu.hpp for their contracts). Loop iterations may
// run at the same time (they do on CUDA), so on every backend each op gives every element one
// writer: no two iterations add into the same element, and sums over many elements go through
// the reduction primitives. `offloads` says whether the backend's memory is not host memory and
// it can move values to pinned host memory on a side stream (copy_to_host_async,
// copy_to_device_async, event_done, wait_event, finish_event, release_event, host_allocate,
// host_deallocate; see backend/cuda/cuda.cuh).
#pragma once
#include "ckpt/config.hpp"

#include <concepts>
#include <cstddef>

namespace ckpt {

template <class B>
concept Backend = requires(std::size_t bytes, void* p, float* f, const float* cf, long n) {
  { B::name } -> std::convertible_to<const char*>;
  { B::allocate(bytes) } -> std::same_as<void*>;
  B::deallocate(p, bytes);
  B::fill_zero(f, n);
  B::copy(f, cf, n);
  B::to_host(f, cf, n);
  B::from_host(f, cf, n);
  B::synchronize();
  { B::offloads } -> std::convertible_to<bool>;
  B::gemm(false, false, 1, 1, 1, 1.0f, cf, 1, cf, 1, 0.0f, f, 1);
  B::gemm_batched(false, false, 1, 1, 1, 1.0f, cf, 1, n, cf, 1, n, 0.0f, f, 1, n, 1);
};

}  // namespace ckpt
