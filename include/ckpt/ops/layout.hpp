// ckpt — layout ops: transpose, row slicing and row concatenation (attention heads).
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/ops/operand.hpp"

#include <initializer_list>
#include <span>
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

template <class T>
struct transpose_entry {
  operand<T> x;
  std::uint32_t out;
  template <class TapeT>
  void backward(TapeT& t) const {
    const T* g = t.adjoint_if(out);
    if (!g) return;
    T* dx = t.adjoint_of(x);
    const int r = x.dims.rows, c = x.dims.cols;
    for (int j = 0; j < c; ++j)
      for (int i = 0; i < r; ++i) dx[i + static_cast<long>(j) * r] += g[j + static_cast<long>(i) * c];
  }
};

template <class T, class B>
Var<T, B> record_transpose(const resolved<T, B>& x) {
  Tape<T, B>& t = tape_of(x, "transpose");
  const int r = x.ref.dims.rows, c = x.ref.dims.cols;
  const std::uint32_t begin = static_cast<std::uint32_t>(t.node_count());
  const std::uint32_t out = t.new_output({c, r}, "transpose", op_kind::layout, x.ref.requires_grad);
  if (!t.is_replayed(out)) {
    T* y = t.node(out).value;
    for (int j = 0; j < c; ++j)
      for (int i = 0; i < r; ++i) y[j + static_cast<long>(i) * c] = x.ref.value[i + static_cast<long>(j) * r];
  }
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
    const T* g = t.adjoint_if(out);
    if (!g) return;
    T* dx = t.adjoint_of(x);
    for (int j = 0; j < x.dims.cols; ++j)
      for (int i = 0; i < count; ++i) dx[begin + i + static_cast<long>(j) * x.dims.rows] += g[i + static_cast<long>(j) * count];
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
    const T* g = t.adjoint_if(out);
    if (!g) return;
    int offset = 0;
    for (std::uint32_t p = 0; p < count; ++p) {
      const operand<T>& x = parts[p];
      if (T* dx = t.adjoint_of(x)) {
        for (int j = 0; j < cols; ++j)
          for (int i = 0; i < x.dims.rows; ++i) dx[i + static_cast<long>(j) * x.dims.rows] += g[offset + i + static_cast<long>(j) * rows];
      }
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
    const T* g = t.adjoint_if(out);
    if (!g) return;
    T* dx = t.adjoint_of(x) + static_cast<long>(begin) * x.dims.rows;
    for (long i = 0, n = static_cast<long>(count) * x.dims.rows; i < n; ++i) dx[i] += g[i];
  }
};

template <class T>
struct concat_cols_entry {
  const operand<T>* parts;
  std::uint32_t count;
  std::uint32_t out;
  template <class TapeT>
  void backward(TapeT& t) const {
    const T* g = t.adjoint_if(out);
    if (!g) return;
    for (std::uint32_t p = 0; p < count; ++p) {
      const operand<T>& x = parts[p];
      const long n = x.dims.size();
      if (T* dx = t.adjoint_of(x))
        for (long i = 0; i < n; ++i) dx[i] += g[i];
      g += n;
    }
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
  if (!t.is_replayed(out)) {
    T* y = t.node(out).value;
    for (int j = 0; j < s.cols; ++j)
      for (int i = 0; i < count; ++i) y[i + static_cast<long>(j) * count] = x.ref.value[begin + i + static_cast<long>(j) * s.rows];
  }
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

/// Places tensors with equal row counts side by side.
template <class T, Backend B>
Var<T, B> concat_cols(std::span<const Var<T, B>> parts) {
  if (parts.empty()) throw shape_error("concat_cols: no tensors to concatenate");
  Tape<T, B>* tape = parts[0].tape();
  std::vector<detail::operand<T>> refs;
  refs.reserve(parts.size());
  int cols = 0;
  bool grad = false;
  for (const auto& p : parts) {
    auto r = detail::resolve(p, "concat_cols");
    tape = expr::common_tape(tape, r.tape, "concat_cols");
    if (r.ref.dims.rows != parts[0].rows()) {
      std::string shapes;
      for (const auto& q : parts) shapes += detail::cat(q.dims(), " ");
      throw shape_error(detail::cat("concat_cols: row counts differ: ", shapes));
    }
    cols += r.ref.dims.cols;
    grad = grad || r.ref.requires_grad;
    refs.push_back(r.ref);
  }
  Tape<T, B>& t = *tape;
  const int rows = parts[0].rows();
  const std::uint32_t first = static_cast<std::uint32_t>(t.node_count());
  const std::uint32_t out = t.new_output({rows, cols}, "concat_cols", op_kind::layout, grad);
  if (!t.is_replayed(out)) {
    T* y = t.node(out).value;
    for (const auto& x : refs) {
      B::copy(y, x.value, x.dims.size());
      y += x.dims.size();
    }
  }
  if (grad) {
    auto* stored = t.template make_array<detail::operand<T>>(refs.size());
    for (std::size_t i = 0; i < refs.size(); ++i) stored[i] = refs[i];
    t.push_entry(detail::concat_cols_entry<T>{stored, static_cast<std::uint32_t>(refs.size()), out}, first);
  }
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
  if (parts.empty()) throw shape_error("concat_rows: no tensors to concatenate");
  Tape<T, B>* tape = parts[0].tape();
  std::vector<detail::operand<T>> refs;
  refs.reserve(parts.size());
  int rows = 0;
  bool grad = false;
  for (const auto& p : parts) {
    auto r = detail::resolve(p, "concat_rows");
    tape = expr::common_tape(tape, r.tape, "concat_rows");
    if (r.ref.dims.cols != parts[0].cols()) {
      std::string shapes;
      for (const auto& q : parts) shapes += detail::cat(q.dims(), " ");
      throw shape_error(detail::cat("concat_rows: column counts differ: ", shapes));
    }
    rows += r.ref.dims.rows;
    grad = grad || r.ref.requires_grad;
    refs.push_back(r.ref);
  }
  Tape<T, B>& t = *tape;
  const int cols = parts[0].cols();
  const std::uint32_t first = static_cast<std::uint32_t>(t.node_count());
  const std::uint32_t out = t.new_output({rows, cols}, "concat_rows", op_kind::layout, grad);
  if (!t.is_replayed(out)) {
    T* y = t.node(out).value;
    int offset = 0;
    for (const auto& x : refs) {
      for (int j = 0; j < cols; ++j)
        for (int i = 0; i < x.dims.rows; ++i) y[offset + i + static_cast<long>(j) * rows] = x.value[i + static_cast<long>(j) * x.dims.rows];
      offset += x.dims.rows;
    }
  }
  if (grad) {
    auto* stored = t.template make_array<detail::operand<T>>(refs.size());
    for (std::size_t i = 0; i < refs.size(); ++i) stored[i] = refs[i];
    t.push_entry(detail::concat_rows_entry<T>{stored, static_cast<std::uint32_t>(refs.size()), out, rows, cols}, first);
  }
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
using ckpt::transpose, ckpt::slice_rows, ckpt::slice_cols;
}  // namespace expr

}  // namespace ckpt
