// ckpt — staging buffers for uploads that must not wait for the device.
//
// A backend whose memory is not host memory uploads in stream order, but its caller may free or
// reuse the host buffer as soon as the upload returns (tape.constant(batch) passes a temporary),
// and an asynchronous copy straight from pageable memory has no documented point at which it has
// finished reading. So an upload copies the values into a pinned staging buffer, queues the
// device copy from there and returns; the buffer is reused once the event recorded after its copy
// has passed. A training loop thereby reuses the same few buffers and never waits for its uploads.
//
// The device side is a template parameter (backend/cuda/context.cuh; a fake with controllable
// copy completion in tests/core/test_staging.cpp), so the bookkeeping runs in the CPU suite.
#pragma once
#include "ckpt/config.hpp"

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <utility>
#include <vector>

namespace ckpt::detail {

/// Staging buffers over a Device with these members:
///   void* allocate_staging(std::size_t)            pinned host memory
///   void free_staging(void*) noexcept
///   Event copy_from_staging(void* dst, const void* staged, std::size_t)
///                                                  queues the device copy and returns an event
///                                                  recorded after it; if it throws, it queued nothing
///   bool passed(Event)                             whether that copy is done (never blocks)
///   void release(Event) noexcept                   gives the event back
///   void wait_all()                                the host waits for every queued copy
///   void copy_and_wait(void* dst, const void* host, std::size_t)
///                                                  an upload that waits for its copy (no staging)
/// Buffers hold at most limit() bytes in all: an upload whose buffer (its size rounded up to the
/// granule) would be larger than that waits for its copy instead, and
/// one that would pass the limit with a new buffer first waits for every queued copy (which frees
/// every buffer) and then, if none fits, frees buffers, smallest first, until the new one fits.
template <class Device>
class upload_staging {
 public:
  using event = decltype(std::declval<Device&>().copy_from_staging(nullptr, nullptr, std::size_t{}));
  /// Buffers are sized in multiples of this, so that uploads of nearby sizes share them.
  static constexpr std::size_t granule = std::size_t(64) << 10;

  upload_staging(Device device, std::size_t limit) : device_(std::move(device)), limit_(limit) {}
  upload_staging(const upload_staging&) = delete;
  upload_staging& operator=(const upload_staging&) = delete;
  ~upload_staging() { clear(); }

  /// Host to device in the device's order; `host` may be reused as soon as this returns.
  void upload(void* dst, const void* host, std::size_t bytes) {
    if (bytes == 0) return;
    const std::size_t size = (bytes + granule - 1) / granule * granule;
    if (size > limit_) {
      device_.copy_and_wait(dst, host, bytes);
      return;
    }
    buffer& b = buffer_for(bytes, size);
    std::memcpy(b.data, host, bytes);
    // A device that throws here has queued no copy (so b stays free).
    b.copied = device_.copy_from_staging(dst, b.data, bytes);
    b.in_flight = true;
  }

  std::size_t limit() const { return limit_; }
  /// Waits for every queued copy, then frees buffers, smallest first, until at most `bytes` are held.
  void set_limit(std::size_t bytes) {
    device_.wait_all();
    all_passed();
    limit_ = bytes;
    release_while([&] { return held_ > limit_; });
  }
  /// Pinned bytes held now, free or in flight.
  std::size_t held_bytes() const { return held_; }
  std::size_t buffers() const { return buffers_.size(); }

  /// Frees every buffer without waiting (the owner's teardown: its device is going away).
  void clear() noexcept {
    for (buffer& b : buffers_) {
      if (b.in_flight) device_.release(b.copied);
      device_.free_staging(b.data);
    }
    buffers_.clear();
    held_ = 0;
  }

 private:
  struct buffer {
    void* data = nullptr;
    std::size_t bytes = 0;
    event copied{};
    bool in_flight = false;  ///< a copy reads it; it is free once `copied` has passed
  };

  /// A free buffer of at least `bytes`, or a new one of `size` (bytes rounded up to the granule).
  buffer& buffer_for(std::size_t bytes, std::size_t size) {
    if (buffer* b = smallest_free(bytes)) return *b;
    if (held_ + size > limit_) {
      device_.wait_all();
      all_passed();
      if (buffer* b = smallest_free(bytes)) return *b;
      release_while([&] { return held_ + size > limit_; });
    }
    buffers_.reserve(buffers_.size() + 1);  // so that push_back cannot throw after the allocation
    buffer fresh;
    fresh.data = device_.allocate_staging(size);
    fresh.bytes = size;
    held_ += size;
    buffers_.push_back(fresh);
    return buffers_.back();
  }

  /// The smallest free buffer of at least `bytes`, or null; buffers whose copies have passed
  /// become free on the way.
  buffer* smallest_free(std::size_t bytes) {
    buffer* best = nullptr;
    for (buffer& b : buffers_) {
      if (b.in_flight) {
        if (!device_.passed(b.copied)) continue;
        b.in_flight = false;
        device_.release(b.copied);
      }
      if (b.bytes >= bytes && (!best || b.bytes < best->bytes)) best = &b;
    }
    return best;
  }

  /// After wait_all(): every copy has passed.
  void all_passed() noexcept {
    for (buffer& b : buffers_)
      if (b.in_flight) {
        b.in_flight = false;
        device_.release(b.copied);
      }
  }

  /// Frees free buffers, smallest first, while too_much() holds.
  template <class TooMuch>
  void release_while(TooMuch too_much) {
    std::sort(buffers_.begin(), buffers_.end(), [](const buffer& a, const buffer& b) { return a.bytes < b.bytes; });
    for (auto it = buffers_.begin(); it != buffers_.end() && too_much();) {
      if (it->in_flight) {
        ++it;
        continue;
      }
      device_.free_staging(it->data);
      held_ -= it->bytes;
      it = buffers_.erase(it);
    }
  }

  Device device_;
  std::vector<buffer> buffers_;
  std::size_t held_ = 0;
  std::size_t limit_;
};

}  // namespace ckpt::detail
