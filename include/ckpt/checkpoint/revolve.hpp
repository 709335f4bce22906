// ckpt — binomial checkpointing (Griewank and Walther's revolve) in closed form.
//
// Model: a chain x_{i+1} = step(i, x_i), i < n, whose input x_0 is kept, with s snapshot
// slots besides it. Reversing it costs F(n, s) calls of step, each step being called at
// least once on the tape; the fewest possible is
//   F(n, s) = min over 1 <= m < n of  m + F(n - m, s - 1) + F(m, s),
//   F(1, s) = 1,  F(n, 0) = n (n + 1) / 2,
// (advance m steps and keep x_m, reverse the tail with one slot fewer, then the head). The
// forward pass is the first n of those calls, so the extra evaluations are F(n, s) - n:
//   extra(n, s) = (s + 1) C(r + s, s + 2) + r (n - C(r + s, s + 1)),
// with r the smallest r >= 1 such that n <= C(r + s + 1, s + 1) (the repetition number), and
// an optimal first split is m = min(C(r + s, s + 1), n - C(r + s - 1, s)).
// tests/checkpoint checks both against the dynamic program above.
#pragma once
#include "ckpt/config.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>

namespace ckpt::revolve {

/// C(n, k), saturating at 2^62 (the chains here are far shorter).
constexpr std::uint64_t binomial(std::uint64_t n, std::uint64_t k) {
  if (k > n) return 0;
  k = std::min(k, n - k);
  constexpr std::uint64_t cap = std::uint64_t(1) << 62;
  std::uint64_t c = 1;
  for (std::uint64_t i = 1; i <= k; ++i) {
    // c * (n - k + i) / i stays exact because c * (n - k + i) is divisible by i
    const std::uint64_t f = n - k + i;
    if (c > cap / f) return cap;
    c = c * f / i;
  }
  return c;
}

/// The repetition number: how many times the worst step of the chain is evaluated.
constexpr std::uint64_t repetitions(std::uint64_t n, std::uint64_t s) {
  std::uint64_t r = 1;
  while (binomial(r + s + 1, s + 1) < n) ++r;
  return r;
}

/// Fewest step evaluations beyond the n of the forward pass, with s snapshots.
constexpr std::uint64_t extra_evaluations(std::uint64_t n, std::uint64_t s) {
  if (n <= 1) return 0;
  const std::uint64_t r = repetitions(n, s);
  return (s + 1) * binomial(r + s, s + 2) + r * (n - binomial(r + s, s + 1));
}

/// Where an optimal schedule puts its first snapshot (1 <= split < n), for n >= 2, s >= 1.
constexpr std::uint64_t split(std::uint64_t n, std::uint64_t s) {
  const std::uint64_t r = repetitions(n, s);
  const std::uint64_t hi = binomial(r + s, s + 1);
  const std::uint64_t c = binomial(r + s - 1, s);
  const std::uint64_t m = std::min(hi, n > c ? n - c : 1);
  return std::clamp<std::uint64_t>(m, 1, n - 1);
}

}  // namespace ckpt::revolve
