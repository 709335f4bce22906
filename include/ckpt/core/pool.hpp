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
#include <cstddef>
#include <unordered_map>
#include <vector>

namespace ckpt {

/// Byte counters of a tape. `bytes` is what the tape holds now (values, adjoints and saved
/// extras such as normalisation statistics), `peak_bytes` its maximum since the last reset,
/// `reserved_bytes` what the pool holds from the backend including cached free buffers.
struct memory_stats {
  std::size_t bytes = 0;
  std::size_t peak_bytes = 0;
  std::size_t reserved_bytes = 0;
};

template <Backend B>
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
    auto& list = free_[size];
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
      free_[size].push_back(p);
    } catch (...) {  // no room to cache it: give it back instead
      B::deallocate(p, size);
      stats_.reserved_bytes -= size;
    }
  }

  /// Returns every cached free buffer to the backend.
  void trim() noexcept {
    for (auto& [size, list] : free_) {
      for (void* p : list) B::deallocate(p, size);
      stats_.reserved_bytes -= size * list.size();
      list.clear();
    }
  }

  const memory_stats& stats() const { return stats_; }
  void reset_peak() { stats_.peak_bytes = stats_.bytes; }

 private:
  std::unordered_map<std::size_t, std::vector<void*>> free_;
  memory_stats stats_;
};

}  // namespace ckpt
