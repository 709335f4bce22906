// Upload staging (detail/staging.hpp) against a fake device whose copies complete only when the
// test says, and read their staging buffer only then: a buffer handed out again while its copy
// is still queued would show as a wrong value at the destination.
#include <ckpt/detail/staging.hpp>

#include <doctest/doctest.h>

#include <cstddef>
#include <cstring>
#include <new>
#include <numeric>
#include <stdexcept>
#include <utility>
#include <vector>

namespace {

struct fake_device_state {
  struct copy {
    void* dst;
    const void* src;
    std::size_t bytes;
  };
  std::vector<copy> queued;  ///< copies in queue order; copy k has event k
  int completed = 0;         ///< copies 0 .. completed - 1 are done
  int released = 0;
  std::size_t allocations = 0, frees = 0, staged = 0, waited = 0, waits_for_all = 0;
  bool fail_next_copy = false;  ///< the next copy_from_staging throws, having queued nothing

  /// Completes the queued copies up to (not including) copy `until`, in order.
  void complete(int until) {
    for (; completed < until; ++completed) {
      const copy& c = queued[static_cast<std::size_t>(completed)];
      std::memcpy(c.dst, c.src, c.bytes);
    }
  }
  void complete_all() { complete(static_cast<int>(queued.size())); }
  int in_flight() const { return static_cast<int>(queued.size()) - completed; }
};

/// The pinned memory, as the pool's allocator (static, as a backend's is), counting into the
/// state of the test that runs.
struct fake_pinned {
  static inline fake_device_state* s = nullptr;
  static constexpr std::size_t alignment = 64;
  static void* allocate(std::size_t bytes) {
    ++s->allocations;
    return ::operator new(bytes);
  }
  static void deallocate(void* p, std::size_t) noexcept {
    ++s->frees;
    ::operator delete(p);
  }
};

struct fake_device {
  fake_device_state* s;
  int copy_from_staging(void* dst, const void* staged, std::size_t bytes) {
    if (std::exchange(s->fail_next_copy, false)) throw std::runtime_error("copy refused");
    s->queued.push_back({dst, staged, bytes});
    ++s->staged;
    return static_cast<int>(s->queued.size()) - 1;
  }
  bool passed(int e) const { return e < s->completed; }
  void release(int) noexcept { ++s->released; }
  void wait_all() {
    ++s->waits_for_all;
    s->complete_all();
  }
  void copy_and_wait(void* dst, const void* host, std::size_t bytes) {
    s->complete_all();  // stream order: what is queued goes first
    std::memcpy(dst, host, bytes);
    ++s->waited;
  }
};

using fake_staging = ckpt::detail::upload_staging<fake_device, fake_pinned>;
/// The device side over `d`, whose pinned memory is counted in `d` too.
fake_device attached(fake_device_state& d) {
  fake_pinned::s = &d;
  return fake_device{&d};
}
/// Staging over a fake device whose state `d` the test reads.
struct staging : fake_staging {
  staging(fake_device_state& d, std::size_t limit) : fake_staging(attached(d), limit) {}
};
constexpr std::size_t granule = fake_staging::granule;

std::vector<int> iota_from(int first, std::size_t n) {
  std::vector<int> v(n);
  std::iota(v.begin(), v.end(), first);
  return v;
}

}  // namespace

TEST_CASE("an upload is staged: the caller may overwrite its buffer at once, and the copy delivers the values it had") {
  fake_device_state d;
  staging st(d, 16 * granule);
  std::vector<int> host = iota_from(7, 1000), dst(1000, -1);
  st.upload(dst.data(), host.data(), sizeof(int) * host.size());
  std::fill(host.begin(), host.end(), 0);  // the caller reuses its buffer before the copy runs
  CHECK(d.in_flight() == 1);
  CHECK(d.waits_for_all == 0);
  d.complete_all();
  CHECK(dst == iota_from(7, 1000));
  CHECK(d.staged == 1);
  CHECK(d.waited == 0);
  CHECK(st.held_bytes() == granule);  // 4000 bytes take one granule
}

