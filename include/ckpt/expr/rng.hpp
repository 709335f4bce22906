// ckpt — a counter-based random number generator: a value is a pure function of
// (seed, step, op, element), so re-running an op (a checkpoint's re-trace, another backend)
// reproduces the same numbers without storing them.
#pragma once
#include "ckpt/config.hpp"

#include <cstdint>

namespace ckpt::rng {

/// The splitmix64 finaliser: a bijective mix with good avalanche.
CKPT_HOST_DEVICE inline std::uint64_t mix(std::uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/// The key of one op's stream.
CKPT_HOST_DEVICE inline std::uint64_t key(std::uint64_t seed, std::uint64_t step, std::uint64_t op) {
  return mix(mix(mix(seed) ^ step) ^ op);
}

/// A uniform number in [0, 1) with 24 bits, the same in float and double.
CKPT_HOST_DEVICE inline float uniform(std::uint64_t k, std::uint64_t element) {
  return static_cast<float>(mix(k ^ mix(element)) >> 40) * (1.0f / 16777216.0f);
}

}  // namespace ckpt::rng
