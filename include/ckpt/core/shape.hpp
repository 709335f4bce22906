// ckpt — 2-D shapes (rows = features, cols = batch) and their printing in error messages.
#pragma once
#include "ckpt/config.hpp"

#include <ostream>

namespace ckpt {

struct shape {
  int rows = 0;
  int cols = 0;
  CKPT_HOST_DEVICE constexpr long size() const { return static_cast<long>(rows) * cols; }
  friend constexpr bool operator==(shape, shape) = default;
  friend std::ostream& operator<<(std::ostream& o, shape s) { return o << s.rows << 'x' << s.cols; }
};

}  // namespace ckpt