TEST_CASE("a staging buffer is handed out again only once its copy has passed") {
  fake_device_state d;
  staging st(d, 16 * granule);
  const std::size_t n = 1000;
  std::vector<int> a(n, -1), b(n, -1), c(n, -1), e(n, -1);
  std::vector<int> host = iota_from(1, n);
  st.upload(a.data(), host.data(), sizeof(int) * n);
  host = iota_from(2, n);
  st.upload(b.data(), host.data(), sizeof(int) * n);  // a's copy is still queued: a second buffer
  CHECK(d.allocations == 2);
  d.complete(1);  // a's copy passes, b's does not
  host = iota_from(3, n);
  st.upload(c.data(), host.data(), sizeof(int) * n);  // takes a's buffer
  CHECK(d.allocations == 2);
  CHECK(d.released == 1);
  host = iota_from(4, n);
  st.upload(e.data(), host.data(), sizeof(int) * n);  // b and c still queued: a third
  CHECK(d.allocations == 3);
  d.complete_all();
  CHECK(a == iota_from(1, n));
  CHECK(b == iota_from(2, n));
  CHECK(c == iota_from(3, n));
  CHECK(e == iota_from(4, n));
  CHECK(d.waits_for_all == 0);
}

TEST_CASE("a free buffer is reused for uploads of its size rounded up to the granule") {
  fake_device_state d;
  staging st(d, 64 * granule);
  std::vector<char> host(3 * granule, 'x'), dst(3 * granule);
  st.upload(dst.data(), host.data(), 3 * granule);  // a three-granule buffer
  st.upload(dst.data(), host.data(), 10);           // a one-granule buffer
  d.complete_all();
  st.upload(dst.data(), host.data(), 100);  // 100 bytes: the one-granule buffer
  CHECK(d.allocations == 2);
  st.upload(dst.data(), host.data(), 200);  // it is queued, the free one is of another size: a new one
  CHECK(d.allocations == 3);
  st.upload(dst.data(), host.data(), 2 * granule + 1);  // three granules: the first buffer
  CHECK(d.allocations == 3);
  CHECK(st.held_bytes() == 5 * granule);
  CHECK(d.waits_for_all == 0);
}

TEST_CASE("staging stays within its limit: past it, an upload waits for every queued copy once and reuses a buffer") {
  fake_device_state d;
  staging st(d, 2 * granule);
  const std::size_t n = granule / sizeof(int);  // one granule each
  std::vector<int> x(n, -1), y(n, -1), z(n, -1);
  std::vector<int> host = iota_from(10, n);
  st.upload(x.data(), host.data(), sizeof(int) * n);
  host = iota_from(20, n);
  st.upload(y.data(), host.data(), sizeof(int) * n);
  CHECK(d.waits_for_all == 0);
  host = iota_from(30, n);
  st.upload(z.data(), host.data(), sizeof(int) * n);  // both buffers queued, no room for a third
  CHECK(d.waits_for_all == 1);
  CHECK(d.allocations == 2);
  CHECK(st.held_bytes() <= st.limit());
  d.complete_all();
  CHECK(x == iota_from(10, n));
  CHECK(y == iota_from(20, n));
  CHECK(z == iota_from(30, n));
}

TEST_CASE("past the limit with no free buffer of the size, the cached ones are given back for a new one") {
  fake_device_state d;
  staging st(d, 3 * granule);
  std::vector<char> host(3 * granule, 'y'), dst(3 * granule);
  st.upload(dst.data(), host.data(), 10);
  st.upload(dst.data(), host.data(), 10);
  CHECK(st.held_bytes() == 2 * granule);
  st.upload(dst.data(), host.data(), 2 * granule);  // 2 + 2 > 3: wait, give both back, take two granules
  CHECK(d.waits_for_all == 1);
  CHECK(d.frees == 2);
  CHECK(st.held_bytes() == 2 * granule);
  d.complete_all();
  CHECK(std::vector<char>(dst.begin(), dst.begin() + 2 * static_cast<long>(granule)) == std::vector<char>(2 * granule, 'y'));
}

