// ckpt — the tape: a Wengert list of entries over tensor nodes, with positions, roll-back,
// backward down to a position, and the hooks a checkpointed segment needs to re-trace itself.
//
// Guarantees after an exception (strong unless said otherwise):
// - an op that throws on bad input (shape_error, tape_error) has recorded nothing;
// - backward() that throws leaves the recording as it was before the call only if the throw
//   came before the sweep started (validation, the finite check); a throw from inside the sweep
//   (a checkpoint re-trace that differs) leaves the tape usable after reset();
// - reset() and reset_to() never throw.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/backend/cpu/cpu.hpp"
#include "ckpt/core/arena.hpp"
#include "ckpt/core/backend.hpp"
#include "ckpt/core/error.hpp"
#include "ckpt/core/parameter.hpp"
#include "ckpt/core/pool.hpp"
#include "ckpt/core/shape.hpp"

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <utility>
#include <string_view>
#include <type_traits>
#include <vector>

namespace ckpt {

template <class T, Backend B>
class Tape;
template <class T, Backend B>
class Var;

/// What kind of op produced a node: selective checkpoint policies choose by it.
enum class op_kind : std::uint8_t {
  leaf,         ///< constant, variable or parameter
  elementwise,  ///< one fused expression
  matmul,       ///< a matrix product
  reduction,    ///< sum, mean, losses
  rowwise,      ///< softmax, normalisations
  layout,       ///< transpose, slicing, concatenation
  boundary,     ///< a checkpoint's kept output
  saved,        ///< a value a checkpoint keeps for its re-trace (selective policies)
  custom,       ///< ops defined outside the library, e.g. nn layers
};

inline const char* to_string(op_kind k) {
  switch (k) {
    case op_kind::leaf: return "leaf";
    case op_kind::elementwise: return "elementwise";
    case op_kind::matmul: return "matmul";
    case op_kind::reduction: return "reduction";
    case op_kind::rowwise: return "rowwise";
    case op_kind::layout: return "layout";
    case op_kind::boundary: return "boundary";
    case op_kind::saved: return "saved";
    case op_kind::custom: return "custom";
  }
  return "?";
}

/// A point in a recording: everything recorded after it can be swept (backward_to) and
/// dropped (reset_to) without touching what came before.
struct position {
  std::uint32_t nodes = 0;
  std::uint32_t entries = 0;
  arena::mark meta;
  std::uint32_t owned = 0;  // objects kept by keep_object() so far
};

/// Work counters since the last reset(): what the figures of checkpointing are made of.
struct op_counters {
  std::size_t entries_recorded = 0;  ///< entries pushed, re-traces included
  std::size_t nodes_retraced = 0;    ///< nodes created while a checkpointed segment re-traced
  std::size_t nodes_replayed = 0;    ///< of those, values taken from a checkpoint's saved buffers
  std::size_t gemms = 0;             ///< matrix products run, forward and reverse
};

struct tape_options {
  /// Chunk size of the arena that holds entries' records; tests use a tiny one so that
  /// chunk-crossing code runs.
  std::size_t chunk_bytes = CKPT_DEFAULT_CHUNK_BYTES;
};

namespace detail {

inline constexpr std::uint32_t no_node = std::numeric_limits<std::uint32_t>::max();

enum node_flag : std::uint16_t {
  requires_grad = 1,
  owns_value = 2,
  owns_adjoint = 4,
  transient = 8,   // produced by an op: released as soon as the sweep has passed its entry
  retained = 16,   // kept through backward (the loss, or what the user asked to retain)
  released = 32,   // released by backward
  replayable = 64, // its op can take a saved value instead of recomputing (selective policies)
  consumable = 128,  // no entry of its own op reads it in reverse (see Tape::consume)
  consumed = 256,    // freed after the expression it was passed to as a temporary was computed
  offloaded = 512,   // its value is (on its way) in host memory: policy::offload, Tape::offload
  replayed_too = 1024,  // its buffer is also a value its checkpoint's re-trace replays: it stays put
};

/// d loss / d loss = 1 into the loss's adjoint, on the backend: added to what is there when
/// the adjoint is shared (a parameter used directly as the loss accumulates into its gradient).
template <class T>
struct seed_loss {
  T* g;
  bool add;
  CKPT_HOST_DEVICE void operator()(long) const { g[0] = add ? T(1) + g[0] : T(1); }
};

/// A value moved to pinned host memory (Tape::offload) and where it stands.
struct offload_record {
  enum state_t : std::uint8_t { to_host, on_host, to_device, resident };
  std::uint32_t node;
  std::size_t bytes;
  void* host = nullptr;
  void* device = nullptr;  // the device buffer while the record holds it (to_device)
  void* event = nullptr;   // the copy in flight (to_host, to_device)
  state_t state = to_host;
};

/// One node of a recording's signature: what a checkpoint's re-trace must record again.
struct signature_item {
  const char* op;
  shape dims;
  const void* form = nullptr;
  // Nodes the segment had created before this one, nested insides included (stream offset):
  // a nested checkpoint's inside that records other ops shows here as another offset. (Unused
  // where the item names the op that computed a kept value.)
  std::uint32_t stream = 0;

