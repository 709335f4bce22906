// ckpt — checkpoint policies are types, chosen by template argument and checked by a concept.
// A policy either cuts a chain into segments (segment_length) with a save predicate for their
// insides, or asks for binomial checkpointing with a number of snapshots.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/checkpoint/save.hpp"

#include <cmath>
#include <concepts>
#include <cstddef>

namespace ckpt {

/// Cuts a chain of n steps into checkpointed segments of segment_length(n) steps (0: record
/// everything); the last segment is recorded as usual, since its re-trace would come at once.
template <class P>
concept SegmentingPolicy = SavePredicate<typename P::save> && requires(std::size_t n) {
  { P::segment_length(n) } -> std::convertible_to<std::size_t>;
};

/// Binomial checkpointing with P::snapshots snapshot slots besides the chain's input.
template <class P>
concept RevolvePolicy = requires {
  { P::snapshots } -> std::convertible_to<std::size_t>;
};

template <class P>
concept Policy = SegmentingPolicy<P> || RevolvePolicy<P>;

namespace policy {

/// Record everything: the baseline.
struct none {
  using save = save::nothing;
  static constexpr std::size_t segment_length(std::size_t) { return 0; }
};

/// Keep every K-th boundary, recompute the K steps between two of them.
template <std::size_t K>
struct every {
  static_assert(K >= 1, "ckpt::policy::every<K>: K must be at least 1");
  using save = save::nothing;
  static constexpr std::size_t segment_length(std::size_t) { return K; }
};

/// Chen et al.'s sqrt(n) checkpoints: K = ceil(sqrt(n)).
struct sqrt_n {
  using save = save::nothing;
  static std::size_t segment_length(std::size_t n) {
    std::size_t k = static_cast<std::size_t>(std::sqrt(static_cast<double>(n)));
    while (k * k < n) ++k;
    return k;
  }
};

/// Revolve: at most S snapshots at once besides the chain's input, and the fewest step
/// evaluations any schedule with S snapshots can reach (see revolve.hpp).
template <std::size_t S>
struct binomial {
  static constexpr std::size_t snapshots = S;
};

/// Segments of K steps (K = 0: ceil(sqrt(n))) whose insides keep what Pred selects, e.g.
/// save::matmul (JAX's dots_saveable) or save::tagged<"name">.
template <SavePredicate Pred, std::size_t K = 0>
struct selective {
  using save = Pred;
  static std::size_t segment_length(std::size_t n) { return K ? K : sqrt_n::segment_length(n); }
};

/// Checkpoint boundaries kept in host memory (CUDA backend); segments as in Inner. The
/// boundaries between checkpointed segments move to pinned host memory on a side stream during
/// forward and come back ahead of need during reverse (Tape::offload, make_resident). On the
/// CPU backend the boundaries already are in host memory and stay in place.
template <SegmentingPolicy Inner = sqrt_n>
struct offload : Inner {
  static constexpr bool offload_boundaries = true;
};

}  // namespace policy

/// Whether P keeps checkpoint boundaries in host memory (policy::offload).
template <class P>
inline constexpr bool offloads_boundaries = requires { requires P::offload_boundaries; };

}  // namespace ckpt
