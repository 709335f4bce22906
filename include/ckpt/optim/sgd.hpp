// ckpt — optim::SGD: stochastic gradient descent with momentum and weight decay, on any backend.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/optim/params.hpp"

#include <limits>
#include <vector>

namespace ckpt::optim {

namespace detail {

/// One SGD step of element i, as torch.optim.SGD computes it (no dampening, no Nesterov):
/// d = g + decay w; with momentum, v = momentum v + d (v starts at zero, so the first step's v
/// is d, as PyTorch's) and d = v; w -= lr d.
template <class T>
struct sgd_update {
  T* w;
  const T* g;
  T* velocity;  // null without momentum
  T lr, momentum, decay;
  CKPT_HOST_DEVICE void operator()(long i) const {
    T d = decay != T(0) ? g[i] + decay * w[i] : g[i];
    if (velocity) {
      d = momentum * velocity[i] + d;
      velocity[i] = d;
    }
    w[i] -= lr * d;
  }
};

}  // namespace detail

/// Updates parameters in place from their gradients (on the parameters' backend; nothing goes
/// through the host). Frozen parameters are skipped; every other parameter is stepped, with a
/// zero gradient if no backward reached it (as PyTorch after zero_grad(set_to_none=False)).
/// step() does not clear the gradients: call zero_grad() before the next step's backward.
template <class T, Backend B = backend::cpu>
class SGD {
 public:
  struct options {
    double lr = 1e-2;
    double momentum = 0.0;      ///< in [0, 1)
    double weight_decay = 0.0;  ///< L2: adds weight_decay * w to the gradient
  };

  SGD(std::vector<Parameter<T, B>*> params, options o) : params_(std::move(params), "SGD"), o_(o) { check(o_); }
  explicit SGD(std::vector<Parameter<T, B>*> params) : SGD(std::move(params), options{}) {}
  SGD(SGD&&) noexcept = default;
  SGD& operator=(SGD&&) noexcept = default;
  SGD(const SGD&) = delete;  // the velocities live on the backend: an optimizer moves, never copies
  SGD& operator=(const SGD&) = delete;

  void step() {
    const bool momentum = o_.momentum != 0.0;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      Parameter<T, B>& p = params_.parameter(i);
      if (!p.grad_data()) continue;
      T* velocity = momentum ? params_.state(i, 0) : nullptr;
      B::for_each(p.dims().size(), detail::sgd_update<T>{p.value_data(), p.grad_data(), velocity, static_cast<T>(o_.lr),
                                                          static_cast<T>(o_.momentum), static_cast<T>(o_.weight_decay)});
    }
    ++steps_;
  }
  void zero_grad() { params_.zero_grad(); }

  long steps() const { return steps_; }
  const options& settings() const { return o_; }
  void set_lr(double lr) {
    optim::detail::check_range("SGD", "lr", lr, 0.0, std::numeric_limits<double>::infinity());
    o_.lr = lr;
  }
  const std::vector<Parameter<T, B>*>& parameters() const { return params_.parameters(); }

 private:
  static void check(const options& o) {
    optim::detail::check_range("SGD", "lr", o.lr, 0.0, std::numeric_limits<double>::infinity());
    optim::detail::check_range("SGD", "momentum", o.momentum, 0.0, 1.0);
    optim::detail::check_range("SGD", "weight_decay", o.weight_decay, 0.0, std::numeric_limits<double>::infinity());
  }

  optim::detail::parameter_states<T, B, 1> params_;
  options o_;
  long steps_ = 0;
};

}  // namespace ckpt::optim