  /// Whether a node recorded now is this item again (the stream offset aside).
  bool same_op(const char* other_op, shape other_dims, const void* other_form) const {
    return dims == other_dims && std::string_view(op) == other_op && form == other_form;
  }
};

template <class T>
struct node {
  T* value = nullptr;
  T* adjoint = nullptr;
  shape dims;
  std::uint32_t epoch = 0;
  // Where the value was computed: the tape's creation count (stream position) when the op
  // that computed it made its node. A value a checkpoint hands over to a boundary or saved
  // node keeps the origin and the kind of the op that computed it, so that an enclosing
  // checkpoint can keep it and replay it into that op when it re-traces.
  std::uint32_t origin = 0;
  const char* tag = nullptr;  // a name given with ckpt::tag(); selective policies save by it
  const char* op = "";
  const void* form = nullptr;  // which fused expression an elementwise node is (see form_tag)
  // For a value a checkpoint handed over: the op that computed it (null: the node's own op).
  const signature_item* computed_by = nullptr;
  op_kind kind = op_kind::leaf;
  op_kind source = op_kind::leaf;  // the kind of the op that computed the value (see origin)
  std::uint16_t flags = 0;
  std::uint32_t created = 0;  // the stream position of this node's own creation (origin may differ)
  // Operand references taken to it (Tape::operand_of) and handle copies that ops pass on (tag,
  // checkpoint inputs, copied expressions): a temporary is freed only when its expression's
  // own leaf is its one use (Tape::consume).
  std::uint32_t uses = 0;
  bool has(node_flag f) const { return (flags & f) != 0; }
};

/// One object per expression type: its address tells apart fused expressions with the same
/// root op (`tanh(x) + x` and `sigmoid(x) + x` are both 'add'), so that a re-trace that
/// branches inside one is caught instead of giving a silently wrong gradient.
template <class E>
inline constexpr char form_tag = 0;

/// What a checkpoint entry tells the tape report about its segment.
struct segment_info {
  const char* name;
  const signature_item* signature;
  std::uint32_t signature_size;
  std::uint32_t replayed;  // values kept for the re-trace
};

template <class T, class B>
struct entry {
  void (*backward)(Tape<T, B>&, const void*) = nullptr;
  const void* payload = nullptr;
  std::uint32_t node_begin = 0;
  std::uint32_t node_end = 0;
  const segment_info* segment = nullptr;  // set for checkpoint entries
};

/// State of a checkpointed segment while it re-traces: the forward's signature to compare
/// against and the values the forward kept (selective policies, keep()). Owned by the
/// checkpoint code; the tape only consults it when a node is created.
///
/// Two ways to count the nodes the re-trace creates:
/// - the signature covers the segment's own recording, as its forward left it: node indices
///   from `base`. A nested checkpoint's forward run inside the re-trace records and rolls back
///   an inside of its own, which the signature does not list (`nested_forwards` > 0 then);
/// - kept values are keyed by stream position (creations counted from `stream_base`, roll-backs
///   notwithstanding), which names every node the segment's forward created, nested insides
///   included: so a nested checkpoint's forward run replays what the enclosing one kept.
template <class T>
struct retrace_state {
  using signature_item = detail::signature_item;
  const char* segment_name = "";
  std::uint32_t base = 0;                 // node index where the re-trace starts
  const signature_item* signature = nullptr;
  std::uint32_t signature_size = 0;
  const std::uint32_t* saved_index = nullptr;  // sorted stream offsets (from stream_base) of kept values
  T* const* saved_value = nullptr;
  const signature_item* saved_item = nullptr;  // what computed each kept value (op, shape, form)
  std::uint32_t saved_count = 0;
  std::uint32_t next_saved = 0;
  std::uint32_t stream_base = 0;      // the tape's stream position where the re-trace starts
  std::uint32_t nested_forwards = 0;  // nested checkpoints running their forward inside it
};

/// A reference from an entry to one operand: a tape node, or a parameter's external buffers.
template <class T>
struct operand {
  using value_type = T;
  const T* value = nullptr;
  T* external_adjoint = nullptr;  // a parameter's gradient (null when frozen or a tape node)
  std::uint32_t node = no_node;
  shape dims;
  bool requires_grad = false;
};

}  // namespace detail

/// A differentiable value: a cheap handle (tape, node index, epoch) to a tensor on a tape.
template <class T, Backend B = backend::cpu>
class Var {
 public:
  using value_type = T;
  using backend_type = B;
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;

  Var() = default;
  Var(Tape<T, B>* tape, std::uint32_t index, std::uint32_t epoch) : tape_(tape), index_(index), epoch_(epoch) {}

  /// Assigning an elementwise expression records it as one tape entry (defined in expr/).
  template <class E>
    requires requires { typename std::remove_cvref_t<E>::is_expression; }
  Var(E&& expression);  // NOLINT: implicit on purpose, `Var y = relu(a + b);`

  Tape<T, B>* tape() const { return tape_; }
  std::uint32_t index() const { return index_; }
  std::uint32_t epoch() const { return epoch_; }
  bool empty() const { return tape_ == nullptr; }

  shape dims() const;
  int rows() const { return dims().rows; }
  int cols() const { return dims().cols; }
  bool requires_grad() const;

