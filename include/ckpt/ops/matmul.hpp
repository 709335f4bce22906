// ckpt — matrix products. One entry each; the reverse is exactly two GEMMs, or one when an
// operand needs no gradient (a constant or a frozen parameter). `transpose(x)` passed to
// matmul is free: it only flips the GEMM's transpose flag.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/ops/layout.hpp"
#include "ckpt/ops/operand.hpp"

#include <utility>

namespace ckpt {

namespace detail {

template <class T>
struct matmul_entry {
  operand<T> a, b;
  std::uint32_t out;
  int m, n, k;
  bool ta, tb;

  template <class TapeT>
  void backward(TapeT& t) const {
    using B = typename TapeT::backend_type;
    const T* g = t.adjoint_if(out);
    if (!g) return;
    const int lda = a.dims.rows, ldb = b.dims.rows;
    if (T* da = t.adjoint_of(a)) {
      ++t.counters().gemms;
      if (!ta)
        B::gemm(false, !tb, m, k, n, T(1), g, m, b.value, ldb, T(1), da, m);
      else
        B::gemm(tb, true, k, m, n, T(1), b.value, ldb, g, m, T(1), da, k);
    }
    if (T* db = t.adjoint_of(b)) {
      ++t.counters().gemms;
      if (!tb)
        B::gemm(!ta, false, k, n, m, T(1), a.value, lda, g, m, T(1), db, k);
      else
        B::gemm(true, ta, n, k, m, T(1), g, m, a.value, lda, T(1), db, n);
    }
  }
};

template <class X>
struct unwrap_transposed {
  static constexpr bool flag = false;
  template <class Y>
  static Y&& get(Y&& x) {
    return std::forward<Y>(x);
  }
};
template <class X>
struct unwrap_transposed<transposed<X>> {
  static constexpr bool flag = true;
  static decltype(auto) get(const transposed<X>& t) { return t.inner(); }
};

}  // namespace detail

/// op(a) * op(b), where op is the identity or, for `transpose(x)`, the transpose.
template <class L, class R>
  requires(expr::Operand<L> || is_transposed_v<L>) && (expr::Operand<R> || is_transposed_v<R>)
auto matmul(L&& lhs, R&& rhs) {
  using UL = detail::unwrap_transposed<std::remove_cvref_t<L>>;
  using UR = detail::unwrap_transposed<std::remove_cvref_t<R>>;
  constexpr bool ta = UL::flag, tb = UR::flag;
  // Shapes first: an expression operand is recorded only once the product is known to fit.
  const shape sa = detail::shape_of(UL::get(lhs), "matmul"), sb = detail::shape_of(UR::get(rhs), "matmul");
  const int m = ta ? sa.cols : sa.rows;
  const int k = ta ? sa.rows : sa.cols;
  const int kb = tb ? sb.cols : sb.rows;
  const int n = tb ? sb.rows : sb.cols;
  if (k != kb)
    throw shape_error(detail::cat("matmul: inner dimensions differ: ", ta ? "transpose(" : "(", sa, ") * ",
                                  tb ? "transpose(" : "(", sb, ")"));
  auto a = detail::resolve(UL::get(std::forward<L>(lhs)), "matmul");
  auto b = detail::resolve(UR::get(std::forward<R>(rhs)), "matmul");
  auto& t = detail::shared_tape("matmul", a, b);
  using T = typename std::remove_reference_t<decltype(t)>::value_type;
  const bool grad = a.ref.requires_grad || b.ref.requires_grad;
  const std::uint32_t begin = static_cast<std::uint32_t>(t.node_count());
  const std::uint32_t out = t.new_output({m, n}, "matmul", op_kind::matmul, grad);
  using Bk = typename std::remove_reference_t<decltype(t)>::backend_type;
  if (!t.is_replayed(out)) {
    ++t.counters().gemms;
    Bk::gemm(ta, tb, m, n, k, T(1), a.ref.value, a.ref.dims.rows, b.ref.value, b.ref.dims.rows, T(0), t.node(out).value, m);
  }
  if (grad) t.push_entry(detail::matmul_entry<T>{a.ref, b.ref, out, m, n, k, ta, tb}, begin);
  t.set_consumable(out);  // the reverse reads the operands, never the product
  return t.var_of(out);
}


// Found by argument-dependent lookup for expression arguments too (expressions live in
// ckpt::expr), so that `tanh(a + b)` means ckpt::tanh without `using namespace ckpt`.
namespace expr {
using ckpt::matmul;
}  // namespace expr

}  // namespace ckpt
