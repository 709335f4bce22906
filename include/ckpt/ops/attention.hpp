// ckpt — multi-head attention, batched over sequences and heads. attention_scores (the scores
// K^T Q of every (sequence, head)) and attention_output (V P) are one entry each, whose forward
// and reverse are strided batched GEMMs (one per head, batched over the sequences), instead of
// a slice, a product and a concatenation per sequence and head; the softmax between them is the
// row-wise op of ops/rowwise.hpp (a column of the scores is one query's scores over the keys).
// attention() is the three as one entry, whose reverse goes head by head (see there).
//
// Layout (features x tokens, as everywhere): q and k are d x (T * sequences), sequence s in
// columns [s T, (s + 1) T), head h in rows [h d / heads, (h + 1) d / heads). The scores are
// T x (T * heads * sequences), block (s, h) in columns [(s heads + h) T, + T), keys x queries.
// v is dv x (T * sequences) with its own head width dv / heads; the output has v's shape.
// (attention() also takes k and v with fewer heads: grouped-query attention, see there.)
#pragma once
#include "ckpt/config.hpp"
#include "ckpt/expr/functors.hpp"
#include "ckpt/ops/operand.hpp"
#include "ckpt/ops/rowwise.hpp"

#include <cmath>
#include <optional>
#include <type_traits>

namespace ckpt {

namespace detail {

/// One operand of attention's batched products: the block of sequence s and head h is the
/// matrix at p + (h / share) * head_step + s * stride, with leading dimension ld. `share` is 1
/// but for the keys and values of grouped-query attention, whose head serves `share` query heads.
template <class P>
struct head_view {
  P* p;
  int ld;
  long head_step, stride;
  int share = 1;
  P* at(int h) const { return p + (h / share) * head_step; }
  head_view shared_by(int group) const { return {p, ld, head_step, stride, group}; }
};

/// The batched-head geometry of a d x (T * sequences) tensor.
struct head_blocks {
  int heads, seq_len, sequences;
  int width;  // rows of a head: d / heads
  int rows;   // d
  int products() const { return heads * sequences; }
  /// A d x (T * sequences) tensor (q, k, v, the output): head h's rows of sequence s's columns.
  template <class P>
  head_view<P> tokens(P* p) const {
    return {p, rows, width, static_cast<long>(rows) * seq_len};
  }
  /// The T x (T * heads * sequences) scores or weights: block (s, h), keys x queries.
  template <class P>
  head_view<P> scores(P* p) const {
    const long block = static_cast<long>(seq_len) * seq_len;
    return {p, seq_len, block, heads * block};
  }
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

/// q and k's geometry: equal shapes that split into heads and sequences.
inline head_blocks query_key_blocks(shape sq, shape sk, int heads, int seq_len, const char* op) {
  if (sq != sk) throw shape_error(cat(op, ": q ", sq, " and k ", sk, " differ"));
  return split_heads(sq, heads, seq_len, op, "q");
}

/// C(s, h) = alpha op(A(s, h)) op(B(s, h)) + beta C(s, h) for every sequence s and head h: one
/// batched product per head, over the sequences (a head's rows are a second stride that one
/// strided batch cannot take). Counted as heads x sequences products.
template <class B, class TapeT, class T, class PA, class PB>
void per_head_products(TapeT& t, const head_blocks& g, bool ta, bool tb, int m, int n, int k, T alpha, head_view<PA> a, head_view<PB> b,
                       T beta, head_view<T> c) {
  static_assert(std::is_same_v<std::remove_const_t<PA>, T> && std::is_same_v<std::remove_const_t<PB>, T>);
  for (int h = 0; h < g.heads; ++h)
    B::gemm_batched(ta, tb, m, n, k, alpha, a.at(h), a.ld, a.stride, b.at(h), b.ld, b.stride, beta, c.at(h), c.ld, c.stride, g.sequences);
  t.counters().gemms += static_cast<std::size_t>(g.products());
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

/// scores = scale K^T Q per block (g: q's geometry), keys after their query -infinity when
/// causal.
template <class B, class TapeT, class T>
void compute_scores(TapeT& t, const head_blocks& g, T scale, const T* q, head_view<const T> k, T* scores, bool causal) {
  const int L = g.seq_len;
  per_head_products<B>(t, g, true, false, L, L, g.width, scale, k, g.tokens(q), T(0), g.scores(scores));
  if (causal) B::for_each_2d(shape{L, L * g.products()}, causal_mask<T>{scores, nullptr, L});
}

/// Reverse of S = scale K^T Q per block: dQ += scale K dS, dK += scale Q dS^T.
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
    const shape s = t.node(out).dims;
    // Causal: the products read a copy of the adjoint with the masked entries zeroed, a
    // temporary the size of the scores from the tape's pool.
    std::optional<typename std::remove_reference_t<decltype(t.pool())>::lease> masked;
    if (causal) {
      masked.emplace(t.pool(), TapeT::bytes_of(s));
      B::for_each_2d(s, causal_mask<T>{masked->template as<T>(), ds, g.seq_len});
      ds = masked->template as<T>();
    }
    const int L = g.seq_len;
    if (dq) per_head_products<B>(t, g, false, false, g.width, L, L, scale, g.tokens(k.value), g.scores(ds), T(1), g.tokens(dq));
    if (dk) per_head_products<B>(t, g, false, true, g.width, L, L, scale, g.tokens(q.value), g.scores(ds), T(1), g.tokens(dk));
  }
};

/// Reverse of O = V P per block: dV += dO P^T, dP += V^T dO.
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
    const int L = g.seq_len;
    if (dv) per_head_products<B>(t, g, false, true, g.width, L, L, T(1), g.tokens(d), g.scores(p.value), T(1), g.tokens(dv));
    if (dp) per_head_products<B>(t, g, true, false, L, L, g.width, T(1), g.tokens(v.value), g.tokens(d), T(1), g.scores(dp));
  }
};

