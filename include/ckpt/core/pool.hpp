// ckpt — the tape's tensor memory: a caching pool of backend buffers, bucketed by exact size.
//
// Why a pool and not a bump arena for tensors: checkpointing must free a segment's inside while
// keeping its boundary outputs, and backward frees each activation as soon as the sweep has
// passed it. Neither is last-in-first-out, so a stack arena would need copies. Buffers released
// here go back to a free list and are handed out again for the next tensor of the same size, so
// a training loop that repeats the same shapes allocates nothing after its first step.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/core/backend.hpp"

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <new>
#include <unordered_map>
#include <vector>

namespace ckpt {

/// Byte counters of a tape. `bytes` is what the tape holds now (values, adjoints and saved
/// extras such as normalisation statistics), `peak_bytes` its maximum since the last reset,
/// `reserved_bytes` what the pool holds from the backend including cached free buffers.
/// With policy::offload on a device backend, `host_bytes` / `host_peak_bytes` count the pinned
/// host memory that holds offloaded values (and `host_reserved_bytes` what the tape caches);
/// the other three count backend (device) memory only.
struct memory_stats {
  std::size_t bytes = 0;
  std::size_t peak_bytes = 0;
  std::size_t reserved_bytes = 0;
  std::size_t host_bytes = 0;
  std::size_t host_peak_bytes = 0;
  std::size_t host_reserved_bytes = 0;
};

/// Where a pool's buffers come from: a backend, or the pinned host memory it offloads into.
template <class A>
concept Allocator = requires(std::size_t bytes, void* p) {
  { A::alignment } -> std::convertible_to<std::size_t>;
  { A::allocate(bytes) } -> std::same_as<void*>;
  A::deallocate(p, bytes);
};

namespace detail {
/// The pinned host memory backend B offloads values into (policy::offload), as an allocator.
/// Backends that do not offload never allocate through it.
template <class B>
struct host_memory_of {
  static constexpr std::size_t alignment = 64;
  static void* allocate(std::size_t bytes) {
    if constexpr (B::offloads)
      return B::host_allocate(bytes);
    else
      return ::operator new(bytes);
  }
  static void deallocate(void* p, std::size_t) noexcept {
    if constexpr (B::offloads)
      B::host_deallocate(p);
    else
      ::operator delete(p);
  }
};
}  // namespace detail

template <Allocator B>
class buffer_pool {
 public:
  buffer_pool() = default;
  buffer_pool(const buffer_pool&) = delete;
  buffer_pool& operator=(const buffer_pool&) = delete;
  ~buffer_pool() { trim(); }

  static std::size_t rounded(std::size_t bytes) {
    return (bytes + B::alignment - 1) / B::alignment * B::alignment;
  }

  void* acquire(std::size_t bytes) {
    const std::size_t size = rounded(std::max<std::size_t>(bytes, 1));
    void* p = nullptr;
    auto& list = free_list(size);
    if (!list.empty()) {
      p = list.back();
      list.pop_back();
    } else {
      p = B::allocate(size);
      stats_.reserved_bytes += size;
    }
    stats_.bytes += size;
    stats_.peak_bytes = std::max(stats_.peak_bytes, stats_.bytes);
    return p;
  }

  void release(void* p, std::size_t bytes) noexcept {
    const std::size_t size = rounded(std::max<std::size_t>(bytes, 1));
    stats_.bytes -= size;
    try {
      free_list(size).push_back(p);
    } catch (...) {  // no room to cache it: give it back instead
      B::deallocate(p, size);
      stats_.reserved_bytes -= size;
    }
  }

  /// A buffer taken for the length of a scope (a pass's temporary the size of a tensor),
  /// counted like any other and given back when the scope ends, also by an exception. On a
  /// device backend the release only returns it to the pool: a later acquire reuses it in
  /// stream order, after the work queued on it.
  class lease {
   public:
    lease(buffer_pool& pool, std::size_t bytes) : pool_(pool), bytes_(bytes), p_(pool.acquire(bytes)) {}
    lease(const lease&) = delete;
    lease& operator=(const lease&) = delete;
    ~lease() { pool_.release(p_, bytes_); }
    template <class T>
    T* as() const {
      return static_cast<T*>(p_);
    }

   private:
    buffer_pool& pool_;
    std::size_t bytes_;
    void* p_;
  };

  /// Whether a free buffer of this size is cached (so that acquire would not allocate).
  bool cached(std::size_t bytes) const {
    const std::size_t size = rounded(std::max<std::size_t>(bytes, 1));
    if (size > small_limit) {
      const auto it = free_.find(size);
      return it != free_.end() && !it->second.empty();
    }
    const std::size_t k = size / B::alignment - 1;
    return k < small_.size() && !small_[k].empty();
  }

  /// Returns every cached free buffer to the backend.
  void trim() noexcept {
    auto drop = [this](std::size_t size, std::vector<void*>& list) {
      for (void* p : list) B::deallocate(p, size);
      stats_.reserved_bytes -= size * list.size();
      list.clear();
    };
    for (std::size_t k = 0; k < small_.size(); ++k) drop((k + 1) * B::alignment, small_[k]);
    for (auto& [size, list] : free_) drop(size, list);
  }

  const memory_stats& stats() const { return stats_; }
  void reset_peak() { stats_.peak_bytes = stats_.bytes; }

 private:
  // Sizes up to small_limit index a vector directly: a training step acquires and releases a
  // few buffers per op, and for small tensors a hash lookup each time was a tenth of the step.
  static constexpr std::size_t small_limit = 64 * 1024;

  std::vector<void*>& free_list(std::size_t size) {
    if (size > small_limit) return free_[size];
    const std::size_t k = size / B::alignment - 1;
    if (k >= small_.size()) small_.resize(k + 1);
    return small_[k];
  }

  std::vector<std::vector<void*>> small_;
  std::unordered_map<std::size_t, std::vector<void*>> free_;
  memory_stats stats_;
};

}  // namespace ckpt