  /// The value, as an Eigen map over the tape's buffer (CPU backend).
  Eigen::Map<const Matrix> value() const
    requires std::is_same_v<B, backend::cpu>;
  /// The value as a host matrix (a copy; any backend).
  Matrix to_host() const;
  /// The value of a 1x1 tensor (any backend).
  T item() const;

 private:
  Tape<T, B>* tape_ = nullptr;
  std::uint32_t index_ = 0;
  std::uint32_t epoch_ = 0;
};

template <class T, Backend B = backend::cpu>
class Tape {
  static_assert(std::is_floating_point_v<T>, "ckpt::Tape<T>: T must be float or double");

 public:
  using value_type = T;
  using backend_type = B;
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  using node_type = detail::node<T>;
  using entry_type = detail::entry<T, B>;

  explicit Tape(tape_options options = {}) : meta_(options.chunk_bytes) {}
  Tape(const Tape&) = delete;
  Tape& operator=(const Tape&) = delete;
  ~Tape() { reset_to(ckpt::position{}); }

  // ---------------------------------------------------------------- leaves

  /// A value that needs no gradient (inputs, targets), copied from a host matrix.
  template <class Derived>
  Var<T, B> constant(const Eigen::MatrixBase<Derived>& m) {
    return leaf_from(m, false, "constant");
  }
  /// A leaf whose gradient is wanted (read it with grad() after backward).
  template <class Derived>
  Var<T, B> variable(const Eigen::MatrixBase<Derived>& m) {
    return leaf_from(m, true, "variable");
  }
  /// A parameter as a Var: no copy, its gradient accumulates into the parameter.
  Var<T, B> param(Parameter<T, B>& p) {
    const std::uint32_t i = new_node(p.dims(), "parameter", op_kind::leaf, p.frozen() ? 0 : detail::requires_grad, false);
    node_type& n = nodes_[i];
    n.value = p.value_data();
    n.adjoint = p.grad_data();
    return var_of(i);
  }

  // ---------------------------------------------------------------- reverse pass

  /// Back-propagates from a 1x1 loss through the whole recording. Activations are released as
  /// the sweep passes them; the loss and retained Vars stay readable.
  void backward(const Var<T, B>& loss) {
    check(loss, "backward");
    const node_type& n = nodes_[loss.index()];
    if (n.dims != shape{1, 1})
      throw shape_error(detail::cat("backward: the loss must be 1x1, got ", n.dims, " (from op '", n.op, "')"));
    if (swept_)
      throw tape_error(
          "backward: this recording was already back-propagated; call reset() and record the step again");
    if (check_finite_) check_finite(loss);
    nodes_[loss.index()].flags |= detail::retained;
    if (!n.has(detail::requires_grad)) {
      swept_ = true;
      return;
    }
    // Swept once the seed is written: a call refused before any work (a CUDA backend called from
    // a thread that does not hold it) can be made again.
    B::for_each(1, detail::seed_loss<T>{adjoint_of(loss.index()), !nodes_[loss.index()].has(detail::owns_adjoint)});
    swept_ = true;
    prefetch_before(offloads_.size());  // the newest offloaded value is the first needed back
    sweep(0);
  }

  /// Sweeps the entries recorded since `p`, newest first (the caller seeds the adjoints).
  void backward_to(const ckpt::position& p) { sweep(p.entries); }

  /// Gradient of a Var after backward, as a host matrix (zeros when nothing flowed into it).
  Matrix grad(const Var<T, B>& v) const {
    check(v, "grad");
    const node_type& n = nodes_[v.index()];
    if (!n.adjoint) return Matrix::Zero(n.dims.rows, n.dims.cols);
    return detail::download<B>(n.adjoint, n.dims);
  }
  /// The value of a Var as a host matrix (any backend).
  Matrix to_host(const Var<T, B>& v) const {
    check(v, "to_host");
    return detail::download<B>(nodes_[v.index()].value, nodes_[v.index()].dims);
  }

  /// Keeps a Var's value (and gradient) readable after backward.
  void retain(const Var<T, B>& v) {
    check(v, "retain");
    nodes_[v.index()].flags |= detail::retained;
  }

  // ---------------------------------------------------------------- positions

  ckpt::position position() const {
    return {static_cast<std::uint32_t>(nodes_.size()), static_cast<std::uint32_t>(entries_.size()), meta_.position(),
            static_cast<std::uint32_t>(owned_.size())};
  }

  /// Drops everything recorded after `p`; Vars made after it become invalid.
  void reset_to(const ckpt::position& p) noexcept {
    settle_offloads(p.nodes);
    for (std::size_t i = nodes_.size(); i-- > p.nodes;) release_node(nodes_[i]);
    while (owned_.size() > p.owned) owned_.pop_back();
    nodes_.resize(p.nodes);
    entries_.resize(p.entries);
    meta_.reset_to(p.meta);
    ++epoch_;
    if (p.nodes == 0) swept_ = false;
  }

  /// A scoped nested recording: what is recorded while it lives is rolled back when it ends
  /// (also when an exception unwinds it). sweep() back-propagates just that part.
  class nested_recording {
   public:
    explicit nested_recording(Tape& t) : t_(t), start_(t.position()) {}
    nested_recording(const nested_recording&) = delete;
    nested_recording& operator=(const nested_recording&) = delete;
    ~nested_recording() { t_.reset_to(start_); }
    const ckpt::position& start() const { return start_; }
    void sweep() { t_.backward_to(start_); }