/// The softmax's reverse for one head of attention(), in place: column j of `d` (sequence
/// j / L, query j % L) holds dP and becomes dS = P .* (dP - sum(dP .* P)), P's column read from
/// the weights of that sequence and head. Where P is 0 (a causal mask's keys) dS is 0 too.
template <class T>
struct attention_weights_reverse {
  const T* p;       // head h's block of sequence 0 in the weights
  long p_stride;    // from one sequence's block to the next's
  T* d;             // L x (L * sequences): dP in, dS out
  int L;
  template <class Lanes>
  CKPT_HOST_DEVICE void operator()(long j, const Lanes& lanes) const {
    const T* y = p + (j / L) * p_stride + (j % L) * L;
    T* g = d + j * L;
    const T dot = static_cast<T>(column_sum<T>(L, lanes, [g, y](int i) { return g[i] * y[i]; }));
    for (int i = lanes.lane(); i < L; i += lanes.width()) g[i] = y[i] * (g[i] - dot);
  }
};

/// attention()'s geometry: q's heads and head width, k's and v's (kv_heads of them, each serving
/// `group` query heads), the output's (q's heads, v's head width).
struct attention_blocks {
  head_blocks q, k, v, out;
  int group;  // query heads per key/value head: 1 but in grouped-query attention
};

/// Reverse of attention(): O = V P, P = softmax(S), S = scale K^T Q per block, one entry that
/// keeps P. dV += dO P^T for every head at once; then one head at a time, in a scratch of one
/// head's blocks (L x L x sequences), dP = V^T dO, dS from the softmax's reverse in place, and
/// dQ += scale K dS, dK += scale Q dS^T. Neither dP nor dS ever exists for all heads at once.
/// A key/value head shared by a group of query heads gathers their shares in dK and dV, in the
/// order of the query heads.
template <class T>
struct attention_entry {
  operand<T> q, k, v;
  std::uint32_t weights, out;
  attention_blocks g;
  T scale;
  template <class TapeT>
  void backward(TapeT& t) const {
    using B = typename TapeT::backend_type;
    const T* d = t.adjoint_if(out);
    if (!d) return;
    const T* p = t.node(weights).value;
    T* dq = t.adjoint_of(q);
    T* dk = t.adjoint_of(k);
    T* dv = t.adjoint_of(v);
    const int L = g.q.seq_len;
    const head_view<const T> pv = g.q.scores(p), dov = g.out.tokens(d);
    if (dv) per_head_products<B>(t, g.q, false, true, g.v.width, L, L, T(1), dov, pv, T(1), g.v.tokens(dv).shared_by(g.group));
    if (!dq && !dk) return;
    const shape block{L, L * g.q.sequences};
    typename std::remove_reference_t<decltype(t.pool())>::lease scratch(t.pool(), TapeT::bytes_of(block));
    T* ds = scratch.template as<T>();
    const long L2 = static_cast<long>(L) * L;
    const head_view<const T> vv = g.v.tokens(v.value).shared_by(g.group), kv = g.k.tokens(k.value).shared_by(g.group);
    const head_view<const T> qv = g.q.tokens(q.value);
    const int w = g.q.width, n = g.q.sequences;
    for (int h = 0; h < g.q.heads; ++h) {
      B::gemm_batched(true, false, L, L, g.v.width, T(1), vv.at(h), vv.ld, vv.stride, dov.at(h), dov.ld, dov.stride, T(0), ds, L, L2, n);
      B::for_each_column(block, attention_weights_reverse<T>{pv.at(h), pv.stride, ds, L});
      if (dq) {
        const head_view<T> to = g.q.tokens(dq);
        B::gemm_batched(false, false, w, L, L, scale, kv.at(h), kv.ld, kv.stride, ds, L, L2, T(1), to.at(h), to.ld, to.stride, n);
      }
      if (dk) {
        const head_view<T> to = g.k.tokens(dk).shared_by(g.group);
        B::gemm_batched(false, true, w, L, L, scale, qv.at(h), qv.ld, qv.stride, ds, L, L2, T(1), to.at(h), to.ld, to.stride, n);
      }
    }
    t.counters().gemms += static_cast<std::size_t>(g.q.products()) * (1 + (dq ? 1 : 0) + (dk ? 1 : 0));
  }
};

