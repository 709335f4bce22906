// ckpt — multi-head attention's two products, batched over sequences and heads: the scores
// K^T Q of every (sequence, head) and the output V P. One entry each, whose forward and reverse
// are strided batched GEMMs (one per head, batched over the sequences), instead of a slice,
// a product and a concatenation per sequence and head. The softmax between them is the
// row-wise op of ops/rowwise.hpp: a column of the scores is one query's scores over the keys.
//
// Layout (features x tokens, as everywhere): q and k are d x (T * sequences), sequence s in
// columns [s T, (s + 1) T), head h in rows [h d / heads, (h + 1) d / heads). The scores are
// T x (T * heads * sequences), block (s, h) in columns [(s heads + h) T, + T), keys x queries.
// v is dv x (T * sequences) with its own head width dv / heads; the output has v's shape.
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/expr/functors.hpp"
#include "ckpt/ops/operand.hpp"
#include "ckpt/ops/rowwise.hpp"

#include <cmath>

namespace ckpt {

namespace detail {

/// The batched-head geometry of a d x (T * sequences) tensor.
struct head_blocks {
  int heads, seq_len, sequences;
  int width;  // rows of a head: d / heads
  int rows;   // d
  long head_rows_offset(int h) const { return static_cast<long>(h) * width; }
  long sequence_stride() const { return static_cast<long>(rows) * seq_len; }
  long score_offset(int h) const { return static_cast<long>(h) * seq_len * seq_len; }
  long score_stride() const { return static_cast<long>(heads) * seq_len * seq_len; }
  int products() const { return heads * sequences; }
};

/// Checks that an `s` tensor splits into `heads` heads of rows and whole sequences of
/// `seq_len` columns; `what` names the tensor in the message.
inline head_blocks split_heads(shape s, int heads, int seq_len, const char* op, const char* what) {
  if (heads < 1 || seq_len < 1)
    throw shape_error(cat(op, ": heads (", heads, ") and seq_len (", seq_len, ") must be positive"));
  if (s.rows % heads != 0) throw shape_error(cat(op, ": ", what, " ", s, " has ", s.rows, " rows, which do not split into ", heads, " heads"));
  if (s.cols % seq_len != 0)
    throw shape_error(cat(op, ": ", what, " ", s, " has ", s.cols, " columns, which are not whole sequences of ", seq_len));
  return {heads, seq_len, s.cols / seq_len, s.rows / heads, s.rows};
}

/// Sets the scores of keys after their query to -infinity (forward), or copies an adjoint with
/// those entries zeroed (reverse: they are constants, whatever follows the scores).
template <class T>
struct causal_mask {
  T* out;
  const T* in;  // null: mask `out` in place
  int T_;
  CKPT_HOST_DEVICE void operator()(int key, int c) const {
    const long i = key + static_cast<long>(c) * T_;
    const bool masked = key > c % T_;
    if (in)
      out[i] = masked ? T(0) : in[i];
    else if (masked)
      out[i] = -fn::infinity<T>();
  }
};

template <class T>
struct attention_scores_entry {
  operand<T> q, k;
  std::uint32_t out;
  head_blocks g;
  T scale;
  bool causal;
  template <class TapeT>
  void backward(TapeT& t) const {
    using B = typename TapeT::backend_type;
    const T* ds = t.adjoint_if(out);
    if (!ds) return;
    T* dq = t.adjoint_of(q);
    T* dk = t.adjoint_of(k);
    // The masked copy of the adjoint is a tensor the size of the scores: it comes from the
    // tape's pool (counted in bytes() and peak_bytes(), reused by later ops in stream order)
    // and goes back when the products are queued, also if one of them throws.
    struct pooled {
      decltype(t.pool())& pool;
      void* p;
      std::size_t bytes;
      ~pooled() {
        if (p) pool.release(p, bytes);
      }
    } masked{t.pool(), nullptr, 0};
    if (causal) {
      const shape s = t.node(out).dims;
      masked.bytes = TapeT::bytes_of(s);
      masked.p = t.pool().acquire(masked.bytes);
      B::for_each_2d(s, causal_mask<T>{static_cast<T*>(masked.p), ds, g.seq_len});
      ds = static_cast<const T*>(masked.p);
    }
    const long ss = g.sequence_stride();
    for (int h = 0; h < g.heads; ++h) {
      const long o = g.head_rows_offset(h);
      const T* dsh = ds + g.score_offset(h);
      if (dq) B::gemm_batched(false, false, g.width, g.seq_len, g.seq_len, scale, k.value + o, g.rows, ss, dsh, g.seq_len, g.score_stride(), T(1), dq + o, g.rows, ss, g.sequences);
      if (dk) B::gemm_batched(false, true, g.width, g.seq_len, g.seq_len, scale, q.value + o, g.rows, ss, dsh, g.seq_len, g.score_stride(), T(1), dk + o, g.rows, ss, g.sequences);
    }
    t.counters().gemms += static_cast<std::size_t>((dq ? 1 : 0) + (dk ? 1 : 0)) * static_cast<std::size_t>(g.products());
  }
};

template <class T>
struct attention_output_entry {
  operand<T> v, p;
  std::uint32_t out;
  head_blocks g;  // v's geometry
  template <class TapeT>
  void backward(TapeT& t) const {
    using B = typename TapeT::backend_type;
    const T* d = t.adjoint_if(out);
    if (!d) return;
    T* dv = t.adjoint_of(v);
    T* dp = t.adjoint_of(p);
    const long ss = g.sequence_stride();
    for (int h = 0; h < g.heads; ++h) {
      const long o = g.head_rows_offset(h), so = g.score_offset(h);
      if (dv) B::gemm_batched(false, true, g.width, g.seq_len, g.seq_len, T(1), d + o, g.rows, ss, p.value + so, g.seq_len, g.score_stride(), T(1), dv + o, g.rows, ss, g.sequences);
      if (dp) B::gemm_batched(true, false, g.seq_len, g.seq_len, g.width, T(1), v.value + o, g.rows, ss, d + o, g.rows, ss, T(1), dp + so, g.seq_len, g.score_stride(), g.sequences);
    }
    t.counters().gemms += static_cast<std::size_t>((dv ? 1 : 0) + (dp ? 1 : 0)) * static_cast<std::size_t>(g.products());
  }
};

}  // namespace detail

/// scale * K^T Q for every sequence and head, keys x queries: q and k are d x (seq_len *
/// sequences) with heads blocks of d / heads rows; the result is seq_len x (seq_len * heads *
/// sequences), block (s, h) at columns [(s * heads + h) * seq_len, + seq_len). With `causal`,
/// a key after its query scores -infinity (softmax gives it weight 0, and no gradient flows
/// through it).
template <expr::Operand Q, expr::Operand K>
auto attention_scores(Q&& qin, K&& kin, int heads, int seq_len, double scale, bool causal = false) {
  const char* op = "attention_scores";
  const shape sq = detail::shape_of(qin, op), sk = detail::shape_of(kin, op);
  if (sq != sk) throw shape_error(detail::cat(op, ": q ", sq, " and k ", sk, " differ"));
  const detail::head_blocks g = detail::split_heads(sq, heads, seq_len, op, "q");
  auto q = detail::resolve(std::forward<Q>(qin), op);
  auto k = detail::resolve(std::forward<K>(kin), op);
  auto& t = detail::tape_of(q, k, op);
  using T = typename std::remove_reference_t<decltype(t)>::value_type;
  using B = typename std::remove_reference_t<decltype(t)>::backend_type;
  const bool grad = q.ref.requires_grad || k.ref.requires_grad;
  const std::uint32_t begin = static_cast<std::uint32_t>(t.node_count());
  const shape so{seq_len, seq_len * heads * g.sequences};
  const std::uint32_t out = t.new_output(so, op, op_kind::matmul, grad);
  const T s = static_cast<T>(scale);
  if (!t.is_replayed(out)) {
    T* y = t.node(out).value;
    for (int h = 0; h < heads; ++h) {
      const long o = g.head_rows_offset(h);
      B::gemm_batched(true, false, seq_len, seq_len, g.width, s, k.ref.value + o, g.rows, g.sequence_stride(), q.ref.value + o, g.rows,
                      g.sequence_stride(), T(0), y + g.score_offset(h), seq_len, g.score_stride(), g.sequences);
    }
    t.counters().gemms += static_cast<std::size_t>(g.products());
    if (causal) B::for_each_2d(so, detail::causal_mask<T>{y, nullptr, seq_len});
  }
  if (grad) t.push_entry(detail::attention_scores_entry<T>{q.ref, k.ref, out, g, s, causal}, begin);
  t.set_consumable(out);  // the reverse reads q and k, never the scores
  return t.var_of(out);
}

/// V P for every sequence and head: v is dv x (seq_len * sequences) with heads blocks of
/// dv / heads rows, p the seq_len x (seq_len * heads * sequences) weights (keys x queries, as
/// attention_scores lays them out, usually their softmax). The result has v's shape: head h of
/// sequence s is v's block times p's block (s, h).
template <expr::Operand V, expr::Operand P>
auto attention_output(V&& vin, P&& pin, int heads, int seq_len) {
  const char* op = "attention_output";
  const shape sv = detail::shape_of(vin, op), sp = detail::shape_of(pin, op);
  const detail::head_blocks g = detail::split_heads(sv, heads, seq_len, op, "v");
  const shape want{seq_len, seq_len * heads * g.sequences};
  if (sp != want)
    throw shape_error(detail::cat(op, ": weights ", sp, " do not fit v ", sv, " with ", heads, " heads and sequences of ", seq_len,
                                  " (expected ", want, ")"));
  auto v = detail::resolve(std::forward<V>(vin), op);
  auto p = detail::resolve(std::forward<P>(pin), op);
  auto& t = detail::tape_of(v, p, op);
  using T = typename std::remove_reference_t<decltype(t)>::value_type;
  using B = typename std::remove_reference_t<decltype(t)>::backend_type;
  const bool grad = v.ref.requires_grad || p.ref.requires_grad;
  const std::uint32_t begin = static_cast<std::uint32_t>(t.node_count());
  const std::uint32_t out = t.new_output(sv, op, op_kind::matmul, grad);
  if (!t.is_replayed(out)) {
    T* y = t.node(out).value;
    for (int h = 0; h < heads; ++h) {
      const long o = g.head_rows_offset(h);
      B::gemm_batched(false, false, g.width, seq_len, seq_len, T(1), v.ref.value + o, g.rows, g.sequence_stride(), p.ref.value + g.score_offset(h),
                      seq_len, g.score_stride(), T(0), y + o, g.rows, g.sequence_stride(), g.sequences);
    }
    t.counters().gemms += static_cast<std::size_t>(g.products());
  }
  if (grad) t.push_entry(detail::attention_output_entry<T>{v.ref, p.ref, out, g}, begin);
  t.set_consumable(out);  // the reverse reads v and p, never the output
  return t.var_of(out);
}

/// Multi-head scaled dot-product attention, softmax(K^T Q / sqrt(d / heads)) per sequence and
/// head, applied to V: three entries (attention_scores, softmax, attention_output). q, k: d x
/// (seq_len * sequences), v: dv x (seq_len * sequences); the result has v's shape. The scores
/// are freed once the softmax is computed (neither reverse reads them), so a layer holds the
/// weights and the output, as the hand-written step does.
template <expr::Operand Q, expr::Operand K, expr::Operand V>
auto attention(Q&& q, K&& k, V&& v, int heads, int seq_len, bool causal = false) {
  // Every shape first, so that a bad v throws before the scores and softmax are recorded.
  const char* op = "attention";
  const shape sq = detail::shape_of(q, op), sk = detail::shape_of(k, op), sv = detail::shape_of(v, op);
  if (sq != sk) throw shape_error(detail::cat(op, ": q ", sq, " and k ", sk, " differ"));
  detail::split_heads(sq, heads, seq_len, op, "q");
  detail::split_heads(sv, heads, seq_len, op, "v");
  if (sv.cols != sq.cols) throw shape_error(detail::cat(op, ": v ", sv, " and q ", sq, " have different numbers of tokens"));
  const double scale = 1.0 / std::sqrt(static_cast<double>(sq.rows / heads));
  auto weights = softmax(attention_scores(std::forward<Q>(q), std::forward<K>(k), heads, seq_len, scale, causal));
  return attention_output(std::forward<V>(v), std::move(weights), heads, seq_len);
}

// Found by argument-dependent lookup for expression arguments too (expressions live in
// ckpt::expr), so that `tanh(a + b)` means ckpt::tanh without `using namespace ckpt`.
namespace expr {
using ckpt::attention, ckpt::attention_output, ckpt::attention_scores;
}  // namespace expr

}  // namespace ckpt
