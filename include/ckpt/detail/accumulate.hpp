// ckpt — the one order in which reductions to a scalar add their terms (internal).
//
// Term i goes to partial sum i mod 8, in double (also for float tensors); the 8 partial
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

/// Eight partial sums in A that a sum's terms join in turn (term k goes to partial sum
/// k mod 8), then added in order.
template <class A>
struct lane_accumulator {
  A part[reduction_lanes] = {};
  int next = 0;  // the partial sum the next term joins

  /// Adds v[0..n) as the next n terms.
  template <class R>
  CKPT_HOST_DEVICE void add(const R* v, long n) {
    long i = 0;
    for (; i < n && next != 0; ++i, next = (next + 1) % reduction_lanes) part[next] += static_cast<A>(v[i]);
    for (; i + reduction_lanes <= n; i += reduction_lanes)
      for (int l = 0; l < reduction_lanes; ++l) part[l] += static_cast<A>(v[i + l]);
    for (; i < n; ++i, next = (next + 1) % reduction_lanes) part[next] += static_cast<A>(v[i]);
  }
  CKPT_HOST_DEVICE A total() const {
    A t(0);
    for (int l = 0; l < reduction_lanes; ++l) t += part[l];
    return t;
  }
};

/// Terms are computed a block at a time into a buffer and then added: the loop that computes
/// them has no conversion to A in it, so it vectorises. (Computed and converted in one loop, a
/// relu's select stayed a branch, mispredicted on half of random data: sum(relu(x * s)) took
/// 5 ns an element.)
inline constexpr int term_block = 256;

/// Adds column c's terms f(r, c), r < rows, to acc as its next terms.
template <class A, class F>
void add_column_terms(lane_accumulator<A>& acc, int rows, int c, const F& f) {
  using R = std::remove_cvref_t<decltype(f(0, 0))>;
  R buffer[term_block];
  for (int r0 = 0; r0 < rows; r0 += term_block) {
    const int n = rows - r0 < term_block ? rows - r0 : term_block;
    for (int j = 0; j < n; ++j) buffer[j] = f(r0 + j, c);
    acc.add(buffer, n);
  }
}

/// The sum of f(i) for i < n.
template <class T, class F>
accumulator_t<T> lane_sum(long n, const F& f) {
  using R = std::remove_cvref_t<decltype(f(0L))>;
  lane_accumulator<accumulator_t<T>> acc;
  R buffer[term_block];
  for (long i0 = 0; i0 < n; i0 += term_block) {
    const long m = n - i0 < term_block ? n - i0 : term_block;
    for (long j = 0; j < m; ++j) buffer[j] = f(i0 + j);
    acc.add(buffer, m);
  }
  return acc.total();
}

/// The same over a rows x cols operand read column by column (element (r, c) is term
/// r + c rows).
template <class T, class F>
accumulator_t<T> lane_sum(shape s, const F& f) {
  lane_accumulator<accumulator_t<T>> acc;
  for (int c = 0; c < s.cols; ++c) add_column_terms(acc, s.rows, c, f);
  return acc.total();
}

/// A for_each_column lane group of one lane that takes the whole column (the CPU's): it may
/// organise a column's loops as it likes, for instance in eight interleaved partial results.
template <class Lanes>
concept single_lane = requires { requires Lanes::single; };

/// The sum of term(i) over a column's rows i < rows, in accumulator_t<T>, for a
/// for_each_column body; every lane of `lanes` gets the total. Lanes that say `single` (the
/// CPU's one lane) add the terms in the order of the sums to a scalar above, term i into partial
/// sum i mod 8, computing a block of terms into a buffer first: both loops vectorise, where one
/// running sum was a chain of dependent double additions (4 cycles a term) and a term with an
/// exp in it kept the whole loop scalar. Wider groups (a CUDA warp) add their rows l, l + width,
/// ... in increasing order, and lanes.sum combines the lanes' totals.
template <class T, class Lanes, class Term>
CKPT_HOST_DEVICE accumulator_t<T> column_sum(int rows, const Lanes& lanes, const Term& term) {
  using A = accumulator_t<T>;
  if constexpr (single_lane<Lanes>) {
    // lane_sum's loop, written out: called through a lambda that narrows the index, GCC kept it
    // out of line, and cross-entropy's and layer norm's steps took 25 % longer.
    lane_accumulator<A> acc;
    T buffer[term_block];
    for (int i0 = 0; i0 < rows; i0 += term_block) {
      const int n = rows - i0 < term_block ? rows - i0 : term_block;
      for (int j = 0; j < n; ++j) buffer[j] = term(i0 + j);
      acc.add(buffer, n);
    }
    return acc.total();
  } else {
    A total(0);
    for (int i = lanes.lane(); i < rows; i += lanes.width()) total += static_cast<A>(term(i));
    return lanes.sum(total);
  }
}

/// What a broadcast operand's gradient sums its terms term(r, c) over: everything (a 1 x 1
/// operand), each row's columns (rows x 1), or each column's rows (1 x cols).
enum class summed { all, over_columns, over_rows };
/// Which of those an operand of shape `leaf`, broadcast to `s`, takes: the one decision every
/// backend's add_broadcast_sums makes.
inline summed summed_for(shape leaf, shape s) {
  return leaf.size() == 1 ? summed::all : leaf.cols != s.cols ? summed::over_columns : summed::over_rows;
}

/// What a sum writes into a 1x1 element that it adds into: what it held plus the total.
template <class T>
struct added_to {
  const T* held;
  CKPT_HOST_DEVICE T operator()(accumulator_t<T> total) const { return held[0] + static_cast<T>(total); }
};

/// out[j] += the sum of term(i, j) over the `rows` rows of column j, added in accumulator_t<T>
/// and rounded once: a for_each_column body (the lanes take rows l, l + width, ... and meet in
/// lanes.sum; lane 0 writes).
template <class T, class Term>
struct column_sum_lanes {
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
