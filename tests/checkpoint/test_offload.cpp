// policy::offload's bookkeeping (Tape::offload, make_resident), run on the CPU through a test
// backend that says it offloads: its "device" is host memory, its copies are memcpy, and its
// copy-done events complete only when the test lets them. So the state machine the CUDA
// backend drives (copy out behind compute, device buffer freed once the copy is done, copy back
// ahead of need, copies still in flight cancelled) runs here under the sanitizers, and its
// results are checked bit for bit against policy::none on the same backend.
#include "checkpoint/checkpoint_support.hpp"

#include <cstdlib>
#include <cstring>
#include <vector>

using namespace ckpt;
using namespace ckpt::test;

namespace {

/// The CPU backend with host "offload": a copy is done once `copies_complete` says so.
struct offloading_cpu : backend::cpu {
  static constexpr const char* name = "offloading_cpu";
  static constexpr bool offloads = true;
  static inline bool copies_complete = true;
  static inline int copies_out = 0, copies_in = 0, waits = 0, host_buffers = 0, events_live = 0;
  static void* host_allocate(std::size_t bytes) {
    ++host_buffers;
    return std::malloc(bytes);
  }
  static void host_deallocate(void* p) noexcept {
    --host_buffers;
    std::free(p);
  }
  static void* copy_to_host_async(void* host, const void* dev, std::size_t bytes) {
    std::memcpy(host, dev, bytes);
    ++copies_out;
    return new_event();
  }
  static void* copy_to_device_async(void* dev, const void* host, std::size_t bytes) {
    std::memcpy(dev, host, bytes);
    ++copies_in;
    return new_event();
  }
  static bool event_done(void*) noexcept { return copies_complete; }
  static void wait_event(void* e) {
    ++waits;
    release_event(e);
  }
  static void finish_event(void* e) noexcept { release_event(e); }
  static void release_event(void* e) noexcept {
    --events_live;
    delete static_cast<int*>(e);
  }
  static void* new_event() {
    ++events_live;
    return new int(0);
  }
  static void reset_counts() { copies_out = copies_in = waits = 0; }
};
static_assert(Backend<offloading_cpu>);

using B = offloading_cpu;

struct mlp_result {
  std::vector<Eigen::MatrixXd> grads;
  std::size_t peak = 0, host_peak = 0, host_after = 0;
};

/// A 10-layer residual MLP under P on the offloading backend.
template <class P>
mlp_result run_mlp() {
  std::vector<nn::Linear<double, B>> net;
  for (int l = 0; l < 10; ++l) net.emplace_back(12, 12, 40 + static_cast<std::uint64_t>(l));
  Tape<double, B> t;
  auto x = t.variable(random_matrix(12, 7, 3));
  auto y = sequential<P>(net.size(), [&net](std::size_t i, const Var<double, B>& h) -> Var<double, B> { return h + tanh(net[i](h)); }, x);
  t.backward(mean(square(y)));
  mlp_result r;
  r.grads.push_back(t.grad(x));
  for (auto& l : net) r.grads.push_back(l.weight().grad_to_host());
  r.peak = t.peak_bytes();
  r.host_peak = t.memory().host_peak_bytes;
  r.host_after = t.memory().host_bytes;
  return r;
}

void expect_same(const mlp_result& a, const mlp_result& b) {
  REQUIRE(a.grads.size() == b.grads.size());
  for (std::size_t k = 0; k < a.grads.size(); ++k) CHECK(same_bits(a.grads[k], b.grads[k]));
}

}  // namespace

TEST_CASE("offload: boundaries go to host memory and come back; gradients are none's bit for bit") {
  const auto plain = run_mlp<policy::none>();
  const auto kept = run_mlp<policy::every<2>>();
  B::copies_complete = true;
  B::reset_counts();
  const auto moved = run_mlp<policy::offload<policy::every<2>>>();
  expect_same(moved, plain);
  // 10 steps in segments of 2: 4 checkpointed segments, so 3 boundaries between two of them
  // (the chain's input and the last boundary stay), each 12 x 7 doubles.
  CHECK(B::copies_out == 3);
  CHECK(B::copies_in == 3);
  CHECK(B::waits == 3);
  CHECK(moved.host_peak == 3 * buffer_pool<detail::host_memory_of<B>>::rounded(12 * 7 * sizeof(double)));
  CHECK(moved.host_after == 0);
  CHECK(moved.peak < kept.peak);  // the device held fewer boundaries at its peak
  CHECK(B::events_live == 0);
  CHECK(B::host_buffers == 0);  // the tape's destructor gave the pinned buffers back
}

