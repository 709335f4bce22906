// ckpt — what a tape holds, node by node, and what its checkpoints will recompute: a table in
// the spirit of JAX's print_saved_residuals.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/core/tape.hpp"

#include <cstddef>
#include <iomanip>
#include <ostream>
#include <string>
#include <vector>

namespace ckpt {

struct tape_report {
  struct held {
    std::uint32_t node;
    std::string op;
    op_kind kind;
    shape dims;
    std::size_t bytes;   ///< value + adjoint bytes the tape holds for it (0 for parameters)
    std::string status;  ///< input, parameter, activation, boundary, kept for re-trace, consumed, released
  };
  struct segment {
    std::uint32_t entry;
    std::string name;
    std::size_t recompute_nodes;  ///< nodes its re-trace records
    std::size_t recompute_bytes;  ///< bytes those nodes will hold while it runs
    std::size_t replayed;         ///< of those, values kept instead of recomputed
  };
  std::vector<held> nodes;
  std::vector<segment> segments;
  std::size_t bytes = 0;       ///< what the tape holds now (the pool's count)
  std::size_t peak_bytes = 0;  ///< since the last reset
};

template <class T, Backend B>
tape_report report(const Tape<T, B>& t) {
  tape_report r;
  const auto& nodes = t.nodes();
  for (std::uint32_t i = 0; i < nodes.size(); ++i) {
    const auto& n = nodes[i];
    std::size_t bytes = 0;
    if (n.has(detail::owns_value)) bytes += Tape<T, B>::bytes_of(n.dims);
    if (n.has(detail::owns_adjoint)) bytes += Tape<T, B>::bytes_of(n.dims);
    std::string status;
    if (n.has(detail::consumed) && !n.has(detail::released))
      status = "consumed";  // freed once the expression it was a temporary of was computed
    else if (n.has(detail::released) || (!n.value && n.kind != op_kind::leaf))
      status = "released";
    else if (n.kind == op_kind::leaf)
      status = n.has(detail::owns_value) ? "input" : "parameter";
    else if (n.kind == op_kind::boundary)
      status = "boundary";
    else if (n.kind == op_kind::saved)
      status = "kept for re-trace";
    else
      status = "activation";
    r.nodes.push_back({i, n.op, n.kind, n.dims, bytes, status});
  }
  const auto& entries = t.entries();
  for (std::uint32_t e = 0; e < entries.size(); ++e) {
    const detail::segment_info* s = entries[e].segment;
    if (!s) continue;
    std::size_t b = 0;
    for (std::uint32_t k = 0; k < s->signature_size; ++k) b += Tape<T, B>::bytes_of(s->signature[k].dims);
    r.segments.push_back({e, s->name, s->signature_size, b, s->replayed});
  }
  r.bytes = t.bytes();
  r.peak_bytes = t.peak_bytes();
  return r;
}

inline std::ostream& operator<<(std::ostream& o, const tape_report& r) {
  o << std::left << std::setw(6) << "node" << std::setw(20) << "op" << std::setw(12) << "kind" << std::setw(12) << "shape"
    << std::right << std::setw(12) << "bytes" << "  " << std::left << "status\n";
  for (const auto& n : r.nodes) {
    std::string dims = std::to_string(n.dims.rows) + "x" + std::to_string(n.dims.cols);
    o << std::left << std::setw(6) << n.node << std::setw(20) << n.op << std::setw(12) << to_string(n.kind) << std::setw(12)
      << dims << std::right << std::setw(12) << n.bytes << "  " << n.status << '\n';
  }
  if (!r.segments.empty()) {
    o << "\ncheckpointed segments (recomputed on reverse)\n";
    o << std::left << std::setw(7) << "entry" << std::setw(20) << "name" << std::right << std::setw(10) << "nodes" << std::setw(14)
      << "bytes" << std::setw(10) << "kept" << '\n';
    for (const auto& s : r.segments)
      o << std::left << std::setw(7) << s.entry << std::setw(20) << s.name << std::right << std::setw(10) << s.recompute_nodes
        << std::setw(14) << s.recompute_bytes << std::setw(10) << s.replayed << '\n';
  }
  o << "\nheld now: " << r.bytes << " bytes; peak since reset: " << r.peak_bytes << " bytes\n";
  return o;
}

}  // namespace ckpt
