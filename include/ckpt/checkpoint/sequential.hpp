// ckpt — sequential<Policy>: a chain of layers, or n time steps of one step function, under a
// checkpoint policy. Every policy is built from the one mechanism, checkpoint(): segmenting
// policies checkpoint runs of K steps; binomial<S> nests checkpoints along revolve's optimal
// splits, so the sweep frees each snapshot right after its part of the chain is reversed.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/checkpoint/checkpoint.hpp"
#include "ckpt/checkpoint/policy.hpp"
#include "ckpt/checkpoint/revolve.hpp"

#include <cstddef>
#include <iterator>
#include <type_traits>

namespace ckpt {

namespace detail {

/// Steps [begin, end) of a chain, as a checkpointable segment.
template <class Step>
struct chain_segment {
  const Step* step;
  std::size_t begin, end;
  template <class V>
  V operator()(const V& x) const {
    V y = x;
    for (std::size_t i = begin; i < end; ++i) y = (*step)(i, y);
    return y;
  }
};

template <class Step, class V>
V revolve_chain(const Step* step, std::size_t a, std::size_t len, std::size_t slots, const V& x);

/// Steps [a, a + len) reversed with `slots` snapshots: the segment of a revolve schedule.
template <class Step>
struct revolve_segment {
  const Step* step;
  std::size_t a, len, slots;
  template <class V>
  V operator()(const V& x) const {
    return revolve_chain(step, a, len, slots, x);
  }
};

template <class Step, class V>
V revolve_chain(const Step* step, std::size_t a, std::size_t len, std::size_t slots, const V& x) {
  if (len == 1) return (*step)(a, x);  // the last step is taped: its reverse comes first
  if (slots == 0) {  // no snapshot to spare: the last step's input is the only one held
    V y = checkpoint("binomial", revolve_segment<Step>{step, a, len - 1, 0}, x);
    return (*step)(a + len - 1, y);
  }
  const std::size_t m = static_cast<std::size_t>(revolve::split(len, slots));
  V y = checkpoint("binomial", revolve_segment<Step>{step, a, m, slots}, x);
  return revolve_chain(step, a + m, len - m, slots - 1, y);
}

}  // namespace detail

/// Number of step calls a segmenting policy makes over n steps in one forward + backward.
template <SegmentingPolicy P>
std::size_t expected_step_calls(std::size_t n) {
  const std::size_t k = P::segment_length(n);
  if (k == 0 || k >= n) return n;
  const std::size_t segments = (n - 1) / k;  // checkpointed; the rest is recorded as usual
  return n + segments * k;
}
/// The same for binomial<S>: n + revolve::extra_evaluations(n, S).
template <RevolvePolicy P>
std::size_t expected_step_calls(std::size_t n) {
  return n + static_cast<std::size_t>(revolve::extra_evaluations(n, P::snapshots));
}

/// Runs x_{i+1} = step(i, x_i) for i < n under policy P and returns x_n. `step` is copied onto
/// the tape (it is called again during backward).
template <Policy P, class Step, class T, Backend B>
Var<T, B> sequential(std::size_t n, Step&& step, const Var<T, B>& x) {
  using S = std::decay_t<Step>;
  static_assert(std::is_invocable_r_v<Var<T, B>, const S&, std::size_t, Var<T, B>>,
                "ckpt::sequential: step must be callable as step(std::size_t i, Var x) -> Var");
  if (x.tape() == nullptr) throw tape_error("sequential: the input is an empty Var");
  x.tape()->check(x, "sequential");
  // The steps get copies of the caller's handle (and n == 0 returns one): none is a temporary.
  x.tape()->count_use(x.index());
  if (n == 0) return x;
  Tape<T, B>& t = *x.tape();
  if constexpr (RevolvePolicy<P>) {
    const S* kept = t.keep_object(S(std::forward<Step>(step)));
    return detail::revolve_chain(kept, 0, n, P::snapshots, x);
  } else {
    const std::size_t k = P::segment_length(n);
    Var<T, B> y = x;
    if (k == 0 || k >= n) {
      for (std::size_t i = 0; i < n; ++i) y = step(i, y);
      return y;
    }
    const S* kept = t.keep_object(S(std::forward<Step>(step)));
    std::size_t i = 0;
    for (; i + k < n; i += k) {
      Var<T, B> next = checkpoint<typename P::save>("sequential", detail::chain_segment<S>{kept, i, i + k}, y);
      // policy::offload: a boundary between two checkpointed segments is read again only by
      // the second one's re-trace, so it can wait in host memory (the chain's input cannot: it
      // is the caller's; nor the last boundary: the rest of the chain is recorded on it).
      if constexpr (offloads_boundaries<P>)
        if (i > 0 && next.index() != y.index()) t.offload(y.index());
      y = next;
    }
    for (; i < n; ++i) y = (*kept)(i, y);
    return y;
  }
}

/// Applies layers[0], layers[1], ... in order under policy P. `layers` (a random-access range
/// of callables layer(Var) -> Var) must stay alive until backward.
template <Policy P, class Layers, class T, Backend B>
  requires requires(Layers& l) { std::size(l); l[0]; }
Var<T, B> sequential(Layers& layers, const Var<T, B>& x) {
  auto* l = &layers;
  return sequential<P>(static_cast<std::size_t>(std::size(layers)), [l](std::size_t i, const Var<T, B>& v) -> Var<T, B> { return (*l)[i](v); }, x);
}

}  // namespace ckpt