TEST_CASE("past the limit, the wait frees a buffer of the size, which is reused with nothing given back") {
  fake_device_state d;
  staging st(d, 3 * granule);
  std::vector<char> host(2 * granule, 'w'), dst(2 * granule);
  st.upload(dst.data(), host.data(), granule);
  d.complete_all();
  st.upload(dst.data(), host.data(), 2 * granule);
  CHECK(st.held_bytes() == 3 * granule);
  st.upload(dst.data(), host.data(), 2 * granule);  // the two-granule buffer is queued: 3 + 2 > 3
  CHECK(d.waits_for_all == 1);
  CHECK(d.frees == 0);
  CHECK(d.allocations == 2);
  CHECK(st.held_bytes() == 3 * granule);
}

TEST_CASE("the limit counts whole buffers: an upload whose rounded-up buffer would pass it waits instead") {
  fake_device_state d;
  staging st(d, granule + 100);
  std::vector<char> host(granule + 50, 'v'), dst(granule + 50);
  st.upload(dst.data(), host.data(), granule + 50);  // would take two granules
  CHECK(d.waited == 1);
  CHECK(d.allocations == 0);
  CHECK(dst == host);
  st.upload(dst.data(), host.data(), granule);  // one granule fits
  CHECK(d.staged == 1);
  CHECK(st.held_bytes() <= st.limit());
}

TEST_CASE("a copy the device refuses leaves its buffer free and the staging usable") {
  fake_device_state d;
  staging st(d, 16 * granule);
  std::vector<int> host = iota_from(40, 100), dst(100, -1);
  d.fail_next_copy = true;
  CHECK_THROWS_AS(st.upload(dst.data(), host.data(), sizeof(int) * host.size()), std::runtime_error);
  CHECK(st.in_flight() == 0);  // back in the pool, free
  CHECK(st.held_bytes() == granule);
  st.upload(dst.data(), host.data(), sizeof(int) * host.size());  // the same buffer, free
  CHECK(d.allocations == 1);
  d.complete_all();
  CHECK(dst == iota_from(40, 100));
}

TEST_CASE("an upload larger than the limit waits for its copy and stages nothing") {
  fake_device_state d;
  staging st(d, granule);
  const std::size_t n = granule / sizeof(int) + 1;
  std::vector<int> host = iota_from(5, n), dst(n, -1);
  st.upload(dst.data(), host.data(), sizeof(int) * n);
  CHECK(d.waited == 1);
  CHECK(d.staged == 0);
  CHECK(d.allocations == 0);
  CHECK(dst == iota_from(5, n));
  st.upload(dst.data(), host.data(), 0);  // nothing to copy
  CHECK(d.waited == 1);
  CHECK(d.staged == 0);
}

TEST_CASE("a training loop reuses two buffers, and a host running a step ahead needs two more at most") {
  fake_device_state d;
  staging st(d, 64 * granule);
  std::vector<float> batch(3000, 1.f), batch_dst(3000);
  std::vector<int> labels(50, 3), labels_dst(50);
  auto step = [&] {
    st.upload(batch_dst.data(), batch.data(), sizeof(float) * batch.size());
    st.upload(labels_dst.data(), labels.data(), sizeof(int) * labels.size());
  };
  for (int i = 0; i < 20; ++i) {
    step();
    d.complete_all();  // the loop reads its loss: the device catches up
  }
  CHECK(d.allocations == 2);
  for (int i = 0; i < 20; ++i) {
    step();
    d.complete(static_cast<int>(d.queued.size()) - 2);  // the device lags a step behind
  }
  CHECK(d.allocations == 4);
  CHECK(d.waits_for_all == 0);
  CHECK(d.staged == 80);
}

TEST_CASE("lowering the limit waits for the copies and gives the buffers back; teardown frees everything") {
  fake_device_state d;
  {
    staging st(d, 8 * granule);
    std::vector<char> host(granule, 'z'), dst(granule);
    for (int i = 0; i < 4; ++i) st.upload(dst.data(), host.data(), granule);
    CHECK(st.held_bytes() == 4 * granule);
    st.set_limit(granule);
    CHECK(d.in_flight() == 0);
    CHECK(st.held_bytes() == 0);  // more than the limit was held: the cached buffers went back
    CHECK(d.frees == 4);
    st.upload(dst.data(), host.data(), granule);  // still one in flight at teardown
  }
  CHECK(d.frees == d.allocations);
  CHECK(d.released == static_cast<int>(d.staged));  // every event given back, the in-flight one too
}
