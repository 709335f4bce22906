// ckpt — checkpoint(segment, inputs...): keep a segment's boundary, recompute its inside.
//
// Forward: the segment runs and records as usual; then its recording is rolled back, except
// for its outputs (and the values its save predicate keeps), whose buffers are handed over to
// new boundary nodes without a copy. One entry is pushed that remembers the segment's
// callable, its inputs, the signature of what it recorded and the RNG counter at its start.
//
// Reverse: that entry reads its outputs' adjoints, makes sure its inputs' adjoints exist,
// opens a nested recording, re-traces the segment (the same ops, the same dropout masks, the
// kept values replayed instead of recomputed), checks that it recorded the same sequence of
// ops and shapes, seeds the re-traced outputs with the adjoints, sweeps the nested recording
// (adding into the input adjoints and parameter gradients) and rolls it back. On every exit
// path, exceptions included, the nested recording is rolled back and the tape's state restored.
//
// Because the re-trace performs exactly the arithmetic of the plain run, in the same order,
// gradients are bitwise identical with and without checkpointing on the CPU.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/checkpoint/save.hpp"
#include "ckpt/core/tape.hpp"

#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace ckpt {

namespace detail {

// ------------------------------------------------------------------ what a segment returns

template <class R>
struct result_traits;  // Var, std::pair, std::tuple, std::array or std::vector of Vars

template <class T, class B>
struct result_traits<Var<T, B>> {
  using value_type = T;
  using backend_type = B;
  static void collect(const Var<T, B>& v, std::vector<Var<T, B>>& out) { out.push_back(v); }
  static Var<T, B> rebuild(const std::vector<Var<T, B>>& v, std::size_t& i) { return v[i++]; }
};
template <class T, class B, std::size_t N>
struct result_traits<std::array<Var<T, B>, N>> {
  using value_type = T;
  using backend_type = B;
  static void collect(const std::array<Var<T, B>, N>& r, std::vector<Var<T, B>>& out) {
    for (const auto& v : r) out.push_back(v);
  }
  static std::array<Var<T, B>, N> rebuild(const std::vector<Var<T, B>>& v, std::size_t& i) {
    std::array<Var<T, B>, N> r;
    for (auto& x : r) x = v[i++];
    return r;
  }
};
template <class T, class B>
struct result_traits<std::vector<Var<T, B>>> {
  using value_type = T;
  using backend_type = B;
  static void collect(const std::vector<Var<T, B>>& r, std::vector<Var<T, B>>& out) { out.insert(out.end(), r.begin(), r.end()); }
  static std::vector<Var<T, B>> rebuild(const std::vector<Var<T, B>>& v, std::size_t& i) {
    std::vector<Var<T, B>> r(v.begin() + static_cast<long>(i), v.end());
    i = v.size();
    return r;
  }
};
template <class T, class B, class... Rest>
struct result_traits<std::tuple<Var<T, B>, Rest...>> {
  using value_type = T;
  using backend_type = B;
  using R = std::tuple<Var<T, B>, Rest...>;
  static void collect(const R& r, std::vector<Var<T, B>>& out) {
    std::apply([&](const auto&... v) { (out.push_back(v), ...); }, r);
  }
  static R rebuild(const std::vector<Var<T, B>>& v, std::size_t& i) {
    // Indices from a pack, not `v[i++]...`: GCC's -Wsequence-point rejects the latter under
    // -Werror (falsely: a braced list is sequenced), and any tuple-returning segment with it.
    const std::size_t first = i;
    i += std::tuple_size_v<R>;
    return [&]<std::size_t... K>(std::index_sequence<K...>) { return R{v[first + K]...}; }(std::make_index_sequence<std::tuple_size_v<R>>{});
  }
};
template <class T, class B>
struct result_traits<std::pair<Var<T, B>, Var<T, B>>> {
  using value_type = T;
  using backend_type = B;
  using R = std::pair<Var<T, B>, Var<T, B>>;
  static void collect(const R& r, std::vector<Var<T, B>>& out) {
    out.push_back(r.first);
    out.push_back(r.second);
  }
  static R rebuild(const std::vector<Var<T, B>>& v, std::size_t& i) {
    R r{v[i], v[i + 1]};
    i += 2;
    return r;
  }
};

/// The one place that knows a segment's type: calls it on its inputs and appends its outputs.
/// Everything around the call (the forward's bookkeeping, the re-trace) is compiled once per
/// tape type and reaches the segment through this pointer, not once per segment type.
template <class T, class B>
using segment_call = void (*)(const void* segment, const Var<T, B>* inputs, std::vector<Var<T, B>>& outs);

template <class Seg, class T, class B, std::size_t N>
void call_segment(const void* segment, const Var<T, B>* in, std::vector<Var<T, B>>& outs) {
  const Seg& seg = *static_cast<const Seg*>(segment);
  auto result = [&]<std::size_t... I>(std::index_sequence<I...>) { return seg(in[I]...); }(std::make_index_sequence<N>{});
  result_traits<std::remove_cvref_t<decltype(result)>>::collect(result, outs);
}

// ------------------------------------------------------------------ the entry

/// What a checkpoint's forward leaves for its re-trace, whatever the segment: the signature of
/// its recording, the values it kept, where its outputs went, which outer nodes it reads.
template <class T>
struct segment_record {
  using signature_item = typename retrace_state<T>::signature_item;
  const char* name;
  const signature_item* signature;
  std::uint32_t signature_size;
  std::uint32_t stream_size;  // nodes the forward's segment created, nested insides included
  const std::uint32_t* saved_offset;  // sorted stream offsets (see retrace_state)
  T* const* saved_value;
  const signature_item* saved_item;
  std::uint32_t saved_count;
  const std::uint32_t* output_node;    // outer boundary node, or the input itself for a pass-through
  const std::uint32_t* output_offset;  // offset in the re-trace, or no_node for a pass-through
  const bool* output_replayed;         // the re-trace replays the output's value (it is also kept)
  std::uint32_t output_count;
  const std::uint32_t* uses;  // outer nodes the segment reads whose adjoints it adds into
  std::uint32_t use_count;
  std::uint64_t rng;
};

/// The reverse of one checkpoint: re-trace the segment onto a nested recording, seed its
/// outputs with the boundary's adjoints, sweep it, roll it back.
template <class T, class B>
void checkpoint_reverse(Tape<T, B>& t, const segment_record<T>& rec, const Var<T, B>* inputs, std::size_t input_count,
                        segment_call<T, B> call, const void* segment) {
  bool any = false;
  for (std::uint32_t k = 0; k < rec.output_count; ++k)
    if (rec.output_offset[k] != no_node && t.adjoint_if(rec.output_node[k])) any = true;
  if (!any) return;
  // An input that policy::offload moved to host memory comes back first (and the one the
  // previous entry needs starts its copy back, behind this entry's re-trace).
  for (std::size_t j = 0; j < input_count; ++j) t.make_resident(inputs[j].index());
  for (std::uint32_t k = 0; k < rec.use_count; ++k) t.adjoint_of(rec.uses[k]);
  // The boundary values are dead now (their consumers were swept): free them before the
  // re-trace needs memory, unless the re-trace replays them.
  for (std::uint32_t k = 0; k < rec.output_count; ++k) {
    auto& n = t.node(rec.output_node[k]);
    if (rec.output_offset[k] != no_node && !rec.output_replayed[k] && !n.has(retained) && n.has(owns_value)) {
      t.pool().release(n.value, Tape<T, B>::bytes_of(n.dims));
      n.value = nullptr;
      n.flags = static_cast<std::uint16_t>(n.flags & ~owns_value);
    }
  }

  const ckpt::position m = t.position();
  retrace_state<T> r{rec.name,        m.nodes,         rec.signature, rec.signature_size, rec.saved_offset, rec.saved_value,
                     rec.saved_item,  rec.saved_count, 0,             t.stream_position(), 0};
  struct restore {
    Tape<T, B>& t;
    ckpt::position m;
    std::uint32_t guard, base;
    std::uint64_t rng;
    retrace_state<T>* retrace;
    ~restore() {
      t.leave_retrace();
      t.set_retrace(retrace);
      t.set_adjoint_guard(guard);
      t.set_segment_base(base);
      t.set_rng_counter(rng);
      t.reset_to(m);
    }
  } on_exit{t, m, t.adjoint_guard(), t.innermost_segment_base(), t.rng_counter(), t.retrace()};
  t.enter_retrace();
  t.set_adjoint_guard(m.nodes);
  t.set_segment_base(0);
  t.set_rng_counter(rec.rng);
  t.set_retrace(&r);

  std::vector<Var<T, B>> outs;
  call(segment, inputs, outs);
  t.set_retrace(nullptr);
  const char* name = rec.name;
  const std::uint32_t recorded = static_cast<std::uint32_t>(t.node_count()) - m.nodes;
  if (recorded != rec.signature_size)
    throw checkpoint_error(cat("checkpoint '", name, "': the re-trace recorded ", recorded, " entries, the forward ", rec.signature_size,
                               ". A segment must record the same ops on every call (does it branch on mutable state?)"));
  const std::uint32_t created = t.stream_position() - r.stream_base;
  if (created != rec.stream_size)
    throw checkpoint_error(cat("checkpoint '", name, "': the re-trace created ", created, " nodes, nested checkpoints' insides included, the forward ",
                               rec.stream_size, ". A segment must record the same ops on every call (does it branch on mutable state?)"));
  if (outs.size() != rec.output_count)
    throw checkpoint_error(cat("checkpoint '", name, "': the re-trace returned ", outs.size(), " outputs, the forward ", rec.output_count));
  for (std::uint32_t k = 0; k < rec.output_count; ++k) {
    if (rec.output_offset[k] == no_node) continue;
    const std::uint32_t idx = outs[k].index();
    if (outs[k].tape() != &t || idx < m.nodes || idx - m.nodes != rec.output_offset[k])
      throw checkpoint_error(cat("checkpoint '", name, "': output ", k, " of the re-trace is not the value the forward returned"));
    auto& out = t.node(rec.output_node[k]);
    if (out.adjoint) {
      T* a = t.adjoint_of(idx);
      B::copy(a, out.adjoint, t.node(idx).dims.size());
      if (!out.has(retained) && out.has(owns_adjoint)) {  // handed over: free it before the sweep
        t.pool().release(out.adjoint, Tape<T, B>::bytes_of(out.dims));
        out.adjoint = nullptr;
        out.flags = static_cast<std::uint16_t>(out.flags & ~owns_adjoint);
      }
    }
  }
  t.backward_to(m);
}

/// The tape entry: the record, the segment (kept alive by the tape) and its inputs.
template <class T, class B, class Seg, std::size_t N>
struct checkpoint_entry {
  segment_record<T> record;
  const Seg* segment;
  std::array<Var<T, B>, N> inputs;

