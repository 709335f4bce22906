// ckpt — staging buffers for uploads that must not wait for the device.
//
// A backend whose memory is not host memory uploads in stream order, but its caller may free or
// reuse the host buffer as soon as the upload returns (tape.constant(batch) passes a temporary),
// and an asynchronous copy straight from pageable memory has no documented point at which it has
// finished reading. So an upload copies the values into a pinned staging buffer, queues the
// device copy from there and returns; the buffer goes back to a pool (core/pool.hpp, the cache
// the tape's offload uses for its pinned buffers) once the event recorded after its copy has
// passed. A training loop thereby reuses the same few buffers and never waits for its uploads.
//
// The device side is a template parameter (backend/cuda/context.cuh; a fake with controllable
// copy completion in tests/core/test_staging.cpp), so the bookkeeping runs in the CPU suite.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/core/pool.hpp"

#include <cstddef>
#include <cstring>
#include <deque>
#include <utility>

namespace ckpt::detail {

/// Staging buffers from the allocator Pinned (pinned host memory), over a Device with:
///   Event copy_from_staging(void* dst, const void* staged, std::size_t)
///                                   queues the device copy and returns an event recorded after
///                                   it; if it throws, it queued nothing
///   bool passed(Event)              whether that copy is done (never blocks)
///   void release(Event) noexcept    gives the event back
///   void wait_all()                 the host waits for every queued copy
///   void copy_and_wait(void* dst, const void* host, std::size_t)
///                                   an upload that waits for its copy (no staging)
/// Copies pass in the order they were queued (one stream), so the buffers in flight are a queue.
/// Buffers hold at most limit() bytes in all: an upload whose buffer (its size rounded up to the
/// granule) would be larger than that waits for its copy instead, and one that would pass the
/// limit with a new buffer first waits for every queued copy (which frees every buffer) and then,
/// if none of its size is free, gives every cached buffer back before taking a new one.
template <class Device, Allocator Pinned>
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
    void* staged = take(size);
    try {
      std::memcpy(staged, host, bytes);
      in_flight_.push_back({staged, size, event{}});  // room first: once the copy is queued, nothing may throw
      in_flight_.back().copied = device_.copy_from_staging(dst, staged, bytes);
    } catch (...) {
      if (!in_flight_.empty() && in_flight_.back().data == staged) in_flight_.pop_back();
      pool_.release(staged, size);  // no copy reads it
      throw;
    }
  }

  std::size_t limit() const { return limit_; }
  /// Waits for every queued copy; then, if more than `bytes` are held, gives the cached buffers back.
  void set_limit(std::size_t bytes) {
    device_.wait_all();
    all_passed();
    limit_ = bytes;
    if (held_bytes() > limit_) pool_.trim();
  }
  /// Pinned bytes held now, free or in flight.
  std::size_t held_bytes() const { return pool_.stats().reserved_bytes; }
  std::size_t in_flight() const { return in_flight_.size(); }

  /// Gives every buffer back without waiting (the owner's teardown, after its device is idle).
  void clear() noexcept {
    for (const staged_copy& c : in_flight_) {
      device_.release(c.copied);
      pool_.release(c.data, c.bytes);
    }
    in_flight_.clear();
    pool_.trim();
  }

 private:
  struct staged_copy {
    void* data;
    std::size_t bytes;
    event copied;
  };

  /// A buffer of `size` bytes that no queued copy reads.
  void* take(std::size_t size) {
    while (!in_flight_.empty() && device_.passed(in_flight_.front().copied)) pass_front();
    if (!pool_.cached(size) && held_bytes() + size > limit_) {
      device_.wait_all();
      all_passed();
      if (!pool_.cached(size)) pool_.trim();
    }
    return pool_.acquire(size);
  }
  void pass_front() noexcept {
    device_.release(in_flight_.front().copied);
    pool_.release(in_flight_.front().data, in_flight_.front().bytes);
    in_flight_.pop_front();
  }
  /// After wait_all(): every copy has passed.
  void all_passed() noexcept {
    while (!in_flight_.empty()) pass_front();
  }

  Device device_;
  buffer_pool<Pinned> pool_;
  std::deque<staged_copy> in_flight_;
  std::size_t limit_;
};

}  // namespace ckpt::detail
