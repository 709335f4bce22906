// ckpt — what a backend must provide. The tape and its bookkeeping stay on the host; a backend
// owns only tensor memory and the kernels that touch it.
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
  B::gemm(false, false, 1, 1, 1, 1.0f, cf, 1, cf, 1, 0.0f, f, 1);
};

}  // namespace ckpt