/// attention()'s shapes: q splits into heads; k has q's tokens and a number of q's heads' rows
/// that divides q's heads (all of them, or fewer: grouped-query attention); v splits into as
/// many heads as k, over the same tokens.
inline attention_blocks attention_geometry(shape sq, shape sk, shape sv, int heads, int seq_len, const char* op) {
  if (sk.cols != sq.cols) throw shape_error(cat(op, ": k ", sk, " and q ", sq, " have different numbers of tokens"));
  const head_blocks gq = split_heads(sq, heads, seq_len, op, "q");
  // (q with no rows has heads of width 0: then k has none either, and as many heads.)
  const bool fits = sk.rows == sq.rows || (gq.width > 0 && sk.rows > 0 && sk.rows % gq.width == 0 && heads % (sk.rows / gq.width) == 0);
  if (!fits)
    throw shape_error(cat(op, ": k ", sk, " must have q's ", sq.rows, " rows, or for grouped-query attention a number of heads of ", gq.width,
                          " rows (q's) that divides q's ", heads, " heads"));
  const int kv_heads = sk.rows == sq.rows ? heads : sk.rows / gq.width;
  const head_blocks gk = split_heads(sk, kv_heads, seq_len, op, "k");
  if (kv_heads != heads && sv.rows % kv_heads != 0)
    throw shape_error(cat(op, ": v ", sv, " has ", sv.rows, " rows, which do not split into the ", kv_heads, " key/value heads of k ", sk));
  const head_blocks gv = split_heads(sv, kv_heads, seq_len, op, "v");
  if (sv.cols != sq.cols) throw shape_error(cat(op, ": v ", sv, " and q ", sq, " have different numbers of tokens"));
  const head_blocks go{heads, seq_len, gq.sequences, gv.width, heads * gv.width};
  return {gq, gk, gv, go, heads / kv_heads};
}

}  // namespace detail

/// scale * K^T Q for every sequence and head, keys x queries: q and k are d x (seq_len *
/// sequences) with heads blocks of d / heads rows; the result is seq_len x (seq_len * heads *
/// sequences), block (s, h) at columns [(s * heads + h) * seq_len, + seq_len). With `causal`,
/// a key after its query scores -infinity (softmax gives it weight 0, and no gradient flows
/// through it).
template <expr::Operand Q, expr::Operand K>
auto attention_scores(Q&& qin, K&& kin, int heads, int seq_len, double scale, bool causal = false) {
  const char* op = "attention_scores";
  const detail::head_blocks g = detail::query_key_blocks(detail::shape_of(qin, op), detail::shape_of(kin, op), heads, seq_len, op);
  auto q = detail::resolve(std::forward<Q>(qin), op);
  auto k = detail::resolve(std::forward<K>(kin), op);
  auto& t = detail::shared_tape(op, q, k);
  using T = typename std::remove_reference_t<decltype(t)>::value_type;
  using B = typename std::remove_reference_t<decltype(t)>::backend_type;
  const bool grad = q.ref.requires_grad || k.ref.requires_grad;
  const std::uint32_t begin = static_cast<std::uint32_t>(t.node_count());
  const shape so{seq_len, seq_len * heads * g.sequences};
  const std::uint32_t out = t.new_output(so, op, op_kind::matmul, grad);
  const T s = static_cast<T>(scale);
  if (!t.is_replayed(out)) detail::compute_scores<B>(t, g, s, q.ref.value, g.tokens(k.ref.value), t.node(out).value, causal);
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
  auto& t = detail::shared_tape(op, v, p);
  using T = typename std::remove_reference_t<decltype(t)>::value_type;
  using B = typename std::remove_reference_t<decltype(t)>::backend_type;
  const bool grad = v.ref.requires_grad || p.ref.requires_grad;
  const std::uint32_t begin = static_cast<std::uint32_t>(t.node_count());
  const std::uint32_t out = t.new_output(sv, op, op_kind::matmul, grad);
  if (!t.is_replayed(out))
    detail::per_head_products<B>(t, g, false, false, g.width, seq_len, seq_len, T(1), g.tokens(v.ref.value), g.scores(p.ref.value), T(0),
                                 g.tokens(t.node(out).value));
  if (grad) t.push_entry(detail::attention_output_entry<T>{v.ref, p.ref, out, g}, begin);
  t.set_consumable(out);  // the reverse reads v and p, never the output
  return t.var_of(out);
}

