// ckpt — layout ops: transpose, slicing and concatenation (attention heads, sequences), and
// gathering columns by index (embedding lookups).
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/detail/accumulate.hpp"
#include "ckpt/ops/operand.hpp"

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <span>
#include <utility>
#include <vector>

namespace ckpt {

/// `transpose(x)`: free inside matmul (a GEMM flag); assigned to a Var it records a copy.
template <class X>
class transposed {
 public:
  explicit transposed(const X& x) : x_(x) {}
  const X& inner() const { return x_; }
  template <class T, Backend B>
  operator Var<T, B>() const;  // NOLINT: implicit, `Var y = transpose(x);`

 private:
  X x_;
};
template <class T, Backend B>
class transposed<Parameter<T, B>> {
 public:
  explicit transposed(Parameter<T, B>& p) : p_(&p) {}
  Parameter<T, B>& inner() const { return *p_; }
  operator Var<T, B>() const;  // NOLINT

 private:
  Parameter<T, B>* p_;
};

template <class X>
inline constexpr bool is_transposed_v = false;
template <class X>
inline constexpr bool is_transposed_v<transposed<X>> = true;
template <class X>
inline constexpr bool is_transposed_v<transposed<X>&> = true;
template <class X>
inline constexpr bool is_transposed_v<const transposed<X>&> = true;

template <expr::Operand X>
auto transpose(X&& x) {
  return transposed<std::remove_cvref_t<X>>(x);
}

namespace detail {

/// dst(r, c) = src(r, c), or += with `add`: a block of one column-major tensor into another.
template <class T>
struct copy_block {
  T* dst;
  long ldd;
  const T* src;
  long lds;
  bool add;
  CKPT_HOST_DEVICE void operator()(int r, int c) const {
    if (add)
      dst[r + c * ldd] += src[r + c * lds];
    else
      dst[r + c * ldd] = src[r + c * lds];
  }
};
/// dst(c, r) = src(r, c), or += with `add`; src is rows x cols.
template <class T>
struct transpose_block {
  T* dst;
  const T* src;
  int rows, cols;
  bool add;
  CKPT_HOST_DEVICE void operator()(int r, int c) const {
    if (add)
      dst[c + static_cast<long>(r) * cols] += src[r + static_cast<long>(c) * rows];
    else
      dst[c + static_cast<long>(r) * cols] = src[r + static_cast<long>(c) * rows];
  }
};

template <class T>
struct transpose_entry {
  operand<T> x;
  std::uint32_t out;
  template <class TapeT>
  void backward(TapeT& t) const {
    using B = typename TapeT::backend_type;
    const T* g = t.adjoint_if(out);
    if (!g) return;
    // dx(i, j) += g(j, i): g is cols x rows, so this is g transposed onto dx.
    B::for_each_2d(shape{x.dims.cols, x.dims.rows}, transpose_block<T>{t.adjoint_of(x), g, x.dims.cols, x.dims.rows, true});
  }
};

template <class T, class B>
Var<T, B> record_transpose(const resolved<T, B>& x) {
  Tape<T, B>& t = tape_of(x, "transpose");
  const int r = x.ref.dims.rows, c = x.ref.dims.cols;
  const std::uint32_t begin = static_cast<std::uint32_t>(t.node_count());
  const std::uint32_t out = t.new_output({c, r}, "transpose", op_kind::layout, x.ref.requires_grad);
  if (!t.is_replayed(out)) B::for_each_2d(x.ref.dims, transpose_block<T>{t.node(out).value, x.ref.value, r, c, false});
  if (x.ref.requires_grad) t.push_entry(transpose_entry<T>{x.ref, out}, begin);
  return t.var_of(out);
}

template <class T>
struct slice_rows_entry {
  operand<T> x;
  std::uint32_t out;
  int begin, count;
  template <class TapeT>
  void backward(TapeT& t) const {
    using B = typename TapeT::backend_type;
    const T* g = t.adjoint_if(out);
    if (!g) return;
    B::for_each_2d(shape{count, x.dims.cols}, copy_block<T>{t.adjoint_of(x) + begin, x.dims.rows, g, count, true});
  }
};

template <class T>
struct concat_rows_entry {
  const operand<T>* parts;
  std::uint32_t count;
  std::uint32_t out;
  int rows;
  int cols;
  template <class TapeT>
  void backward(TapeT& t) const {
    using B = typename TapeT::backend_type;
    const T* g = t.adjoint_if(out);
    if (!g) return;
    int offset = 0;
    for (std::uint32_t p = 0; p < count; ++p) {
      const operand<T>& x = parts[p];
      if (T* dx = t.adjoint_of(x)) B::for_each_2d(x.dims, copy_block<T>{dx, x.dims.rows, g + offset, rows, true});
      offset += x.dims.rows;
    }
  }
};

template <class T>
struct slice_cols_entry {
  operand<T> x;
  std::uint32_t out;
  int begin, count;
  template <class TapeT>
  void backward(TapeT& t) const {
    using B = typename TapeT::backend_type;
    const T* g = t.adjoint_if(out);
    if (!g) return;
    T* dx = t.adjoint_of(x) + static_cast<long>(begin) * x.dims.rows;
    B::for_each_2d(shape{x.dims.rows, count}, copy_block<T>{dx, x.dims.rows, g, x.dims.rows, true});
  }
};

template <class T>
struct concat_cols_entry {
  const operand<T>* parts;
  std::uint32_t count;
  std::uint32_t out;
  template <class TapeT>
  void backward(TapeT& t) const {
    using B = typename TapeT::backend_type;
    const T* g = t.adjoint_if(out);
    if (!g) return;
    for (std::uint32_t p = 0; p < count; ++p) {
      const operand<T>& x = parts[p];
      if (T* dx = t.adjoint_of(x)) B::for_each_2d(x.dims, copy_block<T>{dx, x.dims.rows, g, x.dims.rows, true});
      g += x.dims.size();
    }
  }
};

/// out(r, j) = x(r, ids[j]).
template <class T>
struct gather_column_block {
  T* out;
  const T* x;
  const int* ids;
  int rows;
  CKPT_HOST_DEVICE void operator()(int r, int j) const {
    out[r + static_cast<long>(j) * rows] = x[r + static_cast<long>(ids[j]) * rows];
  }
};

/// dx(r, v) += the sum of g(r, j) over the columns j that took column v, in increasing j, in
/// accumulator_t<T>, rounded once. Element (r, k) handles the k-th distinct id: the columns
/// that took it are taken[first[k] .. first[k + 1]). No two elements add into one place, so
/// the result does not depend on the order in which a backend runs them.
template <class T>
struct scatter_column_block {
  T* dx;
  const T* g;
  const int* distinct;
  const int* first;
  const int* taken;
  int rows;
  CKPT_HOST_DEVICE void operator()(int r, int k) const {
    accumulator_t<T> total(0);
    for (int p = first[k]; p < first[k + 1]; ++p) total += static_cast<accumulator_t<T>>(g[r + static_cast<long>(taken[p]) * rows]);
    dx[r + static_cast<long>(distinct[k]) * rows] += static_cast<T>(total);
  }
};

/// The index a gather keeps on the backend, as ints: ids (one per output column), then, for
/// the reverse, the columns sorted by id (`taken`, increasing within an id), where each
/// distinct id's columns begin (`first`, one more than there are distinct ids) and the
/// distinct ids.
struct gather_index {
  std::vector<int> words;
  int columns = 0, distinct = 0;