   private:
    Tape& t_;
    ckpt::position start_;
  };
  nested_recording nested() { return nested_recording(*this); }

  /// Starts the next step: drops the whole recording, advances the RNG step, resets the peak.
  void reset() noexcept {
    reset_to(ckpt::position{});
    ++step_;
    rng_counter_ = 0;
    pool_.reset_peak();
    host_pool_.reset_peak();
    counters_ = {};
    created_ = 0;
  }

  // ---------------------------------------------------------------- figures

  memory_stats memory() const {
    memory_stats m = pool_.stats();
    const memory_stats& h = host_pool_.stats();
    m.host_bytes = h.bytes;
    m.host_peak_bytes = h.peak_bytes;
    m.host_reserved_bytes = h.reserved_bytes;
    return m;
  }
  std::size_t bytes() const { return pool_.stats().bytes; }
  std::size_t peak_bytes() const { return pool_.stats().peak_bytes; }
  std::size_t entry_count() const { return entries_.size(); }
  std::size_t node_count() const { return nodes_.size(); }
  const op_counters& counters() const { return counters_; }
  op_counters& counters() { return counters_; }
  /// Returns the pool's cached free buffers to the backend.
  void trim() { pool_.trim(); }

  // ---------------------------------------------------------------- RNG keys and debug

  void set_seed(std::uint64_t s) { seed_ = s; }
  std::uint64_t seed() const { return seed_; }
  std::uint64_t step() const { return step_; }
  void set_step(std::uint64_t s) { step_ = s; }
  std::uint64_t rng_counter() const { return rng_counter_; }
  void set_rng_counter(std::uint64_t c) { rng_counter_ = c; }
  std::uint64_t next_rng_op() { return rng_counter_++; }

  /// When on, backward checks that the loss is finite and, if not, names the first entry
  /// that produced a non-finite value.
  void set_check_finite(bool on) { check_finite_ = on; }

  // ---------------------------------------------------------------- offload (policy::offload)

  /// Moves node i's value to pinned host memory on the backend's copy stream, while compute
  /// goes on; the device buffer returns to the pool once the copy is done. make_resident()
  /// brings it back (a checkpoint's reverse does, and prefetches the value needed next). A
  /// no-op on backends whose memory is host memory (the CPU: the value stays in place), for
  /// values the tape does not own or must keep readable (retained, or replayed by a re-trace
  /// from the same buffer), and inside a checkpointed segment (whose recording is rolled back
  /// at once: the copy would be wasted, and an enclosing checkpoint may keep the value).
  void offload(std::uint32_t i) {
    if constexpr (B::offloads) {
      node_type& n = nodes_[i];
      if (!n.has(detail::owns_value) || !n.value || n.has(detail::retained) || n.has(detail::offloaded) ||
          n.has(detail::replayed_too) || segment_base_ > 0 || retrace_depth_ > 0)
        return;
      detail::offload_record r{i, bytes_of(n.dims)};
      r.host = host_pool_.acquire(r.bytes);
      r.device = n.value;
      r.event = B::copy_to_host_async(r.host, r.device, r.bytes);
      // The record owns the device buffer from here on: nothing else may give it back while
      // the copy reads it (the sweep, a checkpoint freeing its boundary early).
      n.flags = static_cast<std::uint16_t>((n.flags & ~detail::owns_value) | detail::offloaded);
      offloads_.push_back(r);
      ++offloads_in_flight_;
      poll_offloads();
    } else {
      (void)i;
    }
  }

  /// Makes node i's value readable on the backend again (waits for, or starts, its copy back)
  /// and starts copying back the offloaded value before it, which the sweep needs next.
  void make_resident(std::uint32_t i) {
    if constexpr (B::offloads) {
      for (std::size_t k = offloads_.size(); k-- > 0;) {
        detail::offload_record& r = offloads_[k];
        if (r.node != i) continue;
        if (r.state == detail::offload_record::resident) return;
        node_type& n = nodes_[i];
        if (r.state == detail::offload_record::to_host) {  // still on the device: keep it there
          B::wait_event(r.event);  // later compute (reusing the pinned buffer) follows the copy
          --offloads_in_flight_;
          host_pool_.release(r.host, r.bytes);
          n.flags |= detail::owns_value;
        } else {
          if (r.state == detail::offload_record::on_host) prefetch(r);
          B::wait_event(r.event);  // compute waits for the copy, the host does not
          host_pool_.release(r.host, r.bytes);  // later copies into it are ordered after this one
          n.value = static_cast<T*>(r.device);
          n.flags |= detail::owns_value;
        }
        r.event = r.host = r.device = nullptr;
        r.state = detail::offload_record::resident;
        n.flags &= static_cast<std::uint16_t>(~detail::offloaded);
        prefetch_before(k);
        return;
      }
    } else {
      (void)i;
    }
  }

  // ---------------------------------------------------------------- for ops (not for users)