TEST_CASE("offload: copies still in flight when the value is needed are cancelled, not waited on") {
  const auto plain = run_mlp<policy::none>();
  B::copies_complete = false;  // no copy to host ever finishes: device buffers stay
  B::reset_counts();
  const auto moved = run_mlp<policy::offload<policy::every<2>>>();
  B::copies_complete = true;
  expect_same(moved, plain);
  CHECK(B::copies_out == 3);
  CHECK(B::copies_in == 0);
  CHECK(B::events_live == 0);
}

TEST_CASE("offload: an offloaded value read by user code is a tape_error that says so") {
  B::copies_complete = true;
  std::vector<nn::Linear<double, B>> net;
  for (int l = 0; l < 6; ++l) net.emplace_back(5, 5, 7 + static_cast<std::uint64_t>(l));
  Tape<double, B> t;
  auto x = t.variable(random_matrix(5, 3, 1));
  std::vector<Var<double, B>> seen;
  auto y = sequential<policy::offload<policy::every<2>>>(net.size(),
                                                          [&](std::size_t i, const Var<double, B>& h) -> Var<double, B> {
                                                            if (i == 2) seen.push_back(h);  // the boundary after step 2
                                                            return tanh(net[i](h));
                                                          },
                                                          x);
  REQUIRE(!seen.empty());
  CHECK_THROWS_WITH_AS(t.to_host(seen.front()), doctest::Contains("is offloaded to host memory (policy::offload)"), tape_error);
  t.backward(sum(y));  // and the reverse brings it back as usual
  CHECK(t.memory().host_bytes == 0);
}

TEST_CASE("offload: a value offloaded by hand, read twice by one checkpoint or never brought back, is released once") {
  for (bool complete : {true, false}) {
    CAPTURE(complete);
    B::copies_complete = complete;
    auto run = [](bool move_out) {
      Tape<double, B> t;
      auto x = t.variable(random_matrix(6, 4, 2));
      Var<double, B> h = tanh(x * 2.0);
      Var<double, B> unused = sigmoid(x);
      auto y = checkpoint([](const Var<double, B>& a, const Var<double, B>& b) { return Var<double, B>(a * b + a); }, h, h);
      auto never = checkpoint([](const Var<double, B>& a) { return Var<double, B>(exp(a)); }, unused);
      (void)never;
      if (move_out) {
        t.offload(h.index());       // read twice by y's re-trace: made resident once
        t.offload(unused.index());  // no gradient reaches `never`: it is never brought back
      }
      t.backward(sum(y));
      const Eigen::MatrixXd g = t.grad(x);
      t.reset();
      CHECK(t.bytes() == 0);
      CHECK(t.memory().host_bytes == 0);
      return g;
    };
    const Eigen::MatrixXd plain = run(false), moved = run(true);
    CHECK(same_bits(moved, plain));
    CHECK(B::events_live == 0);
  }
  B::copies_complete = true;
}

TEST_CASE("offload: boundaries a re-trace replays from their own buffer, and chains inside a checkpoint, stay put") {
  B::copies_complete = true;
  auto run = [](auto policy_tag, bool nested) {
    using P = decltype(policy_tag);
    std::vector<nn::Linear<double, B>> net;
    for (int l = 0; l < 8; ++l) net.emplace_back(9, 9, 60 + static_cast<std::uint64_t>(l));
    Tape<double, B> t;
    auto x = t.variable(random_matrix(9, 5, 4));
    // Each step ends in a product, so save::matmul keeps every segment's output: the re-trace
    // replays the boundary's own buffer.
    auto chain = [&net](const Var<double, B>& v) {
      return sequential<P>(net.size(), [&net](std::size_t i, const Var<double, B>& h) -> Var<double, B> { return net[i].product(tanh(h)); }, v);
    };
    auto y = nested ? checkpoint([&chain](const Var<double, B>& v) { return chain(v); }, x) : chain(x);
    t.backward(mean(square(y)));
    std::vector<Eigen::MatrixXd> grads{t.grad(x)};
    for (auto& l : net) grads.push_back(l.weight().grad_to_host());
    return grads;
  };
  const auto plain = run(policy::none{}, false);
  B::reset_counts();
  const auto replayed = run(policy::offload<policy::selective<save::matmul, 2>>{}, false);
  CHECK(B::copies_out == 0);
  for (std::size_t k = 0; k < plain.size(); ++k) CHECK(same_bits(replayed[k], plain[k]));
  B::reset_counts();
  const auto inside = run(policy::offload<policy::every<2>>{}, true);
  CHECK(B::copies_out == 0);  // the chain records inside a checkpoint (forward and re-trace)
  for (std::size_t k = 0; k < plain.size(); ++k) CHECK(same_bits(inside[k], plain[k]));
  CHECK(B::events_live == 0);
}
