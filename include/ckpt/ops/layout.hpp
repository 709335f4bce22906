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
using ckpt::transpose, ckpt::slice_rows, ckpt::slice_cols;
}  // namespace expr

}  // namespace ckpt