  /// Validates a Var used by `op`: same tape, recorded since the last reset, still held.
  void check(const Var<T, B>& v, const char* op) const {
    if (v.tape() == nullptr) throw tape_error(detail::cat(op, ": the Var is empty (default-constructed)"));
    if (v.tape() != this) throw tape_error(detail::cat(op, ": the Var belongs to another tape"));
    if (v.index() >= nodes_.size() || nodes_[v.index()].epoch != v.epoch())
      throw tape_error(detail::cat(op, ": the Var is from a finished recording (made before reset() or rolled back)"));
    const node_type& n = nodes_[v.index()];
    if (n.has(detail::consumed))
      throw tape_error(detail::cat(op, ": the value of Var #", v.index(), " ('", n.op, "', ", n.dims,
                                   ") was freed once the expression it was passed to as a temporary had been computed; "
                                   "name it (Var v = ...) to use it more than once"));
    if (n.has(detail::released))
      throw tape_error(detail::cat(op, ": the value of Var #", v.index(), " ('", n.op, "', ", n.dims,
                                   ") was released by backward; call tape.retain(v) before backward to keep it"));
    if (n.has(detail::offloaded))
      throw tape_error(detail::cat(op, ": the value of Var #", v.index(), " ('", n.op, "', ", n.dims,
                                   ") is offloaded to host memory (policy::offload) until the checkpoint that reads it re-traces"));
  }

  /// An operand reference for an entry, after validation. Notes captured outer values when a
  /// checkpointed segment is running (their adjoints must exist before its re-trace).
  detail::operand<T> operand_of(const Var<T, B>& v, const char* op) {
    check(v, op);
    node_type& n = nodes_[v.index()];
    note_use(v.index());
    ++n.uses;
    return {n.value, nullptr, v.index(), n.dims, n.has(detail::requires_grad)};
  }
  static detail::operand<T> operand_of(Parameter<T, B>& p) {
    return {p.value_data(), p.grad_data(), detail::no_node, p.dims(), !p.frozen()};
  }

  /// Creates a node with a fresh value buffer (or a saved one when a re-trace replays it).
  std::uint32_t new_node(shape s, const char* op, op_kind kind, std::uint16_t flags, bool allocate = true,
                         const void* form = nullptr) {
    if (retrace_ && retrace_->nested_forwards == 0) check_retrace(s, op, form);
    if (offloads_in_flight_) poll_offloads();
    node_type n;
    n.dims = s;
    n.epoch = epoch_;
    n.created = created_;
    n.origin = created_++;
    n.op = op;
    n.form = form;
    n.kind = kind;
    n.source = kind;
    n.flags = flags;
    if (retrace_depth_) ++counters_.nodes_retraced;
    if (retrace_ && (flags & detail::replayable) && take_saved(n)) {
      ++counters_.nodes_replayed;  // value taken from the checkpoint's saved buffers; not owned
    } else if (allocate) {
      n.value = static_cast<T*>(pool_.acquire(bytes_of(s)));
      n.flags |= detail::owns_value;
    }
    nodes_.push_back(n);
    return static_cast<std::uint32_t>(nodes_.size() - 1);
  }
  /// A node an op computes: transient (released by the sweep) and replayable unless said.
  /// `form` identifies a fused expression (&detail::form_tag<E>), null for other ops.
  std::uint32_t new_output(shape s, const char* op, op_kind kind, bool requires_grad, bool replayable = true,
                           const void* form = nullptr) {
    return new_node(s, op, kind,
                    static_cast<std::uint16_t>(detail::transient | (requires_grad ? detail::requires_grad : 0) |
                                              (replayable ? detail::replayable : 0)),
                    true, form);
  }
  /// Says that no entry of node i's own op reads its value in reverse (see consume()).
  void set_consumable(std::uint32_t i) { nodes_[i].flags |= detail::consumable; }
  /// Counts a use of node i that holds on to it without an operand reference: an op that
  /// passes a handle on (tag, eval of a Var), a checkpoint's input, a copied expression.
  /// (An index from a finished recording is ignored: validation reports it later.)
  void count_use(std::uint32_t i) {
    if (i < nodes_.size()) ++nodes_[i].uses;
  }
  /// Frees the value of node i, which was passed as a temporary (an rvalue Var) to an
  /// expression that has been computed and whose reverse does not read it, unless something
  /// else may read it: any other use (an operand reference or a passed-on handle: `uses` > 1),
  /// its own op's reverse (not `consumable`), a running segment's re-trace (it lies outside
  /// that segment), or a checkpoint that keeps it.
  void consume(std::uint32_t i) noexcept {
    node_type& n = nodes_[i];
    constexpr std::uint16_t needed = detail::consumable | detail::owns_value | detail::transient;
    if ((n.flags & needed) != needed || n.uses != 1 || n.has(detail::retained) || i < segment_base_ || i < adjoint_guard_)
      return;
    for (auto keeps : keep_rules_)
      if (keeps(n)) return;
    pool_.release(n.value, bytes_of(n.dims));
    n.value = nullptr;
    n.flags = static_cast<std::uint16_t>((n.flags & ~detail::owns_value) | detail::consumed);
  }
  /// While a checkpointed segment runs forward: what it keeps of its inside (its save
  /// predicate), so that consume() leaves those values alone. Nested segments stack.
  using keep_rule = bool (*)(const node_type&);
  void push_keep_rule(keep_rule r) { keep_rules_.push_back(r); }
  void pop_keep_rule() noexcept { keep_rules_.pop_back(); }

