// ckpt — ops along the feature dimension of each column (sample): softmax, log-softmax,
// layer norm and RMS norm. One entry each; normalisations keep a small statistics tensor.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/detail/accumulate.hpp"
#include "ckpt/ops/operand.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace ckpt {

namespace detail {

// Column-wise work runs through B::for_each_column: each column is taken by a group of lanes
// (one on the CPU, a warp on CUDA), lane l taking rows l, l + width, ...; a column's sums go
// through detail::column_sum (on the CPU in eight interleaved partial sums, on CUDA each lane's
// rows in order, then the warp's tree), its maxima through column_max. What sums over the batch
// (a gain's or bias's gradient) goes through add_row_sums.
// Bodies are functors, so the CUDA backend runs them as kernels.
//
// A column's sums accumulate in accumulator_t<T> (double for float tensors) and are rounded to
// T once: a float accumulator over a 65536-feature column (a vocabulary) drifted by 7e-5
// relative in softmax, and by 2e-3 over a million features; in double the result is within
// a few float ulps at any length. The terms themselves are computed in T.

/// The largest of x[0..rows) as fn::max_ takes it (NaNs skipped; -inf for none), for every lane.
/// One lane keeps eight partial maxima, which vectorise, where one running maximum was a chain of
/// dependent compares (4 cycles an element: 99 % of cross-entropy's forward over 32 000
/// classes). The value is the serial one: a maximum does not depend on the order, but for which
/// of +0 and -0 a tie keeps, and neither exp(x - max) nor max + log(sum) can tell them apart.
template <class T, class Lanes>
CKPT_HOST_DEVICE T column_max(const T* x, int rows, const Lanes& lanes) {
  constexpr int parts = reduction_lanes;
  if constexpr (single_lane<Lanes>) {
    T part[parts];
    for (int l = 0; l < parts; ++l) part[l] = -fn::infinity<T>();
    int i = 0;
    for (; i + parts <= rows; i += parts)
      for (int l = 0; l < parts; ++l) part[l] = fn::max_(part[l], x[i + l]);
    for (int l = 0; i < rows; ++i, ++l) part[l] = fn::max_(part[l], x[i]);
    T mx = part[0];
    for (int l = 1; l < parts; ++l) mx = fn::max_(mx, part[l]);
    return mx;
  } else {
    T mx = -fn::infinity<T>();
    for (int i = lanes.lane(); i < rows; i += lanes.width()) mx = fn::max_(mx, x[i]);
    return lanes.max(mx);
  }
}

/// log(sum_i exp(x_i)) of one column, stably (the column's maximum taken out first; mx and
/// sum are left for the caller).
template <class T, class Lanes>
CKPT_HOST_DEVICE T column_logsumexp(const T* in, int rows, const Lanes& lanes, T& mx, T& sum) {
  mx = column_max(in, rows, lanes);
  const accumulator_t<T> total = column_sum<T>(rows, lanes, [in, mx](int i) { return fn::exp_(in[i] - mx); });
  sum = static_cast<T>(total);
  return mx + static_cast<T>(fn::log_(total));
}

template <class T>
struct softmax_forward {
  const T* in;
  T* y;
  int rows;
  bool log;
  template <class Lanes>
  CKPT_HOST_DEVICE void operator()(long j, const Lanes& lanes) const {
    const long o = j * rows;
    if (log) {
      T mx, sum;
      const T lse = column_logsumexp(in + o, rows, lanes, mx, sum);
      for (int i = lanes.lane(); i < rows; i += lanes.width()) y[o + i] = in[o + i] - lse;
      return;
    }
    // column_logsumexp's max and sum, with each exp(x - max) kept in y for the division: one
    // exp per element instead of two (the exps were a third of a causal attention layer's
    // step on the CPU), and the same values, summed as column_logsumexp sums them.
    const T* x = in + o;
    T* out = y + o;
    const T mx = column_max(x, rows, lanes);
    const T sum = static_cast<T>(column_sum<T>(rows, lanes, [x, out, mx](int i) {
      const T e = fn::exp_(x[i] - mx);
      out[i] = e;
      return e;
    }));
    for (int i = lanes.lane(); i < rows; i += lanes.width()) y[o + i] = y[o + i] / sum;
  }
};

template <class T>
struct softmax_reverse {
  const T* g;
  const T* y;
  T* dx;
  int rows;
  bool log;
  template <class Lanes>
  CKPT_HOST_DEVICE void operator()(long j, const Lanes& lanes) const {
    const long o = j * rows;
    const T* gj = g + o;
    const T* yj = y + o;
    if (log) {
      const T gs = static_cast<T>(column_sum<T>(rows, lanes, [gj](int i) { return gj[i]; }));
      for (int i = lanes.lane(); i < rows; i += lanes.width()) dx[o + i] += g[o + i] - fn::exp_(y[o + i]) * gs;
    } else {
      const T dot = static_cast<T>(column_sum<T>(rows, lanes, [gj, yj](int i) { return gj[i] * yj[i]; }));
      for (int i = lanes.lane(); i < rows; i += lanes.width()) dx[o + i] += y[o + i] * (g[o + i] - dot);
    }
  }
};

template <class T>
struct softmax_entry {
  operand<T> x;
  std::uint32_t out;
  bool log;
  template <class TapeT>
  void backward(TapeT& t) const {
    using B = typename TapeT::backend_type;
    const T* g = t.adjoint_if(out);
    if (!g) return;
    B::for_each_column(x.dims, softmax_reverse<T>{g, t.node(out).value, t.adjoint_of(x), x.dims.rows, log});
  }
};

template <class T, class B>
Var<T, B> softmax_impl(const resolved<T, B>& x, bool log) {
  const char* op = log ? "log_softmax" : "softmax";
  Tape<T, B>& t = tape_of(x, op);
  const shape s = x.ref.dims;
  const std::uint32_t begin = static_cast<std::uint32_t>(t.node_count());
  const std::uint32_t out = t.new_output(s, op, op_kind::rowwise, x.ref.requires_grad);
  if (!t.is_replayed(out)) B::for_each_column(s, softmax_forward<T>{x.ref.value, t.node(out).value, s.rows, log});
  if (x.ref.requires_grad) t.push_entry(softmax_entry<T>{x.ref, out, log}, begin);
  return t.var_of(out);
}

/// Normalises column j: stats (mean, 1/std) and y = gain * xhat + bias.
template <class T>
struct norm_forward {
  const T* in;
  const T* gain;
  const T* bias;  // null when absent
  T* y;
  T* st;
  int rows;
  T eps;
  bool centred;
  template <class Lanes>
  CKPT_HOST_DEVICE void operator()(long j, const Lanes& lanes) const {
    const long o = j * rows;
    const T* x = in + o;
    const T mu = centred ? static_cast<T>(column_sum<T>(rows, lanes, [x](int i) { return x[i]; }) / rows) : T(0);
    const T var = static_cast<T>(column_sum<T>(rows, lanes, [x, mu](int i) { return (x[i] - mu) * (x[i] - mu); }) / rows);
    const T rstd = T(1) / fn::sqrt_(var + eps);
    if (lanes.lane() == 0) {
      st[2 * j] = mu;
      st[2 * j + 1] = rstd;
    }
    for (int i = lanes.lane(); i < rows; i += lanes.width()) y[o + i] = gain[i] * ((in[o + i] - mu) * rstd) + (bias ? bias[i] : T(0));
  }
};

/// dx of column j.
template <class T>
struct norm_reverse_input {
  const T* g;
  const T* x;
  const T* gain;
  const T* st;
  T* dx;
  int rows;
  bool centred;
  template <class Lanes>
  CKPT_HOST_DEVICE void operator()(long j, const Lanes& lanes) const {
    const long o = j * rows;
    const T mu = centred ? st[2 * j] : T(0), rstd = st[2 * j + 1];
    const T* gj = g + o;
    const T* xj = x + o;
    const T* gn = gain;
    const T mean_d = centred ? static_cast<T>(column_sum<T>(rows, lanes, [gj, gn](int i) { return gj[i] * gn[i]; }) / rows) : T(0);
    const T mean_dx = static_cast<T>(
        column_sum<T>(rows, lanes, [gj, gn, xj, mu, rstd](int i) { return (gj[i] * gn[i]) * ((xj[i] - mu) * rstd); }) / rows);
    for (int i = lanes.lane(); i < rows; i += lanes.width()) {
      const T xhat = (x[o + i] - mu) * rstd;
      dx[o + i] += rstd * (g[o + i] * gain[i] - mean_d - xhat * mean_dx);
    }
  }
};

/// Column j's share of d gain(i): g(i, j) xhat(i, j).
template <class T>
struct norm_gain_term {
  const T* g;
  const T* x;
  const T* st;
  int rows;
  bool centred;
  CKPT_HOST_DEVICE T operator()(int i, int j) const {
    const long k = i + static_cast<long>(j) * rows;
    const T mu = centred ? st[2 * j] : T(0), rstd = st[2 * j + 1];
    return g[k] * ((x[k] - mu) * rstd);
  }
};
/// Element (i, j) of a column-major rows-row matrix: a bias's share from column j.
template <class T>
struct element_term {
  const T* g;
  int rows;
  CKPT_HOST_DEVICE T operator()(int i, int j) const { return g[i + static_cast<long>(j) * rows]; }
};

/// Shared by layer_norm (centred) and rms_norm (not centred).
template <class T>
struct norm_entry {
  operand<T> x, gain, bias;  // bias.value is null when absent
  std::uint32_t out, stats;
  bool centred;
  template <class TapeT>
  void backward(TapeT& t) const {
    using B = typename TapeT::backend_type;
    const T* g = t.adjoint_if(out);
    if (!g) return;
    T* dx = t.adjoint_of(x);
    T* dgain = t.adjoint_of(gain);
    T* dbias = bias.value ? t.adjoint_of(bias) : nullptr;
    const T* st = t.node(stats).value;
    const int r = x.dims.rows;
    if (dgain) B::add_row_sums(dgain, x.dims, norm_gain_term<T>{g, x.value, st, r, centred});
    if (dbias) B::add_row_sums(dbias, x.dims, element_term<T>{g, r});
    if (dx) B::for_each_column(x.dims, norm_reverse_input<T>{g, x.value, gain.value, st, dx, r, centred});
  }
};

inline void check_norm(const char* op, shape s, shape gain, const shape* bias) {
  if (gain != shape{s.rows, 1}) throw shape_error(cat(op, ": gain must be ", shape{s.rows, 1}, " for input ", s, ", got ", gain));
  if (bias && *bias != shape{s.rows, 1})
    throw shape_error(cat(op, ": bias must be ", shape{s.rows, 1}, " for input ", s, ", got ", *bias));
}

template <class T, class B>
Var<T, B> norm_impl(const resolved<T, B>& x, const resolved<T, B>& gain, const resolved<T, B>* bias, T eps, bool centred) {
  const char* op = centred ? "layer_norm" : "rms_norm";
  Tape<T, B>& t = tape_of(x, op);
  const shape s = x.ref.dims;
  check_norm(op, s, gain.ref.dims, bias ? &bias->ref.dims : nullptr);
  (void)expr::common_tape(x.tape, gain.tape, op);
  if (bias) (void)expr::common_tape(x.tape, bias->tape, op);
  const bool grad = x.ref.requires_grad || gain.ref.requires_grad || (bias && bias->ref.requires_grad);
  const std::uint32_t begin = static_cast<std::uint32_t>(t.node_count());
  const kept_for_reverse<T, B> stats(t, {2, s.cols}, centred ? "layer_norm.stats" : "rms_norm.stats", op_kind::rowwise, grad);
  const std::uint32_t out = t.new_output(s, op, op_kind::rowwise, grad, false);
  B::for_each_column(s, norm_forward<T>{x.ref.value, gain.ref.value, bias ? bias->ref.value : nullptr, t.node(out).value,
                                      stats.data(), s.rows, eps, centred});
  if (grad) t.push_entry(norm_entry<T>{x.ref, gain.ref, bias ? bias->ref : operand<T>{}, out, stats.node(), centred}, begin);
  return t.var_of(out);
}

}  // namespace detail

