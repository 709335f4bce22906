// ckpt — the one order in which reductions to a scalar add their terms (internal).
//
// Element i goes to partial sum i mod 8, in double (also for float tensors); the 8 partial
// sums are added in order and the result is rounded to T once. The order is fixed, so results
// are reproducible and a checkpoint's re-trace reproduces them bit for bit; eight independent
// sums vectorise; and in double a float loss over millions of elements is exact to about the
// float's last bit (a single float accumulator drifted by 1e-5 relative over 64k elements,
// against PyTorch's pairwise sums).
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/core/shape.hpp"

#include <type_traits>

namespace ckpt::detail {

/// What reductions accumulate in: double for float and double tensors.
template <class T>
using accumulator_t = std::conditional_t<(sizeof(T) < sizeof(double)), double, T>;

inline constexpr int reduction_lanes = 8;

/// The sum of f(i) for i < n.
template <class T, class F>
accumulator_t<T> lane_sum(long n, const F& f) {
  using A = accumulator_t<T>;
  A part[reduction_lanes] = {};
  long i = 0;
  for (; i + reduction_lanes <= n; i += reduction_lanes)
    for (int l = 0; l < reduction_lanes; ++l) part[l] += static_cast<A>(f(i + l));
  for (int l = 0; i < n; ++i, ++l) part[l] += static_cast<A>(f(i));
  A total(0);
  for (int l = 0; l < reduction_lanes; ++l) total += part[l];
  return total;
}

/// The same over a rows x cols operand read column by column (element (r, c) is i = r + c rows).
template <class T, class F>
accumulator_t<T> lane_sum(shape s, const F& f) {
  using A = accumulator_t<T>;
  A part[reduction_lanes] = {};
  long i = 0;
  for (int c = 0; c < s.cols; ++c)
    for (int r = 0; r < s.rows; ++r, ++i) part[i % reduction_lanes] += static_cast<A>(f(r, c));
  A total(0);
  for (int l = 0; l < reduction_lanes; ++l) total += part[l];
  return total;
}

/// out[j] += the sum of term(i, j) over the `rows` rows of column j, added in accumulator_t<T>
/// and rounded once: a for_each_column body (the lanes take rows l, l + width, ... and meet in
/// lanes.sum; lane 0 writes).
template <class T, class Term>
struct add_column_sums {
  T* out;
  Term term;
  long rows;
  template <class Lanes>
  CKPT_HOST_DEVICE void operator()(long j, const Lanes& lanes) const {
    accumulator_t<T> total(0);
    for (long i = lanes.lane(); i < rows; i += lanes.width()) total += term(i, j);
    total = lanes.sum(total);
    if (lanes.lane() == 0) out[j] += static_cast<T>(total);
  }
};

}  // namespace ckpt::detail
