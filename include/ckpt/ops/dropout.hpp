// ckpt — dropout driven by the counter-based RNG, keyed by (tape seed, tape step, op counter).
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/expr/expression.hpp"
#include "ckpt/expr/record.hpp"

#include <utility>

namespace ckpt {

/// Inverted dropout with drop probability p in [0, 1). Fuses into the surrounding expression.
/// Each call takes the next op number of the tape's RNG counter; a checkpoint's re-trace
/// restores the counter, so it draws the same mask.
template <expr::Operand X>
auto dropout(X&& x, double p) {
  auto e = expr::to_expr(std::forward<X>(x), "dropout");
  using E = decltype(e);
  using T = typename E::value_type;
  if (!(p >= 0.0 && p < 1.0)) throw error(detail::cat("dropout: p must be in [0, 1), got ", p));
  auto* t = e.tape_ptr();
  if (!t) throw tape_error("dropout: the operand has no tape; bring a parameter onto one with tape.param(p)");
  const std::uint64_t k = rng::key(t->seed(), t->step(), t->next_rng_op());
  return expr::dropout_node<std::remove_cvref_t<E>>{e, k, static_cast<float>(p), static_cast<T>(1.0 / (1.0 - p))};
}


// Found by argument-dependent lookup for expression arguments too (expressions live in
// ckpt::expr), so that `tanh(a + b)` means ckpt::tanh without `using namespace ckpt`.
namespace expr {
using ckpt::dropout;
}  // namespace expr

}  // namespace ckpt