  void backward(Tape<T, B>& t) const { checkpoint_reverse(t, record, inputs.data(), N, &call_segment<Seg, T, B, N>, segment); }
};

struct taken_value {
  std::uint32_t offset;  // from the segment's first node
  std::uint32_t stream;  // the value's origin, as a stream offset from the segment's start
  signature_item computed_by;  // the op that computed it (a nested checkpoint's inside, maybe)
  op_kind source;
  const char* tag;
  shape dims;
  void* value;
  bool owned;
  bool requires_grad;
  bool replayable;
  bool selected;  // chosen by the save predicate: the re-trace replays it
};

/// What a checkpoint's forward hands back to the typed caller: the outputs as new boundary
/// nodes, and, when anything flows back through the segment, the entry's record.
template <class T, class B>
struct checkpoint_forward_result {
  std::vector<Var<T, B>> outs;
  bool grad = false;  // an entry is needed: push `record` for nodes from `node_begin`
  segment_record<T> record{};
  std::uint32_t node_begin = 0;
  const segment_info* info = nullptr;
};

/// The forward of one checkpoint: run the segment, take its outputs (and what `keeps` says to
/// keep) out of its recording, roll the recording back, give the taken values new nodes.
template <class T, class B>
checkpoint_forward_result<T, B> checkpoint_forward(Tape<T, B>& t, const char* name, typename Tape<T, B>::keep_rule keeps,
                                                   const Var<T, B>* inputs, std::size_t input_count, segment_call<T, B> call,
                                                   const void* segment) {
  for (std::size_t i = 0; i < input_count; ++i) t.check(inputs[i], "checkpoint");
  // The re-trace reads the inputs, and an output may be an input passed through.
  for (std::size_t i = 0; i < input_count; ++i) t.count_use(inputs[i].index());

  const ckpt::position p = t.position();
  const std::uint64_t rng0 = t.rng_counter();
  const auto scope = t.open_segment();
  const std::uint32_t outer_base = t.innermost_segment_base();
  retrace_state<T>* outer_retrace = t.retrace();

  std::vector<Var<T, B>> outs;
  std::vector<signature_item> signature;
  std::vector<taken_value> taken;
  std::vector<std::uint32_t> out_offset;
  std::vector<std::uint32_t> uses;
  struct parameter_output {
    std::size_t k;
    node<T> n;
  };
  std::vector<parameter_output> parameter_outs;
  std::uint32_t stream0 = 0;      // the stream position where the segment's forward starts
  std::uint32_t stream_size = 0;  // and how many nodes it created, nested insides included
  {
    struct restore {
      Tape<T, B>& t;
      ckpt::position p;
      std::size_t uses_begin;
      std::uint32_t base;
      retrace_state<T>* retrace;
      ~restore() {
        t.pop_keep_rule();
        t.set_segment_base(base);
        if (retrace) --retrace->nested_forwards;
        t.outer_uses().resize(uses_begin);
        t.reset_to(p);  // frees the inside; the stolen buffers survive
      }
    };
    // What this segment keeps of its inside is not freed early (Tape::consume) either.
    t.push_keep_rule(keeps);
    restore on_exit{t, p, scope.uses_begin, outer_base, outer_retrace};
    t.set_segment_base(p.nodes);
    // Inside an enclosing re-trace, this forward run records an inside that the enclosing
    // signature does not list, but it still takes the values the enclosing checkpoint kept
    // (by stream position): what a nested checkpoint kept is never recomputed either.
    if (outer_retrace) ++outer_retrace->nested_forwards;
    stream0 = t.stream_position();

    call(segment, inputs, outs);
    // Validate every output before any value is taken: a throw after take() would leak the
    // taken buffers (their nodes no longer own them when the inside is rolled back).
    for (const auto& o : outs) t.check(o, "checkpoint (segment output)");

    const std::uint32_t end = static_cast<std::uint32_t>(t.node_count());
    signature.reserve(end - p.nodes);
    stream_size = t.stream_position() - stream0;
    for (std::uint32_t i = p.nodes; i < end; ++i) {
      const auto& n = t.node(i);
      signature.push_back({n.op, n.dims, n.form, n.created - stream0});
    }

    auto take = [&](std::uint32_t i, bool selected) {
      for (const auto& tv : taken)
        if (tv.offset == i - p.nodes) return;
      auto& n = t.node(i);
      const bool owned = n.has(owns_value);
      void* v = owned ? t.steal_value(i) : n.value;
      // A value a nested checkpoint handed over names the op that computed it; otherwise that
      // op is the node's own.
      const signature_item by = n.computed_by ? *n.computed_by : signature_item{n.op, n.dims, n.form};
      taken.push_back({i - p.nodes, n.origin - stream0, by, n.source, n.tag, n.dims, v, owned, n.has(requires_grad),
                       n.has(replayable), selected});
    };
    for (std::uint32_t i = p.nodes; i < end; ++i) {
      const auto& n = t.node(i);
      if (n.value && n.has(replayable) && !n.has(released) && keeps(n)) take(i, true);
    }
    for (std::size_t k = 0; k < outs.size(); ++k) {
      const auto& o = outs[k];
      const auto& n = t.node(o.index());
      if (o.index() < p.nodes) {  // an outer Var passed through: a copy of the caller's handle
        t.count_use(o.index());
        out_offset.push_back(no_node);
      } else if (n.kind == op_kind::leaf && n.adjoint && !n.has(owns_adjoint)) {
        // A parameter's Var (tape.param) made inside: handed on as a parameter node, so that
        // what flows into it goes straight to the parameter's gradient. (As a boundary, the
        // re-trace would copy the boundary's adjoint over that gradient.)
        out_offset.push_back(no_node);
        parameter_outs.push_back({k, n});
      } else {
        out_offset.push_back(o.index() - p.nodes);
        take(o.index(), false);
      }
    }
    auto& ou = t.outer_uses();
    for (std::size_t i = scope.uses_begin; i < ou.size(); ++i)
      if (ou[i] < p.nodes) uses.push_back(ou[i]);
    std::sort(uses.begin(), uses.end());
    uses.erase(std::unique(uses.begin(), uses.end()), uses.end());
  }
  // The inside is gone now. Re-register what an enclosing segment reads from outside it.
  if (outer_base > 0)
    for (std::uint32_t u : uses)
      if (u < outer_base) t.outer_uses().push_back(u);

  // Does anything flow back through the segment? (Read from `taken`: the output nodes
  // themselves were rolled back.)
  checkpoint_forward_result<T, B> result;
  for (std::size_t k = 0; k < outs.size(); ++k)
    if (out_offset[k] != no_node)
      for (const auto& tv : taken)
        if (tv.offset == out_offset[k]) result.grad = result.grad || tv.requires_grad;
  const bool grad = result.grad;

  // Until a taken value has a node (or is given back), it belongs to nobody: if anything below
  // throws (the signature check of an enclosing re-trace on a new node can), the rest go back.
  std::vector<char> settled(taken.size(), 0);
  struct give_back_unsettled {
    Tape<T, B>& t;
    const std::vector<taken_value>& taken;
    const std::vector<char>& settled;
    ~give_back_unsettled() {
      for (std::size_t j = 0; j < taken.size(); ++j)
        if (!settled[j] && taken[j].owned) t.pool().release(taken[j].value, Tape<T, B>::bytes_of(taken[j].dims));
    }
  } on_throw{t, taken, settled};
  // Inside an enclosing segment (its forward or its re-trace), kept values get nodes even when
  // nothing flows back through this one: the enclosing checkpoint may keep them in turn.
  const bool inside = outer_base > 0 || outer_retrace != nullptr;

  // New nodes: the kept values, then the boundary outputs, all owned by this entry.
  result.node_begin = static_cast<std::uint32_t>(t.node_count());
  std::vector<std::uint32_t> node_of(taken.size(), no_node);
  // What computed each kept value, for the nodes that hold it: an enclosing checkpoint keeps
  // and replays them by it (lives in the record arena as long as those nodes).
  auto* computed_by = t.template make_array<signature_item>(taken.size());
  for (std::size_t j = 0; j < taken.size(); ++j) computed_by[j] = taken[j].computed_by;
  for (std::size_t j = 0; j < taken.size(); ++j) {
    const auto& tv = taken[j];
    const bool is_output = std::find(out_offset.begin(), out_offset.end(), tv.offset) != out_offset.end();
    if (!is_output && !grad && !inside) {  // nothing will re-trace: give the kept value back
      settled[j] = 1;
      if (tv.owned) t.pool().release(tv.value, Tape<T, B>::bytes_of(tv.dims));
      continue;
    }
    const std::uint16_t flags =
        static_cast<std::uint16_t>(transient | (tv.owned ? owns_value : 0) | (is_output && tv.requires_grad ? requires_grad : 0));
    const std::uint32_t i = t.new_node(tv.dims, is_output ? name : "checkpoint.saved", is_output ? op_kind::boundary : op_kind::saved,
                                       flags, false);
    settled[j] = 1;
    auto& n = t.node(i);
    n.value = static_cast<T*>(tv.value);
    n.origin = stream0 + tv.stream;
    n.source = tv.source;
    n.tag = tv.tag;
    n.computed_by = &computed_by[j];
    if (tv.replayable) n.flags |= replayable;  // after new_node: its own creation replays nothing
    node_of[j] = i;
  }
  auto node_for_offset = [&](std::uint32_t off) {
    for (std::size_t j = 0; j < taken.size(); ++j)
      if (taken[j].offset == off) return node_of[j];
    return no_node;
  };
  result.outs.reserve(outs.size());
  for (std::size_t k = 0; k < outs.size(); ++k)
    result.outs.push_back(out_offset[k] == no_node ? outs[k] : t.var_of(node_for_offset(out_offset[k])));
  for (const auto& po : parameter_outs) {  // as Tape::param() makes them
    const std::uint32_t i = t.new_node(po.n.dims, po.n.op, op_kind::leaf, static_cast<std::uint16_t>(po.n.flags & requires_grad), false);
    t.node(i).value = po.n.value;
    t.node(i).adjoint = po.n.adjoint;
    result.outs[po.k] = t.var_of(i);
  }
  if (!grad) return result;

  auto* sig = t.template make_array<signature_item>(signature.size());
  std::copy(signature.begin(), signature.end(), sig);
  // The values the re-trace replays, in stream order (the order it computes them in).
  std::vector<std::size_t> order;
  for (std::size_t j = 0; j < taken.size(); ++j)
    if (node_of[j] != no_node && taken[j].selected) order.push_back(j);
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return taken[a].stream < taken[b].stream; });
  auto* so = t.template make_array<std::uint32_t>(order.size());
  auto* sv = t.template make_array<T*>(order.size());
  auto* si = t.template make_array<signature_item>(order.size());
  for (std::size_t j = 0; j < order.size(); ++j) {
    so[j] = taken[order[j]].stream;
    sv[j] = static_cast<T*>(taken[order[j]].value);
    si[j] = taken[order[j]].computed_by;
  }
  auto* on = t.template make_array<std::uint32_t>(outs.size());
  auto* oo = t.template make_array<std::uint32_t>(outs.size());
  auto* orp = t.template make_array<bool>(outs.size());
  for (std::size_t k = 0; k < outs.size(); ++k) {
    oo[k] = out_offset[k];
    on[k] = result.outs[k].index();
    orp[k] = false;
    for (const std::size_t j : order)
      if (taken[j].offset == out_offset[k]) orp[k] = true;
    // The re-trace replays this buffer itself: it must not move (Tape::offload).
    if (orp[k]) t.node(on[k]).flags |= replayed_too;
  }
  auto* us = t.template make_array<std::uint32_t>(uses.size());
  std::copy(uses.begin(), uses.end(), us);
  result.info = t.make(segment_info{name, sig, static_cast<std::uint32_t>(signature.size()), static_cast<std::uint32_t>(order.size())});
  result.record = {name,
                   sig,
                   static_cast<std::uint32_t>(signature.size()),
                   stream_size,
                   so,
                   sv,
                   si,
                   static_cast<std::uint32_t>(order.size()),
                   on,
                   oo,
                   orp,
                   static_cast<std::uint32_t>(outs.size()),
                   us,
                   static_cast<std::uint32_t>(uses.size()),
                   rng0};
  return result;
}

}  // namespace detail

