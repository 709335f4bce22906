// ckpt — optim::Adam: Adam with decoupled weight decay (AdamW), on any backend.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/expr/functors.hpp"
#include "ckpt/optim/params.hpp"

#include <cmath>
#include <limits>
#include <vector>

namespace ckpt::optim {

namespace detail {

/// One Adam step of element i, with the formulas of torch.optim.AdamW (its roundings differ:
/// PyTorch updates m with lerp and divides before scaling):
/// w *= 1 - lr decay; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
/// w -= step_size m / (sqrt(v) / root_c2 + eps), with step_size = lr / (1 - b1^t) and
/// root_c2 = sqrt(1 - b2^t). Every constant is computed in double and rounded once to T: in
/// float, 1 - 0.99999f is 1.00136e-5, which would disagree with the bias correction by 0.1 %.
template <class T>
struct adam_update {
  T* w;
  const T* g;
  T* m;
  T* v;
  T shrink, beta1, beta2, rest1, rest2, step_size, root_c2, eps;  // rest_k = 1 - beta_k
  CKPT_HOST_DEVICE void operator()(long i) const {
    const T gi = g[i];
    const T wi = w[i] * shrink;
    const T mi = beta1 * m[i] + rest1 * gi;
    const T vi = beta2 * v[i] + rest2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    w[i] = wi - step_size * mi / (fn::sqrt_(vi) / root_c2 + eps);
  }
};

}  // namespace detail

/// Adam (Kingma and Ba) with bias correction; weight_decay is decoupled, as in AdamW
/// (Loshchilov and Hutter): it shrinks the weights by lr * weight_decay each step instead of
/// entering the moments. Updates parameters in place on their backend. Frozen parameters are
/// skipped; every other parameter is stepped, with a zero gradient if no backward reached it
/// (as PyTorch after zero_grad(set_to_none=False)): its moments decay, its weight decays. A
/// parameter's moments and bias-correction count start at its first step while unfrozen.
/// step() does not clear the gradients: call zero_grad() before the next step's backward.
template <class T, Backend B = backend::cpu>
class Adam {
 public:
  struct options {
    double lr = 1e-3;
    double beta1 = 0.9;         ///< in [0, 1)
    double beta2 = 0.999;       ///< in [0, 1)
    double eps = 1e-8;
    double weight_decay = 0.0;  ///< decoupled (AdamW)
  };

  Adam(std::vector<Parameter<T, B>*> params, options o) : params_(std::move(params), "Adam"), o_(o) { check(o_); }
  explicit Adam(std::vector<Parameter<T, B>*> params) : Adam(std::move(params), options{}) {}
  Adam(Adam&&) noexcept = default;
  Adam& operator=(Adam&&) noexcept = default;
  Adam(const Adam&) = delete;  // the moments live on the backend: an optimizer moves, never copies
  Adam& operator=(const Adam&) = delete;

  void step() {
    ++steps_;
    const T shrink = static_cast<T>(1.0 - o_.lr * o_.weight_decay);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      Parameter<T, B>& p = params_.parameter(i);
      if (!p.grad_data()) continue;
      const double t = static_cast<double>(params_.count_step(i));  // this parameter's steps, as PyTorch counts them
      const T step_size = static_cast<T>(o_.lr / (1.0 - std::pow(o_.beta1, t)));
      const T root_c2 = static_cast<T>(std::sqrt(1.0 - std::pow(o_.beta2, t)));
      B::for_each(p.dims().size(), detail::adam_update<T>{p.value_data(), p.grad_data(), params_.state(i, 0), params_.state(i, 1), shrink,
                                                          static_cast<T>(o_.beta1), static_cast<T>(o_.beta2), static_cast<T>(1.0 - o_.beta1),
                                                          static_cast<T>(1.0 - o_.beta2), step_size, root_c2,
                                                          static_cast<T>(o_.eps)});
    }
  }
  void zero_grad() { params_.zero_grad(); }

  /// Calls of step() so far (each parameter's bias correction counts only its own steps).
  long steps() const { return steps_; }
  const options& settings() const { return o_; }
  void set_lr(double lr) {
    optim::detail::check_range("Adam", "lr", lr, 0.0, std::numeric_limits<double>::infinity());
    o_.lr = lr;
  }
  const std::vector<Parameter<T, B>*>& parameters() const { return params_.parameters(); }

 private:
  static void check(const options& o) {
    optim::detail::check_range("Adam", "lr", o.lr, 0.0, std::numeric_limits<double>::infinity());
    optim::detail::check_range("Adam", "beta1", o.beta1, 0.0, 1.0);
    optim::detail::check_range("Adam", "beta2", o.beta2, 0.0, 1.0);
    optim::detail::check_range("Adam", "eps", o.eps, 0.0, std::numeric_limits<double>::infinity());
    optim::detail::check_range("Adam", "weight_decay", o.weight_decay, 0.0, std::numeric_limits<double>::infinity());
  }

  optim::detail::parameter_states<T, B, 2> params_;
  options o_;
  long steps_ = 0;
};

}  // namespace ckpt::optim