/// Multi-head scaled dot-product attention, softmax(K^T Q / sqrt(d / heads)) per sequence and
/// head, applied to V. q: d x (seq_len * sequences) in `heads` heads; k: the same, or with fewer
/// heads of the same width for grouped-query attention (kv_heads dividing heads; query head h
/// uses key/value head h / (heads / kv_heads); one key/value head is multi-query attention);
/// v: kv_heads heads of any width dv over the same tokens. The result has heads x dv rows and
/// v's columns (v's shape when k has q's heads). One entry, the computation of
/// attention_output(v, softmax(attention_scores(q, k, ...))) with the same bits when k has q's
/// heads, which keeps the weights P (a node of op "attention.weights", kind matmul, so
/// save::matmul keeps it with the output and a re-trace redoes nothing) and whose reverse works
/// one head at a time: it holds P and a scratch of one head's blocks, where the three entries
/// held P, its adjoint and the scores' adjoint.
template <expr::Operand Q, expr::Operand K, expr::Operand V>
auto attention(Q&& qin, K&& kin, V&& vin, int heads, int seq_len, bool causal = false) {
  // Every shape first, so that a bad v throws before anything is recorded.
  const char* op = "attention";
  const detail::attention_blocks g =
      detail::attention_geometry(detail::shape_of(qin, op), detail::shape_of(kin, op), detail::shape_of(vin, op), heads, seq_len, op);
  auto q = detail::resolve(std::forward<Q>(qin), op);
  auto k = detail::resolve(std::forward<K>(kin), op);
  auto v = detail::resolve(std::forward<V>(vin), op);
  auto& t = detail::shared_tape(op, q, k, v);
  using T = typename std::remove_reference_t<decltype(t)>::value_type;
  using B = typename std::remove_reference_t<decltype(t)>::backend_type;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(g.q.width)));
  const bool grad = q.ref.requires_grad || k.ref.requires_grad || v.ref.requires_grad;
  const shape sp{seq_len, seq_len * heads * g.q.sequences}, so{g.out.rows, g.q.sequences * seq_len};
  auto weights_into = [&](T* p) {
    detail::compute_scores<B>(t, g.q, scale, q.ref.value, g.k.tokens(k.ref.value).shared_by(g.group), p, causal);
    B::for_each_column(sp, detail::softmax_forward<T>{p, p, seq_len, false});  // in place
  };
  auto output_from = [&](const T* p, T* o) {
    detail::per_head_products<B>(t, g.q, false, false, g.v.width, seq_len, seq_len, T(1), g.v.tokens(v.ref.value).shared_by(g.group),
                                 g.q.scores(p), T(0), g.out.tokens(o));
  };
  const std::uint32_t begin = static_cast<std::uint32_t>(t.node_count());
  if (!grad) {  // nothing will read P: a temporary from the pool, not a node
    const std::uint32_t out = t.new_output(so, op, op_kind::matmul, false);
    if (!t.is_replayed(out)) {
      typename std::remove_reference_t<decltype(t.pool())>::lease p(t.pool(), Tape<T, B>::bytes_of(sp));
      weights_into(p.template as<T>());
      output_from(p.template as<T>(), t.node(out).value);
    }
    t.set_consumable(out);  // no entry reads it
    return t.var_of(out);
  }
  const std::uint32_t weights = t.new_output(sp, "attention.weights", op_kind::matmul, false);
  const std::uint32_t out = t.new_output(so, op, op_kind::matmul, true);
  T* p = t.node(weights).value;
  if (!t.is_replayed(weights)) weights_into(p);
  if (!t.is_replayed(out)) output_from(p, t.node(out).value);
  t.push_entry(detail::attention_entry<T>{q.ref, k.ref, v.ref, weights, out, g, scale}, begin);
  t.set_consumable(out);  // the reverse reads q, k, v and P, never the output
  return t.var_of(out);
}

// Found by argument-dependent lookup for expression arguments too (expressions live in
// ckpt::expr), so that `tanh(a + b)` means ckpt::tanh without `using namespace ckpt`.
namespace expr {
using ckpt::attention, ckpt::attention_output, ckpt::attention_scores;
}  // namespace expr

}  // namespace ckpt
