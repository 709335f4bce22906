// ckpt — what a checkpointed segment keeps of its inside: save predicates (like JAX's
// checkpoint policies) and tags that name values inside a segment.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/core/tape.hpp"

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <string_view>

namespace ckpt {

/// What a save predicate sees of a value computed inside a segment.
struct node_info {
  op_kind kind;
  const char* op;
  const char* tag;  ///< null when untagged
  shape dims;
};

/// A type with `static bool save(const node_info&)`: true keeps the value through the
/// segment's re-trace instead of recomputing it.
template <class P>
concept SavePredicate = requires(const node_info& n) {
  { P::save(n) } -> std::convertible_to<bool>;
};

/// A string usable as a template argument: `save::tagged<"kv">`.
template <std::size_t N>
struct fixed_string {
  char text[N]{};
  constexpr fixed_string(const char (&s)[N]) { std::copy_n(s, N, text); }  // NOLINT: implicit on purpose
  constexpr std::string_view view() const { return {text, N - 1}; }
};

/// The tag that every checkpoint keeps whatever its policy (see keep()).
inline constexpr const char* keep_tag = "ckpt.keep";

namespace save {

/// Keep nothing but the boundary (plain checkpointing).
struct nothing {
  static constexpr bool save(const node_info&) { return false; }
};
/// Keep matrix products (JAX's `dots_saveable`): a re-trace redoes only the cheap ops.
struct matmul {
  static constexpr bool save(const node_info& n) { return n.kind == op_kind::matmul; }
};
/// Keep values tagged with one of these names (ckpt::tag(v, "name")).
template <fixed_string... Names>
struct tagged {
  static constexpr bool save(const node_info& n) {
    return n.tag != nullptr && ((std::string_view(n.tag) == Names.view()) || ...);
  }
};
/// Keep what any of the predicates keeps.
template <SavePredicate... Ps>
struct any {
  static constexpr bool save(const node_info& n) { return (Ps::save(n) || ...); }
};

}  // namespace save

/// Names a value inside a segment so that `save::tagged<"name">` can keep it. Returns v.
/// `name` must outlive the tape's recording (a string literal does).
template <class T, Backend B>
Var<T, B> tag(const Var<T, B>& v, const char* name) {
  if (v.tape() == nullptr) throw tape_error("tag: the Var is empty (default-constructed)");
  v.tape()->check(v, "tag");
  v.tape()->node(v.index()).tag = name;
  v.tape()->count_use(v.index());  // the copy returned is no temporary of its own
  return v;
}

/// Marks a value that every enclosing checkpoint keeps, under any policy (a LoRA adapter's
/// rank-r activation, say). Returns v.
template <class T, Backend B>
Var<T, B> keep(const Var<T, B>& v) {
  return tag(v, keep_tag);
}

namespace detail {
template <SavePredicate Save, class T>
bool saves(const node<T>& n) {
  if (n.tag != nullptr && std::string_view(n.tag) == keep_tag) return true;
  // A value a nested checkpoint handed over is judged by the op that computed it.
  return Save::save(node_info{n.source, n.computed_by ? n.computed_by->op : n.op, n.tag, n.dims});
}
}  // namespace detail

}  // namespace ckpt