  void build(std::span<const int> ids, bool reverse) {
    columns = static_cast<int>(ids.size());
    words.assign(ids.begin(), ids.end());
    distinct = 0;
    if (!reverse) return;
    by_id_.resize(ids.size());
    for (int j = 0; j < columns; ++j) by_id_[static_cast<std::size_t>(j)] = {ids[static_cast<std::size_t>(j)], j};
    std::sort(by_id_.begin(), by_id_.end());
    words.resize(static_cast<std::size_t>(2 * columns));
    first_.clear();
    distinct_ids_.clear();
    for (int p = 0; p < columns; ++p) {
      const auto [id, j] = by_id_[static_cast<std::size_t>(p)];
      words[static_cast<std::size_t>(columns + p)] = j;
      if (p == 0 || id != by_id_[static_cast<std::size_t>(p - 1)].first) {
        first_.push_back(p);
        distinct_ids_.push_back(id);
      }
    }
    first_.push_back(columns);
    distinct = static_cast<int>(distinct_ids_.size());
    words.insert(words.end(), first_.begin(), first_.end());
    words.insert(words.end(), distinct_ids_.begin(), distinct_ids_.end());
  }

 private:
  // Working space kept between calls (the index is thread_local): a training step's lookups
  // allocate nothing once their sizes have been seen.
  std::vector<std::pair<int, int>> by_id_;
  std::vector<int> first_, distinct_ids_;
};

template <class T>
struct gather_cols_entry {
  operand<T> x;
  std::uint32_t index;  // the node whose buffer holds the gather_index words
  std::uint32_t out;
  int columns, distinct;
  template <class TapeT>
  void backward(TapeT& t) const {
    using B = typename TapeT::backend_type;
    const T* g = t.adjoint_if(out);
    if (!g) return;
    const int* ids = reinterpret_cast<const int*>(static_cast<const void*>(t.node(index).value));
    const int* taken = ids + columns;
    const int* first = taken + columns;
    B::for_each_2d(shape{x.dims.rows, distinct}, scatter_column_block<T>{t.adjoint_of(x), g, first + distinct + 1, first, taken, x.dims.rows});
  }
};

}  // namespace detail

template <class X>
template <class T, Backend B>
transposed<X>::operator Var<T, B>() const {
  return detail::record_transpose(detail::resolve(x_, "transpose"));
}
template <class T, Backend B>
transposed<Parameter<T, B>>::operator Var<T, B>() const {
  throw tape_error("transpose: a parameter is not on a tape; use transpose(tape.param(p)) or pass it to matmul");
}

/// Records `transpose(x)` as a Var.
template <class X>
auto eval(const transposed<X>& t) {
  return detail::record_transpose(detail::resolve(t.inner(), "transpose"));
}

/// Rows [begin, begin + count) of x.
template <expr::Operand X>
auto slice_rows(X&& xin, int begin, int count) {
  const shape s = detail::shape_of(xin, "slice_rows");
  if (begin < 0 || count < 0 || begin + count > s.rows)
    throw shape_error(detail::cat("slice_rows: rows [", begin, ", ", begin + count, ") are outside a ", s, " tensor"));
  auto x = detail::resolve(xin, "slice_rows");
  auto& t = detail::tape_of(x, "slice_rows");
  using T = typename std::remove_reference_t<decltype(t)>::value_type;
  const std::uint32_t first = static_cast<std::uint32_t>(t.node_count());
  const std::uint32_t out = t.new_output({count, s.cols}, "slice_rows", op_kind::layout, x.ref.requires_grad);
  using B = typename std::remove_reference_t<decltype(t)>::backend_type;
  if (!t.is_replayed(out))
    B::for_each_2d(shape{count, s.cols}, detail::copy_block<T>{t.node(out).value, count, x.ref.value + begin, s.rows, false});
  if (x.ref.requires_grad) t.push_entry(detail::slice_rows_entry<T>{x.ref, out, begin, count}, first);
  return t.var_of(out);
}

/// Columns [begin, begin + count) of x (e.g. one sequence of a batch).
template <expr::Operand X>
auto slice_cols(X&& xin, int begin, int count) {
  const shape s = detail::shape_of(xin, "slice_cols");
  if (begin < 0 || count < 0 || begin + count > s.cols)
    throw shape_error(detail::cat("slice_cols: columns [", begin, ", ", begin + count, ") are outside a ", s, " tensor"));
  auto x = detail::resolve(xin, "slice_cols");
  auto& t = detail::tape_of(x, "slice_cols");
  using T = typename std::remove_reference_t<decltype(t)>::value_type;
  using Bk = typename std::remove_reference_t<decltype(t)>::backend_type;
  const std::uint32_t first = static_cast<std::uint32_t>(t.node_count());
  const std::uint32_t out = t.new_output({s.rows, count}, "slice_cols", op_kind::layout, x.ref.requires_grad);
  if (!t.is_replayed(out)) Bk::copy(t.node(out).value, x.ref.value + static_cast<long>(begin) * s.rows, static_cast<long>(count) * s.rows);
  if (x.ref.requires_grad) t.push_entry(detail::slice_cols_entry<T>{x.ref, out, begin, count}, first);
  return t.var_of(out);
}

namespace detail {

/// Throws unless every id picks a column of an `s` tensor; `op` names the op in the message.
inline void check_gather_ids(shape s, std::span<const int> ids, const char* op) {
  if (ids.size() > static_cast<std::size_t>(std::numeric_limits<int>::max() / 4 - 1))  // the index holds up to 4 n + 1 ints
    throw shape_error(cat(op, ": ", ids.size(), " ids are more than its index can hold (", std::numeric_limits<int>::max() / 4 - 1, ")"));
  for (std::size_t j = 0; j < ids.size(); ++j)
    if (ids[j] < 0 || ids[j] >= s.cols)
      throw shape_error(cat(op, ": id ", ids[j], " of column ", j, " is outside [0, ", s.cols, ") for a ", s, " tensor"));
}

/// gather_cols, with the op name its errors give (nn::Embedding says "embedding").
template <class X>
auto record_gather(X&& xin, std::span<const int> ids, const char* op) {
  const shape s = shape_of(xin, op);
  check_gather_ids(s, ids, op);
  auto x = resolve(std::forward<X>(xin), op);
  auto& t = tape_of(x, op);
  using T = typename std::remove_reference_t<decltype(t)>::value_type;
  using B = typename std::remove_reference_t<decltype(t)>::backend_type;
  static_assert(sizeof(T) >= sizeof(int));
  const bool grad = x.ref.requires_grad;
  thread_local gather_index index;
  index.build(ids, grad);
  const std::uint32_t first = static_cast<std::uint32_t>(t.node_count());
  // The index goes to the backend as cross_entropy's labels do: the kernels read it there.
  const long words = static_cast<long>((index.words.size() * sizeof(int) + sizeof(T) - 1) / sizeof(T));
  const kept_for_reverse<T, B> stored(t, {1, static_cast<int>(words)}, "gather_cols.index", op_kind::layout, grad);
  int* index_buffer = stored.template data<int>();
  B::from_host(index_buffer, index.words.data(), static_cast<long>(index.words.size()));
  const int n = index.columns;
  const std::uint32_t out = t.new_output({s.rows, n}, "gather_cols", op_kind::layout, grad);
  if (!t.is_replayed(out)) B::for_each_2d(shape{s.rows, n}, gather_column_block<T>{t.node(out).value, x.ref.value, index_buffer, s.rows});
  t.set_consumable(out);  // the reverse reads the index, never the gathered values
  if (grad) t.push_entry(gather_cols_entry<T>{x.ref, stored.node(), out, n, index.distinct}, first);
  return t.var_of(out);
}
}  // namespace detail

/// Columns of x picked by index: out(:, j) = x(:, ids[j]), one id in [0, x.cols()) per output
/// column; ids may repeat. With x a features x vocabulary table, this is an embedding lookup:
/// `gather_cols(tape.param(E), tokens)` (nn::Embedding wraps it). The reverse adds each output
/// column's adjoint into the column it came from; a column taken several times gets the sum
/// of its adjoints in increasing j, in double for float tensors (see detail/accumulate.hpp),
/// so repeated ids give the same bits on every backend and in every re-trace.
template <expr::Operand X>
auto gather_cols(X&& x, std::span<const int> ids) {
  return detail::record_gather(std::forward<X>(x), ids, "gather_cols");
}
template <expr::Operand X>
auto gather_cols(X&& x, const std::vector<int>& ids) {
  return gather_cols(std::forward<X>(x), std::span<const int>(ids));
}
template <expr::Operand X>
auto gather_cols(X&& x, std::initializer_list<int> ids) {
  return gather_cols(std::forward<X>(x), std::span<const int>(ids.begin(), ids.size()));
}

namespace detail {

/// The parts of a concatenation, validated: one tape, equal extent along the other dimension.
template <class T, class B>
struct gathered_parts {
  Tape<T, B>* tape = nullptr;
  std::vector<operand<T>> refs;
  shape out;
  bool grad = false;
};

template <class T, class B>
gathered_parts<T, B> gather_parts(std::span<const Var<T, B>> parts, const char* op, bool stack_rows) {
  if (parts.empty()) throw shape_error(cat(op, ": no tensors to concatenate"));
  gathered_parts<T, B> g;
  g.tape = parts[0].tape();
  g.refs.reserve(parts.size());
  shape first;  // taken from the first part once resolve() has validated it ("<op>: the Var is empty")
  for (const auto& p : parts) {
    auto r = resolve(p, op);
    if (g.refs.empty()) {
      first = r.ref.dims;
      g.out = stack_rows ? shape{0, first.cols} : shape{first.rows, 0};
    }
    g.tape = expr::common_tape(g.tape, r.tape, op);
    if (stack_rows ? r.ref.dims.cols != first.cols : r.ref.dims.rows != first.rows) {
      std::string shapes;
      for (const auto& q : parts) shapes += cat(q.dims(), " ");
      throw shape_error(cat(op, stack_rows ? ": column counts differ: " : ": row counts differ: ", shapes));
    }
    (stack_rows ? g.out.rows : g.out.cols) += stack_rows ? r.ref.dims.rows : r.ref.dims.cols;
    g.grad = g.grad || r.ref.requires_grad;
    g.refs.push_back(r.ref);
  }
  return g;
}

/// Copies the parts' references into the tape's record arena for the entry.
template <class T, class B>
const operand<T>* store_parts(Tape<T, B>& t, const std::vector<operand<T>>& refs) {
  auto* stored = t.template make_array<operand<T>>(refs.size());
  for (std::size_t i = 0; i < refs.size(); ++i) stored[i] = refs[i];
  return stored;
}

}  // namespace detail

/// Places tensors with equal row counts side by side.
template <class T, Backend B>
Var<T, B> concat_cols(std::span<const Var<T, B>> parts) {
  auto g = detail::gather_parts(parts, "concat_cols", false);
  Tape<T, B>& t = *g.tape;
  const std::uint32_t first = static_cast<std::uint32_t>(t.node_count());
  const std::uint32_t out = t.new_output(g.out, "concat_cols", op_kind::layout, g.grad);
  if (!t.is_replayed(out)) {
    T* y = t.node(out).value;
    for (const auto& x : g.refs) {
      B::copy(y, x.value, x.dims.size());
      y += x.dims.size();
    }
  }
  if (g.grad)
    t.push_entry(detail::concat_cols_entry<T>{detail::store_parts(t, g.refs), static_cast<std::uint32_t>(g.refs.size()), out}, first);
  return t.var_of(out);
}
template <class T, Backend B>
Var<T, B> concat_cols(std::initializer_list<Var<T, B>> parts) {
  return concat_cols(std::span<const Var<T, B>>(parts.begin(), parts.size()));
}
template <class T, Backend B>
Var<T, B> concat_cols(const std::vector<Var<T, B>>& parts) {
  return concat_cols(std::span<const Var<T, B>>(parts));
}

/// Stacks tensors with equal column counts on top of each other.
template <class T, Backend B>
Var<T, B> concat_rows(std::span<const Var<T, B>> parts) {
  auto g = detail::gather_parts(parts, "concat_rows", true);
  Tape<T, B>& t = *g.tape;
  const int rows = g.out.rows, cols = g.out.cols;
  const std::uint32_t first = static_cast<std::uint32_t>(t.node_count());
  const std::uint32_t out = t.new_output(g.out, "concat_rows", op_kind::layout, g.grad);
  if (!t.is_replayed(out)) {
    T* y = t.node(out).value;
    int offset = 0;
    for (const auto& x : g.refs) {
      B::for_each_2d(x.dims, detail::copy_block<T>{y + offset, rows, x.value, x.dims.rows, false});
      offset += x.dims.rows;
    }
  }
  if (g.grad)
    t.push_entry(detail::concat_rows_entry<T>{detail::store_parts(t, g.refs), static_cast<std::uint32_t>(g.refs.size()), out, rows, cols},
                 first);
  return t.var_of(out);
}
template <class T, Backend B>
Var<T, B> concat_rows(std::initializer_list<Var<T, B>> parts) {
  return concat_rows(std::span<const Var<T, B>>(parts.begin(), parts.size()));
}
template <class T, Backend B>
Var<T, B> concat_rows(const std::vector<Var<T, B>>& parts) {
  return concat_rows(std::span<const Var<T, B>>(parts));
}


// Found by argument-dependent lookup for expression arguments too (expressions live in
// ckpt::expr), so that `tanh(a + b)` means ckpt::tanh without `using namespace ckpt`.
namespace expr {
using ckpt::transpose, ckpt::slice_rows, ckpt::slice_cols, ckpt::gather_cols;
}  // namespace expr

}  // namespace ckpt
