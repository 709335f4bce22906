// Shared by the checkpoint suites: the policies under test (one written here, as a user would),
// a harness that records a program under a policy and collects its gradients, and a small
// deterministic random generator (its streams are the same under every standard library).
#pragma once
#include "support/gradcheck.hpp"

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <vector>

namespace ckpt::test {

template <class T>
using MatT = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;

// ------------------------------------------------------------------ policies

/// A policy written outside the library: segments of 3 steps whose matrix products are kept.
struct thirds_matmul {
  using save = ckpt::save::matmul;
  static constexpr std::size_t segment_length(std::size_t) { return 3; }
};
static_assert(ckpt::Policy<thirds_matmul>);
static_assert(ckpt::SegmentingPolicy<thirds_matmul>);

/// A binomial policy written outside the library (only `snapshots` is needed).
struct two_snapshots {
  static constexpr std::size_t snapshots = 2;
};
static_assert(ckpt::Policy<two_snapshots>);
static_assert(ckpt::RevolvePolicy<two_snapshots>);

// What is not a policy is rejected by the concept.
struct not_a_policy {};
struct bad_save {
  using save = int;
  static std::size_t segment_length(std::size_t) { return 1; }
};
static_assert(!ckpt::Policy<not_a_policy>);
static_assert(!ckpt::Policy<int>);
static_assert(!ckpt::Policy<bad_save>);
static_assert(ckpt::Policy<ckpt::policy::none> && ckpt::Policy<ckpt::policy::sqrt_n> && ckpt::Policy<ckpt::policy::offload<>>);
static_assert(ckpt::Policy<ckpt::policy::every<4>> && ckpt::Policy<ckpt::policy::binomial<4>>);
static_assert(ckpt::Policy<ckpt::policy::selective<ckpt::save::matmul>>);
static_assert(ckpt::SavePredicate<ckpt::save::any<ckpt::save::matmul, ckpt::save::tagged<"a", "b">>>);

template <class P>
inline constexpr const char* policy_name = "?";
template <>
inline constexpr const char* policy_name<ckpt::policy::none> = "none";
template <>
inline constexpr const char* policy_name<ckpt::policy::every<1>> = "every<1>";
template <>
inline constexpr const char* policy_name<ckpt::policy::every<2>> = "every<2>";
template <>
inline constexpr const char* policy_name<ckpt::policy::every<3>> = "every<3>";
template <>
inline constexpr const char* policy_name<ckpt::policy::every<4>> = "every<4>";
template <>
inline constexpr const char* policy_name<ckpt::policy::every<8>> = "every<8>";
template <>
inline constexpr const char* policy_name<ckpt::policy::sqrt_n> = "sqrt_n";
template <>
inline constexpr const char* policy_name<ckpt::policy::binomial<0>> = "binomial<0>";
template <>
inline constexpr const char* policy_name<ckpt::policy::binomial<1>> = "binomial<1>";
template <>
inline constexpr const char* policy_name<ckpt::policy::binomial<2>> = "binomial<2>";
template <>
inline constexpr const char* policy_name<ckpt::policy::binomial<3>> = "binomial<3>";
template <>
inline constexpr const char* policy_name<ckpt::policy::binomial<4>> = "binomial<4>";
template <>
inline constexpr const char* policy_name<ckpt::policy::binomial<8>> = "binomial<8>";
template <>
inline constexpr const char* policy_name<ckpt::policy::binomial<16>> = "binomial<16>";
template <>
inline constexpr const char* policy_name<ckpt::policy::selective<ckpt::save::matmul>> = "selective<matmul>";
template <>
inline constexpr const char* policy_name<ckpt::policy::selective<ckpt::save::tagged<"h">>> = "selective<tagged<h>>";
template <>
inline constexpr const char* policy_name<ckpt::policy::selective<ckpt::save::tagged<"t">, 2>> = "selective<tagged<t>, 2>";
template <>
inline constexpr const char* policy_name<ckpt::policy::offload<>> = "offload<sqrt_n>";
template <>
inline constexpr const char* policy_name<ckpt::policy::offload<ckpt::policy::every<2>>> = "offload<every<2>>";
template <>
inline constexpr const char* policy_name<thirds_matmul> = "user: thirds_matmul";
template <>
inline constexpr const char* policy_name<two_snapshots> = "user: two_snapshots";

template <class... P>
struct type_list {};

/// Calls f.template operator()<P>() for every P of the list, in order.
template <class... P, class F>
void for_each_type(type_list<P...>, F&& f) {
  (f.template operator()<P>(), ...);
}

/// The policies every property must hold for (the brief's list and two user-written ones).
using all_policies = type_list<ckpt::policy::none, ckpt::policy::every<1>, ckpt::policy::every<4>, ckpt::policy::sqrt_n,
                               ckpt::policy::binomial<1>, ckpt::policy::binomial<4>, ckpt::policy::selective<ckpt::save::matmul>,
                               ckpt::policy::selective<ckpt::save::tagged<"h">>, ckpt::policy::offload<>, thirds_matmul,
                               two_snapshots>;

// ------------------------------------------------------------------ harness

/// What one recording yields: the loss, the gradients (inputs first, then parameters), the
/// tape's work counters and its peak bytes.
template <class T>
struct run_result {
  MatT<T> loss;
  std::vector<MatT<T>> grads;
  ckpt::op_counters counters;
  std::size_t peak_bytes = 0;
  std::size_t bytes_after = 0;
};

/// Records body.template operator()<P>(tape, inputs) -> 1x1 loss on a fresh tape (inputs are
/// variables), runs backward and collects everything. Parameter gradients are zeroed first.
template <class P, class T, class Body>
run_result<T> run_policy(Body& body, const std::vector<MatT<T>>& inputs, const std::vector<ckpt::Parameter<T>*>& params,
                         std::uint64_t seed = 0x1234) {
  for (auto* p : params) p->zero_grad();
  ckpt::Tape<T> tape;
  tape.set_seed(seed);
  std::vector<ckpt::Var<T>> in;
  for (const auto& x : inputs) in.push_back(tape.variable(x));
  ckpt::Var<T> loss = body.template operator()<P>(tape, in);
  run_result<T> r;
  r.loss = loss.value();
  tape.backward(loss);
  for (const auto& v : in) r.grads.push_back(tape.grad(v));
  for (auto* p : params) r.grads.push_back(p->grad());
  r.counters = tape.counters();
  r.peak_bytes = tape.peak_bytes();
  r.bytes_after = tape.bytes();
  return r;
}

/// Loss and every gradient bit for bit equal.
template <class T>
void check_same_bits(const run_result<T>& ref, const run_result<T>& got, const std::string& what) {
  INFO(what);
  CHECK(same_bits(ref.loss, got.loss));
  REQUIRE(ref.grads.size() == got.grads.size());
  for (std::size_t i = 0; i < ref.grads.size(); ++i) {
    INFO("gradient #", i, " (inputs first, then parameters)");
    CHECK(same_bits(ref.grads[i], got.grads[i]));
  }
}

/// A reference worth comparing against: every gradient has a non-zero entry and is finite.
template <class T>
void check_nontrivial(const run_result<T>& r, const std::string& what) {
  INFO(what);
  REQUIRE(std::isfinite(static_cast<double>(r.loss(0, 0))));
  for (std::size_t i = 0; i < r.grads.size(); ++i) {
    INFO("gradient #", i);
    CHECK(r.grads[i].allFinite());
    CHECK(r.grads[i].cwiseAbs().maxCoeff() > T(0));
  }
}

/// A parameter with deterministic random entries.
template <class T>
ckpt::Parameter<T> random_parameter(int rows, int cols, std::uint64_t seed, double scale = 1.0, bool frozen = false) {
  return ckpt::Parameter<T>((random_matrix(rows, cols, seed) * scale).cast<T>(), frozen);
}

/// Parameters from (rows, cols, seed, scale) specs (Parameter moves, never copies).
struct parameter_spec {
  int rows, cols;
  std::uint64_t seed;
  double scale;
};
template <class T>
std::vector<ckpt::Parameter<T>> make_parameters(std::initializer_list<parameter_spec> specs) {
  std::vector<ckpt::Parameter<T>> r;
  r.reserve(specs.size());
  for (const auto& s : specs) r.push_back(random_parameter<T>(s.rows, s.cols, s.seed, s.scale));
  return r;
}

template <class T>
MatT<T> random_t(int rows, int cols, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  return random_matrix(rows, cols, seed, lo, hi).cast<T>();
}

// ------------------------------------------------------------------ deterministic randomness

/// splitmix64: the same stream under every standard library (std distributions are not).
struct rng64 {
  std::uint64_t state;
  explicit rng64(std::uint64_t seed) : state(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  /// Uniform in [0, n).
  int below(int n) { return static_cast<int>(next() % static_cast<std::uint64_t>(n)); }
  /// Uniform in [lo, hi].
  int between(int lo, int hi) { return lo + below(hi - lo + 1); }
  double uniform(double lo, double hi) { return lo + (hi - lo) * static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }
  bool coin(double p) { return uniform(0.0, 1.0) < p; }
};

/// An environment variable read as a count, or `fallback` when unset or not a number.
inline long env_count(const char* name, long fallback) {
  const char* s = std::getenv(name);
  if (!s || !*s) return fallback;
  char* end = nullptr;
  const long v = std::strtol(s, &end, 10);
  return (end && *end == '\0' && v >= 0) ? v : fallback;
}

}  // namespace ckpt::test