/// softmax over the features (rows) of each column. Its reverse reads only its output, so a
/// Var passed as a temporary (`softmax(matmul(...))`) is freed once the softmax is computed.
template <expr::Operand X>
auto softmax(X&& x) {
  const auto r = detail::resolve(x, "softmax");
  auto y = detail::softmax_impl(r, false);
  detail::consume_if_temporary<X>(r);
  return y;
}

/// log(softmax(x)), computed stably; a temporary input is freed as softmax's is.
template <expr::Operand X>
auto log_softmax(X&& x) {
  const auto r = detail::resolve(x, "log_softmax");
  auto y = detail::softmax_impl(r, true);
  detail::consume_if_temporary<X>(r);
  return y;
}

/// Layer norm over the features of each column, with gain and bias (rows x 1 each).
template <expr::Operand X, expr::Operand G, expr::Operand Bi>
auto layer_norm(X&& x, G&& gain, Bi&& bias, double eps = 1e-5) {
  // Shapes first: expression operands are recorded only once they are known to fit.
  const shape sb = detail::shape_of(bias, "layer_norm");
  detail::check_norm("layer_norm", detail::shape_of(x, "layer_norm"), detail::shape_of(gain, "layer_norm"), &sb);
  auto rx = detail::resolve(x, "layer_norm");
  auto rg = detail::resolve(gain, "layer_norm");
  auto rb = detail::resolve(bias, "layer_norm");
  using T = typename decltype(rx.ref)::value_type;
  return detail::norm_impl(rx, rg, &rb, static_cast<T>(eps), true);
}

/// RMS norm over the features of each column, with gain (rows x 1).
template <expr::Operand X, expr::Operand G>
auto rms_norm(X&& x, G&& gain, double eps = 1e-6) {
  detail::check_norm("rms_norm", detail::shape_of(x, "rms_norm"), detail::shape_of(gain, "rms_norm"), nullptr);
  auto rx = detail::resolve(x, "rms_norm");
  auto rg = detail::resolve(gain, "rms_norm");
  using T = typename decltype(rx.ref)::value_type;
  return detail::norm_impl(rx, rg, static_cast<decltype(&rx)>(nullptr), static_cast<T>(eps), false);
}


// Found by argument-dependent lookup for expression arguments too (expressions live in
// ckpt::expr), so that `tanh(a + b)` means ckpt::tanh without `using namespace ckpt`.
namespace expr {
using ckpt::softmax, ckpt::log_softmax, ckpt::layer_norm, ckpt::rms_norm;
}  // namespace expr

}  // namespace ckpt
