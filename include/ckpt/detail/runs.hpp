// ckpt — row and column sums in fixed runs (internal), for backends whose loop iterations run
// concurrently: instead of many iterations adding into one element (a race, or atomics whose
// order varies), each row's (column's) terms are split into runs whose split depends on the
// shapes alone; run k of element p is summed by one call into scratch[p + k * elements], and a
// column pass (for_each_column, element p's runs as its column) then adds them into out[p]. Terms, runs and
// their total are added in accumulator_t<T> (double for float) and rounded to T once, so the
// result neither depends on the split beyond a rounding nor drifts with the batch, and it
// repeats bit for bit.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/core/shape.hpp"
#include "ckpt/detail/accumulate.hpp"

namespace ckpt::detail {

/// How `reach` terms per element are split: enough runs for about 64k calls in all, but at
/// most ceil(reach / 16) runs (so runs of about 16 terms or more) and at most 4096.
inline void split_runs(long elements, long reach, long& runs, long& length) {
  runs = (65536 + elements - 1) / (elements > 0 ? elements : 1);
  runs = runs < (reach + 15) / 16 ? runs : (reach + 15) / 16;
  runs = runs < 4096 ? runs : 4096;
  runs = runs > 1 ? runs : 1;
  length = (reach + runs - 1) / runs;
}

/// Run k of element p, scratch[p + k * elements]: element p's runs are a column, which
/// column_sum_lanes adds up (a warp's lanes share them on CUDA, so that a few elements with
/// thousands of runs are not added by one thread each).
template <class A>
struct run_total {
  const A* scratch;
  long elements;
  CKPT_HOST_DEVICE A operator()(long k, long p) const { return scratch[p + k * elements]; }
};

/// Run k of row r: the sum of term(r, c) over its columns, into scratch[r + k * rows].
template <class T, class Term>
struct row_run {
  accumulator_t<T>* scratch;
  Term term;
  int rows, cols;
  long length;
  CKPT_HOST_DEVICE void operator()(long i) const {
    const int r = static_cast<int>(i % rows);
    const long k = i / rows;
    const long c1 = (k + 1) * length < cols ? (k + 1) * length : cols;
    accumulator_t<T> acc(0);
    for (long c = k * length; c < c1; ++c) acc += term(r, static_cast<int>(c));
    scratch[i] = acc;
  }
};

/// out[r] += sum over c of term(r, c), in runs (see the top of this file): backend::cuda's
/// add_row_sums.
template <class B, class T, class Term>
void add_row_sums_in_runs(T* out, shape s, const Term& term) {
  if (s.size() == 0) return;
  long runs = 1, length = 1;
  split_runs(s.rows, s.cols, runs, length);
  using A = accumulator_t<T>;
  A* scratch = B::template scratch<A>(s.rows * runs);
  B::for_each(s.rows * runs, row_run<T, Term>{scratch, term, s.rows, s.cols, length});
  B::for_each_column(shape{static_cast<int>(runs), s.rows}, column_sum_lanes<T, run_total<A>>{out, {scratch, s.rows}, runs});
}

/// Run k of column c: the sum of term(r, c) over the rows r = k, k + runs, k + 2 runs, ...,
/// into scratch[k + c * runs]. Interleaved, not contiguous: consecutive calls i take
/// consecutive rows of one column, so that a warp's reads at each step are contiguous (with
/// runs of consecutive rows they were `length` elements apart).
template <class T, class Term>
struct column_run {
  accumulator_t<T>* scratch;
  Term term;
  int rows;
  long runs;
  CKPT_HOST_DEVICE void operator()(long i) const {
    const long k = i % runs;
    const int c = static_cast<int>(i / runs);
    accumulator_t<T> acc(0);
    for (long r = k; r < rows; r += runs) acc += term(static_cast<int>(r), c);
    scratch[i] = acc;
  }
};
/// Column c's runs, scratch[k + c * runs] for k < runs: a column of their own.
template <class A>
struct column_runs {
  const A* scratch;
  long runs;
  CKPT_HOST_DEVICE A operator()(long k, long c) const { return scratch[k + c * runs]; }
};

/// out[c] += sum over r of term(r, c), in runs. (A warp per column instead would leave a tall,
/// narrow output, 65536 x 4, to four warps.)
template <class B, class T, class Term>
void add_column_sums_in_runs(T* out, shape s, const Term& term) {
  if (s.size() == 0) return;
  long runs = 1, length = 1;
  split_runs(s.cols, s.rows, runs, length);
  using A = accumulator_t<T>;
  A* scratch = B::template scratch<A>(s.cols * runs);
  B::for_each(s.cols * runs, column_run<T, Term>{scratch, term, s.rows, runs});
  B::for_each_column(shape{static_cast<int>(runs), s.cols}, column_sum_lanes<T, column_runs<A>>{out, {scratch, runs}, runs});
}

/// A broadcast operand's gradient (see cpu::add_broadcast_sums) by reductions a concurrent
/// backend runs well: the grid-wide sum for 1 x 1, row runs for rows x 1, column runs for
/// 1 x cols. backend::cuda's add_broadcast_sums.
template <class B, class T, class Term>
void add_broadcast_sums_in_runs(T* out, shape leaf, shape s, const Term& term) {
  switch (summed_for(leaf, s)) {
    case summed::all: B::sum_2d(out, s, term, added_to<T>{out}); break;  // also against a column or a row
    case summed::over_columns: add_row_sums_in_runs<B>(out, s, term); break;
    case summed::over_rows: add_column_sums_in_runs<B>(out, s, term); break;
  }
}

}  // namespace ckpt::detail