/// Runs `segment(inputs...)` keeping only its boundary; see the top of this file.
/// `Save` chooses values inside the segment to keep instead of recomputing (save::matmul,
/// save::tagged<"name">, ...). `name` appears in error messages and the tape report.
/// The segment may capture parameters and outer Vars; it must record the same ops every time
/// it is called and must stay alive until backward (it is copied when passed as an rvalue).
template <SavePredicate Save = save::nothing, class Segment, class T, Backend B, class... More>
auto checkpoint(const char* name, Segment&& segment, const Var<T, B>& first, const More&... more) {
  static_assert((std::is_same_v<More, Var<T, B>> && ...), "ckpt::checkpoint: every input must be a Var of the same tape type");
  using Seg = std::decay_t<Segment>;
  constexpr std::size_t N = 1 + sizeof...(More);
  using result_type = std::remove_cvref_t<std::invoke_result_t<const Seg&, decltype(first), decltype(more)...>>;
  const std::array<Var<T, B>, N> inputs{first, more...};
  if (first.tape() == nullptr) throw tape_error("checkpoint: input 0 is an empty Var");
  Tape<T, B>& t = *first.tape();
  const Seg& seg = segment;
  auto f = detail::checkpoint_forward(t, name, &detail::saves<Save, T>, inputs.data(), N, &detail::call_segment<Seg, T, B, N>,
                                      static_cast<const void*>(&seg));
  if (f.grad) {
    const Seg* stored = t.keep_object(Seg(std::forward<Segment>(segment)));
    t.push_entry(detail::checkpoint_entry<T, B, Seg, N>{f.record, stored, inputs}, f.node_begin, f.info);
  }
  std::size_t i = 0;
  return detail::result_traits<result_type>::rebuild(f.outs, i);
}

/// checkpoint(segment, inputs...) with the default name "checkpoint".
template <SavePredicate Save = save::nothing, class Segment, class T, Backend B, class... More>
  requires(!std::is_convertible_v<Segment, const char*>)
auto checkpoint(Segment&& segment, const Var<T, B>& first, const More&... more) {
  return checkpoint<Save>("checkpoint", std::forward<Segment>(segment), first, more...);
}

}  // namespace ckpt