  /// True when the node's value came from a checkpoint's saved buffer: its op skips compute.
  bool is_replayed(std::uint32_t i) const {
    const node_type& n = nodes_[i];
    return n.value != nullptr && !n.has(detail::owns_value) && n.kind != op_kind::leaf;
  }

  /// Pushes an entry whose record `payload` is copied into the tape's arena. `node_begin` is
  /// the first node the op created: all nodes since then belong to this entry.
  template <class Payload>
  void push_entry(const Payload& payload, std::uint32_t node_begin, const detail::segment_info* segment = nullptr) {
    static_assert(std::is_trivially_destructible_v<Payload>, "entry records must be trivially destructible");
    const Payload* p = meta_.make(payload);
    entry_type e;
    e.backward = [](Tape& t, const void* rec) { static_cast<const Payload*>(rec)->backward(t); };
    e.payload = p;
    e.node_begin = node_begin;
    e.node_end = static_cast<std::uint32_t>(nodes_.size());
    e.segment = segment;
    entries_.push_back(e);
    ++counters_.entries_recorded;
  }
  template <class V>
  V* make_array(std::size_t n) {
    return meta_.make_array<V>(n);
  }

  template <class V>
  const V* make(const V& v) {
    return meta_.make(v);
  }

  /// Keeps an object (a checkpointed segment's callable, a chain's step) alive until the tape
  /// is rolled back to a position taken before this call. Trivial objects go to the arena;
  /// others get an owned holder. (Not keyed by the next entry's index: sequential() keeps its
  /// step before the first checkpoint, whose forward rolls back to that same entry index.)
  template <class V>
  const V* keep_object(V v) {
    if constexpr (std::is_trivially_copyable_v<V> && std::is_trivially_destructible_v<V>) {
      return meta_.make(v);
    } else {
      auto h = std::make_unique<owned_holder<V>>(std::move(v));
      const V* ptr = &h->value;
      owned_.push_back(std::move(h));
      return ptr;
    }
  }

  /// The adjoint of node i, allocated and zeroed on first use.
  T* adjoint_of(std::uint32_t i) {
    node_type& n = nodes_[i];
    if (!n.adjoint) {
      if (i < adjoint_guard_)
        throw tape_error(detail::cat("internal: adjoint of node #", i, " ('", n.op,
                                     "') requested inside a re-trace; a checkpointed segment used a Var it did not declare"));
      // Published once zeroed: if zeroing throws, the buffer goes back and the node has none.
      T* fresh = static_cast<T*>(pool_.acquire(bytes_of(n.dims)));
      try {
        B::fill_zero(fresh, n.dims.size());
      } catch (...) {
        pool_.release(fresh, bytes_of(n.dims));
        throw;
      }
      n.adjoint = fresh;
      n.flags |= detail::owns_adjoint;
    }
    return n.adjoint;
  }
  T* adjoint_of(const detail::operand<T>& o) {
    if (!o.requires_grad) return nullptr;
    return o.node == detail::no_node ? o.external_adjoint : adjoint_of(o.node);
  }
  /// The adjoint of node i if anything flowed into it, else null (its entry has nothing to do).
  T* adjoint_if(std::uint32_t i) const { return nodes_[i].adjoint; }

  node_type& node(std::uint32_t i) { return nodes_[i]; }
  const node_type& node(std::uint32_t i) const { return nodes_[i]; }
  const std::vector<node_type>& nodes() const { return nodes_; }
  const std::vector<entry_type>& entries() const { return entries_; }
  /// Nodes created since the last reset(), roll-backs notwithstanding (see retrace_state).
  std::uint32_t stream_position() const { return created_; }
  Var<T, B> var_of(std::uint32_t i) { return Var<T, B>(this, i, nodes_[i].epoch); }
  buffer_pool<B>& pool() { return pool_; }
  static std::size_t bytes_of(shape s) { return static_cast<std::size_t>(s.size()) * sizeof(T); }

  // Checkpoint hooks ------------------------------------------------------------------
  /// While a segment runs forward, outer nodes it reads are collected (see operand_of).
  struct segment_scope {
    std::uint32_t base;
    std::size_t uses_begin;
  };
  segment_scope open_segment() { return {static_cast<std::uint32_t>(nodes_.size()), outer_uses_.size()}; }
  std::vector<std::uint32_t>& outer_uses() { return outer_uses_; }
  std::uint32_t innermost_segment_base() const { return segment_base_; }
  void set_segment_base(std::uint32_t b) { segment_base_ = b; }
  detail::retrace_state<T>* retrace() const { return retrace_; }
  void set_retrace(detail::retrace_state<T>* r) { retrace_ = r; }
  /// How many re-traces are running (nested checkpoints re-trace inside re-traces).
  void enter_retrace() { ++retrace_depth_; }
  void leave_retrace() { --retrace_depth_; }
  std::uint32_t adjoint_guard() const { return adjoint_guard_; }
  void set_adjoint_guard(std::uint32_t g) { adjoint_guard_ = g; }
  /// Detaches a node's value buffer so that rolling the node back does not free it.
  T* steal_value(std::uint32_t i) {
    node_type& n = nodes_[i];
    n.flags &= static_cast<std::uint16_t>(~detail::owns_value);
    return n.value;
  }
  void release_node(node_type& n) noexcept {
    if (n.has(detail::owns_value) && n.value) pool_.release(n.value, bytes_of(n.dims));
    if (n.has(detail::owns_adjoint) && n.adjoint) pool_.release(n.adjoint, bytes_of(n.dims));
    if (n.has(detail::owns_value)) n.value = nullptr;
    if (n.has(detail::owns_adjoint)) n.adjoint = nullptr;
    n.flags &= static_cast<std::uint16_t>(~(detail::owns_value | detail::owns_adjoint));
  }

