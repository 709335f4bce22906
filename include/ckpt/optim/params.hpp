// ckpt — what the optimizers share: their list of parameters and per-parameter state buffers.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/core/error.hpp"
#include "ckpt/core/parameter.hpp"

#include <cstddef>
#include <utility>
#include <vector>

namespace ckpt::optim::detail {

/// The parameters an optimizer updates, each with `Slots` state buffers of its shape (momenta),
/// allocated and zeroed on the backend at the parameter's first step while it is unfrozen (it
/// has a gradient buffer then), and its own count of steps taken (as PyTorch's per-parameter
/// state['step']: a parameter unfrozen later starts its bias corrections at its first step).
/// A frozen parameter has neither and is skipped.
template <class T, Backend B, int Slots>
class parameter_states {
 public:
  parameter_states(std::vector<Parameter<T, B>*> params, const char* op) : params_(std::move(params)), state_(params_.size()) {
    for (std::size_t i = 0; i < params_.size(); ++i) {
      if (!params_[i]) throw error(ckpt::detail::cat(op, ": parameter ", i, " is null"));
      for (std::size_t j = 0; j < i; ++j)
        if (params_[j] == params_[i])
          throw error(ckpt::detail::cat(op, ": parameters ", j, " and ", i, " are the same ", params_[i]->dims(),
                                        " parameter (it would be stepped twice)"));
    }
  }

  std::size_t size() const { return params_.size(); }
  Parameter<T, B>& parameter(std::size_t i) { return *params_[i]; }
  const std::vector<Parameter<T, B>*>& parameters() const { return params_; }

  /// State buffer `slot` of parameter i, allocated zeroed on first use.
  T* state(std::size_t i, int slot) {
    buffer<T, B>& b = state_[i].slot[slot];
    if (!b.data()) {
      b = buffer<T, B>(params_[i]->dims());
      if (b.data()) B::fill_zero(b.data(), b.dims().size());
    }
    return b.data();
  }

  /// Counts a step of parameter i and returns its number (1 for the first).
  long count_step(std::size_t i) { return ++state_[i].steps; }

  void zero_grad() {
    for (auto* p : params_) p->zero_grad();
  }

 private:
  struct slots {
    buffer<T, B> slot[Slots];
    long steps = 0;
  };
  std::vector<Parameter<T, B>*> params_;
  std::vector<slots> state_;
};

/// Throws unless lo <= x < hi (or <= hi when `closed`), naming the optimizer and the option.
inline void check_range(const char* op, const char* name, double x, double lo, double hi, bool closed = false) {
  if (!(x >= lo && (closed ? x <= hi : x < hi)))
    throw error(ckpt::detail::cat(op, ": ", name, " must be in [", lo, ", ", hi, closed ? "]" : ")", ", got ", x));
}

}  // namespace ckpt::optim::detail
