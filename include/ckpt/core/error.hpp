// ckpt — the library's exceptions. Every error a user can provoke derives from ckpt::error and
// names the op and the shapes or the reason, so that a message alone says what went wrong.
#pragma once
#include "ckpt/config.hpp"

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace ckpt {

/// Base of every exception the library throws on bad input or misuse.
class error : public std::runtime_error {
 public:
  explicit error(const std::string& what) : std::runtime_error("ckpt: " + what) {}
};

/// Operand shapes that do not fit the op (checked before any work is done).
class shape_error : public error {
  using error::error;
};

/// Misuse of the tape: a Var from another tape or from before a reset, a second backward, ...
class tape_error : public error {
  using error::error;
};

/// A non-finite value found by the debug check (Tape::set_check_finite).
class numeric_error : public error {
  using error::error;
};

/// A checkpointed segment whose re-trace differs from its forward run.
class checkpoint_error : public error {
  using error::error;
};

namespace detail {
template <class... Args>
std::string cat(Args&&... args) {
  std::ostringstream s;
  (s << ... << std::forward<Args>(args));
  return s.str();
}
}  // namespace detail

}  // namespace ckpt