 private:
  struct owned_base {
    virtual ~owned_base() = default;
  };
  template <class V>
  struct owned_holder final : owned_base {
    explicit owned_holder(V&& v) : value(std::move(v)) {}
    V value;
  };

  template <class Derived>
  Var<T, B> leaf_from(const Eigen::MatrixBase<Derived>& m, bool grad, const char* op) {
    const shape s{static_cast<int>(m.rows()), static_cast<int>(m.cols())};
    const std::uint32_t i = new_node(s, op, op_kind::leaf, grad ? detail::requires_grad : 0);
    detail::upload<B>(nodes_[i].value, m);
    return var_of(i);
  }

  void note_use(std::uint32_t i) {
    if (i < segment_base_) {
      const node_type& n = nodes_[i];
      if (n.has(detail::requires_grad) && !(n.adjoint && !n.has(detail::owns_adjoint))) outer_uses_.push_back(i);
    }
  }

  void sweep(std::uint32_t entry_begin) {
    for (std::size_t e = entries_.size(); e-- > entry_begin;) {
      const entry_type en = entries_[e];
      en.backward(*this, en.payload);
      for (std::uint32_t i = en.node_begin; i < en.node_end; ++i) {
        node_type& n = nodes_[i];
        if (n.has(detail::transient) && !n.has(detail::retained)) {
          release_node(n);
          n.flags |= detail::released;
        }
      }
    }
  }

  void check_finite(const Var<T, B>& loss) const {
    T l;
    B::to_host(&l, nodes_[loss.index()].value, 1);
    if (std::isfinite(l)) return;
    std::vector<T> host;
    for (std::size_t i = 0; i < nodes_.size(); ++i) {
      const node_type& n = nodes_[i];
      if (!n.value) continue;
      host.resize(static_cast<std::size_t>(n.dims.size()));
      B::to_host(host.data(), n.value, n.dims.size());
      for (long k = 0; k < n.dims.size(); ++k) {
        if (!std::isfinite(host[static_cast<std::size_t>(k)]))
          throw numeric_error(detail::cat("backward: the loss is ", l, "; the first non-finite value came from node #", i,
                                          " (op '", n.op, "', ", n.dims, ") at element ", k));
      }
    }
    throw numeric_error(detail::cat("backward: the loss is ", l));
  }

  void check_retrace(shape s, const char* op, const void* form) {
    detail::retrace_state<T>& r = *retrace_;
    const std::uint32_t k = static_cast<std::uint32_t>(nodes_.size()) - r.base;
    if (k >= r.signature_size)
      throw checkpoint_error(detail::cat("checkpoint '", r.segment_name, "': the re-trace recorded more entries than the forward (",
                                         r.signature_size, "); extra entry #", k, " is '", op, "' ", s,
                                         ". A segment must record the same ops on every call (does it branch on mutable state?)"));
    const auto& want = r.signature[k];
    const std::uint32_t at = created_ - r.stream_base;
    if (at != want.stream)
      throw checkpoint_error(detail::cat("checkpoint '", r.segment_name, "': the re-trace differs from the forward before entry #", k,
                                         " ('", want.op, "' ", want.dims, "): a nested checkpoint's segment recorded ",
                                         at > want.stream ? at - want.stream : want.stream - at,
                                         at > want.stream ? " op(s) more" : " op(s) fewer",
                                         " inside than in the forward. A segment must record the same ops on every call (does it "
                                         "branch on mutable state?)"));
    if (!want.same_op(op, s, form))
      throw checkpoint_error(detail::cat("checkpoint '", r.segment_name, "': the re-trace differs from the forward at entry #", k,
                                         ": forward recorded '", want.op, "' ", want.dims, ", re-trace recorded '", op, "' ", s,
                                         want.same_op(op, s, want.form) ? " (another expression fused into it)"
                                             : "",
                                         ". A segment must record the same ops on every call (does it branch on mutable state?)"));
  }

  bool take_saved(node_type& n) {
    detail::retrace_state<T>& r = *retrace_;
    const std::uint32_t k = n.origin - r.stream_base;
    while (r.next_saved < r.saved_count && r.saved_index[r.next_saved] < k) ++r.next_saved;
    if (r.next_saved < r.saved_count && r.saved_index[r.next_saved] == k) {
      // The signature does not cover a nested checkpoint's inside: check here that the value
      // replayed there is the one the forward computed at this point.
      const detail::signature_item& want = r.saved_item[r.next_saved];
      if (!want.same_op(n.op, n.dims, n.form))
        throw checkpoint_error(detail::cat("checkpoint '", r.segment_name, "': inside a nested checkpoint, the re-trace recorded '", n.op,
                                           "' ", n.dims, " where the forward computed the kept value '", want.op, "' ", want.dims,
                                           ". A segment must record the same ops on every call (does it branch on mutable state?)"));
      n.value = r.saved_value[r.next_saved++];
      return true;
    }
    return false;
  }

