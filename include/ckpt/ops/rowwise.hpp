// ckpt — ops along the feature dimension of each column (sample): softmax, log-softmax,
// layer norm and RMS norm. One entry each; normalisations keep a small statistics tensor.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/ops/operand.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace ckpt {

namespace detail {

template <class T>
struct softmax_entry {
  operand<T> x;
  std::uint32_t out;
  bool log;
  template <class TapeT>
  void backward(TapeT& t) const {
    const T* g = t.adjoint_if(out);
    if (!g) return;
    T* dx = t.adjoint_of(x);
    const T* y = t.node(out).value;
    const int r = x.dims.rows;
    for (int j = 0; j < x.dims.cols; ++j) {
      const long o = static_cast<long>(j) * r;
      if (log) {
        T gs(0);
        for (int i = 0; i < r; ++i) gs += g[o + i];
        for (int i = 0; i < r; ++i) dx[o + i] += g[o + i] - std::exp(y[o + i]) * gs;
      } else {
        T dot(0);
        for (int i = 0; i < r; ++i) dot += g[o + i] * y[o + i];
        for (int i = 0; i < r; ++i) dx[o + i] += y[o + i] * (g[o + i] - dot);
      }
    }
  }
};

template <class T, class B>
Var<T, B> softmax_impl(const resolved<T, B>& x, bool log) {
  const char* op = log ? "log_softmax" : "softmax";
  Tape<T, B>& t = tape_of(x, op);
  const shape s = x.ref.dims;
  const std::uint32_t begin = static_cast<std::uint32_t>(t.node_count());
  const std::uint32_t out = t.new_output(s, op, op_kind::rowwise, x.ref.requires_grad);
  if (!t.is_replayed(out)) {
    T* y = t.node(out).value;
    const T* in = x.ref.value;
    for (int j = 0; j < s.cols; ++j) {
      const long o = static_cast<long>(j) * s.rows;
      T mx = -std::numeric_limits<T>::infinity();
      for (int i = 0; i < s.rows; ++i) mx = std::max(mx, in[o + i]);
      T sum(0);
      for (int i = 0; i < s.rows; ++i) sum += std::exp(in[o + i] - mx);
      if (log) {
        const T lse = mx + std::log(sum);
        for (int i = 0; i < s.rows; ++i) y[o + i] = in[o + i] - lse;
      } else {
        for (int i = 0; i < s.rows; ++i) y[o + i] = std::exp(in[o + i] - mx) / sum;
      }
    }
  }
  if (x.ref.requires_grad) t.push_entry(softmax_entry<T>{x.ref, out, log}, begin);
  return t.var_of(out);
}

/// Shared by layer_norm (centred) and rms_norm (not centred).
template <class T>
struct norm_entry {
  operand<T> x, gain, bias;  // bias.value is null when absent
  std::uint32_t out, stats;
  bool centred;
  template <class TapeT>
  void backward(TapeT& t) const {
    const T* g = t.adjoint_if(out);
    if (!g) return;
    T* dx = t.adjoint_of(x);
    T* dgain = t.adjoint_of(gain);
    T* dbias = bias.value ? t.adjoint_of(bias) : nullptr;
    const T* st = t.node(stats).value;
    const int r = x.dims.rows;
    const T inv_r = T(1) / static_cast<T>(r);
    for (int j = 0; j < x.dims.cols; ++j) {
      const long o = static_cast<long>(j) * r;
      const T mu = centred ? st[2 * j] : T(0), rstd = st[2 * j + 1];
      T sum_d(0), sum_dx(0);
      for (int i = 0; i < r; ++i) {
        const T xhat = (x.value[o + i] - mu) * rstd;
        const T d = g[o + i] * gain.value[i];
        sum_d += d;
        sum_dx += d * xhat;
        if (dgain) dgain[i] += g[o + i] * xhat;
        if (dbias) dbias[i] += g[o + i];
      }
      if (!dx) continue;
      const T mean_d = centred ? sum_d * inv_r : T(0), mean_dx = sum_dx * inv_r;
      for (int i = 0; i < r; ++i) {
        const T xhat = (x.value[o + i] - mu) * rstd;
        dx[o + i] += rstd * (g[o + i] * gain.value[i] - mean_d - xhat * mean_dx);
      }
    }
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
  const std::uint32_t stats = t.new_output({2, s.cols}, centred ? "layer_norm.stats" : "rms_norm.stats", op_kind::rowwise, false, false);
  const std::uint32_t out = t.new_output(s, op, op_kind::rowwise, grad, false);
  T* st = t.node(stats).value;
  T* y = t.node(out).value;
  const T* in = x.ref.value;
  const T inv_r = T(1) / static_cast<T>(s.rows);
  for (int j = 0; j < s.cols; ++j) {
    const long o = static_cast<long>(j) * s.rows;
    T mu(0);
    if (centred) {
      for (int i = 0; i < s.rows; ++i) mu += in[o + i];
      mu *= inv_r;
    }
    T var(0);
    for (int i = 0; i < s.rows; ++i) var += (in[o + i] - mu) * (in[o + i] - mu);
    const T rstd = T(1) / std::sqrt(var * inv_r + eps);
    st[2 * j] = mu;
    st[2 * j + 1] = rstd;
    for (int i = 0; i < s.rows; ++i)
      y[o + i] = gain.ref.value[i] * ((in[o + i] - mu) * rstd) + (bias ? bias->ref.value[i] : T(0));
  }
  if (grad) t.push_entry(norm_entry<T>{x.ref, gain.ref, bias ? bias->ref : operand<T>{}, out, stats, centred}, begin);
  return t.var_of(out);
}

}  // namespace detail

/// softmax over the features (rows) of each column.
template <expr::Operand X>
auto softmax(X&& x) {
  return detail::softmax_impl(detail::resolve(x, "softmax"), false);
}

/// log(softmax(x)), computed stably.
template <expr::Operand X>
auto log_softmax(X&& x) {
  return detail::softmax_impl(detail::resolve(x, "log_softmax"), true);
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