  // Offload bookkeeping (only backends with B::offloads use it).
  void poll_offloads() noexcept {
    if constexpr (B::offloads) {
      for (auto& r : offloads_) {
        if (r.state != detail::offload_record::to_host || !B::event_done(r.event)) continue;
        B::release_event(r.event);
        r.event = nullptr;
        pool_.release(r.device, r.bytes);
        nodes_[r.node].value = nullptr;
        r.device = nullptr;
        r.state = detail::offload_record::on_host;
        --offloads_in_flight_;
      }
    }
  }
  void prefetch(detail::offload_record& r) {
    if constexpr (B::offloads) {
      r.device = pool_.acquire(r.bytes);
      r.event = B::copy_to_device_async(r.device, r.host, r.bytes);
      r.state = detail::offload_record::to_device;
    }
  }
  /// Starts copying back the newest value offloaded before record k.
  void prefetch_before(std::size_t k) {
    if constexpr (B::offloads) {
      poll_offloads();
      while (k-- > 0)
        if (offloads_[k].state == detail::offload_record::on_host) {
          prefetch(offloads_[k]);
          return;
        }
    } else {
      (void)k;
    }
  }
  /// Ends the offloads of nodes from `first` on: waits for copies in flight and gives their
  /// buffers back (a roll-back or reset drops those nodes).
  void settle_offloads(std::uint32_t first) noexcept {
    if constexpr (B::offloads) {
      while (!offloads_.empty() && offloads_.back().node >= first) {
        detail::offload_record& r = offloads_.back();
        if (r.event) B::finish_event(r.event);
        if (r.state == detail::offload_record::to_host) --offloads_in_flight_;
        if (r.device) pool_.release(r.device, r.bytes);  // to_host and to_device: the record's
        if (r.state == detail::offload_record::to_host) nodes_[r.node].value = nullptr;
        if (r.host) host_pool_.release(r.host, r.bytes);
        if (r.state != detail::offload_record::resident) nodes_[r.node].flags &= static_cast<std::uint16_t>(~detail::offloaded);
        offloads_.pop_back();
      }
    } else {
      (void)first;
    }
  }
  buffer_pool<B> pool_;
  std::vector<detail::offload_record> offloads_;  // in the order the values were offloaded
  std::uint32_t offloads_in_flight_ = 0;          // records in state to_host
  buffer_pool<detail::host_memory_of<B>> host_pool_;  // pinned host buffers, cached like the device's
  arena meta_;
  std::vector<node_type> nodes_;
  std::vector<entry_type> entries_;
  std::vector<std::uint32_t> outer_uses_;
  std::vector<keep_rule> keep_rules_;
  std::vector<std::unique_ptr<owned_base>> owned_;
  std::uint32_t epoch_ = 1;
  std::uint32_t segment_base_ = 0;
  std::uint32_t adjoint_guard_ = 0;
  detail::retrace_state<T>* retrace_ = nullptr;
  std::uint32_t retrace_depth_ = 0;
  std::uint32_t created_ = 0;  // stream position: nodes created since reset()
  std::uint64_t seed_ = 0x5eed;
  std::uint64_t step_ = 0;
  std::uint64_t rng_counter_ = 0;
  op_counters counters_;
  bool swept_ = false;
  bool check_finite_ = false;
};

// ------------------------------------------------------------------ Var members

template <class T, Backend B>
shape Var<T, B>::dims() const {
  if (!tape_) throw tape_error("dims: the Var is empty (default-constructed)");
  tape_->check(*this, "dims");
  return tape_->node(index_).dims;
}

template <class T, Backend B>
bool Var<T, B>::requires_grad() const {
  if (!tape_) throw tape_error("requires_grad: the Var is empty (default-constructed)");
  tape_->check(*this, "requires_grad");
  return tape_->node(index_).has(detail::requires_grad);
}

template <class T, Backend B>
Eigen::Map<const typename Var<T, B>::Matrix> Var<T, B>::value() const
  requires std::is_same_v<B, backend::cpu>
{
  if (!tape_) throw tape_error("value: the Var is empty (default-constructed)");
  tape_->check(*this, "value");
  const auto& n = tape_->node(index_);
  return Eigen::Map<const Matrix>(n.value, n.dims.rows, n.dims.cols);
}

template <class T, Backend B>
typename Var<T, B>::Matrix Var<T, B>::to_host() const {
  if (!tape_) throw tape_error("to_host: the Var is empty (default-constructed)");
  return tape_->to_host(*this);
}

template <class T, Backend B>
T Var<T, B>::item() const {
  if (!tape_) throw tape_error("item: the Var is empty (default-constructed)");
  tape_->check(*this, "item");
  const auto& n = tape_->node(index_);
  if (n.dims != shape{1, 1}) throw shape_error(detail::cat("item: the Var is ", n.dims, ", not 1x1"));
  T v;
  B::to_host(&v, n.value, 1);
  return v;
}

}  // namespace ckpt
