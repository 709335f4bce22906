// Property: checkpointing never changes a gradient. 10,000 random small programs, each from
// a fixed seed, are run twice -- once with no checkpoint anywhere, once with random ranges of
// ops wrapped in checkpoint() calls, nested to a random depth, with random save predicates
// (nothing, matrix products, a tag, both), random inputs vs captured outer Vars, random output
// forms (Var, pair, vector; pass-through, dead and parameter outputs) and chains of steps run
// by sequential<P> under a random policy -- and the loss, every gradient (inputs and
// parameters) and the retained values of the loss terms must be equal bit for bit, in float
// and in double. A subset is checked against central finite differences as well.
//
// CKPT_PROPERTY_PROGRAMS=<n> runs n programs instead of 10,000 (e.g. a long soak run);
// CKPT_PROPERTY_FIRST=<k> starts at program k (to replay one that failed: its number and seed
// are in the failure message).
#include "checkpoint/checkpoint_support.hpp"

#include <algorithm>
#include <array>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

using namespace ckpt;
using namespace ckpt::test;

namespace {

// ------------------------------------------------------------------ what a program is

enum class opk : std::uint8_t {
  unary,      // fn: tanh sigmoid relu gelu silu neg square exp∘tanh log(1+x²) sqrt(1+x²)
  binary,     // fn: + - * a/(1+b²), with broadcasting
  affine,     // a * s + s2 * (step + 1): depends on the step number inside chains
  fused,      // tanh(a ⊙ P + Q), P and Q parameters (rows x 1)
  matmul_p,   // P a; fn: 0 Parameter, 1 tape.param(P), 2 transpose(P) (P stored transposed)
  matmul_r,   // a P
  matmul_tl,  // transpose(a) b
  matmul_tr,  // a transpose(b)
  matmul_vv,  // a b
  softmax,
  log_softmax,
  layer_norm,
  rms_norm,
  sum,
  mean,
  mse,
  cross_entropy,
  dropout,
  transpose,
  slice,
  gather,     // gather_cols(a, labels): columns picked with repeats
  concat,
  const_mul,  // a ⊙ C with C a constant recorded where the op runs (inside a segment, too)
  residual,   // a * 0.5 + tanh(b)
  param_var,  // tape.param(P) itself (a parameter's Var, made where the op runs; a is not read)
  chain,      // sequential<policy>(steps, step body, a), the step capturing outer values
};

struct op {
  opk kind = opk::unary;
  int fn = 0;
  int a = -1, b = -1;          // operand values
  int p = -1, q = -1;          // parameters
  double s = 0, s2 = 0;
  int i0 = 0, i1 = 0;          // slice range; constant seed
  std::vector<int> labels;     // cross_entropy; gather: the ids
  std::vector<int> captures;   // chain: outer values the step reads
  int chain = -1;              // chain: index into random_program::chains
  bool tag_t = false, keep_v = false;
};

/// A range of ops [begin, end) of a body that runs as one checkpoint() call.
struct region {
  int begin = 0, end = 0;
  std::vector<region> children;  // disjoint, sorted, inside [begin, end)
  std::vector<int> inputs;       // 1 to 3 values defined before it, passed as inputs; the rest is captured
  std::vector<int> outputs;      // values it returns (used later, a pass-through input, a dead one)
  int save = 0;                  // 0 nothing, 1 matmul, 2 tagged<"t">, 3 any<matmul, tagged<"t">>
  int form = 2;                  // 0 Var, 1 std::pair, 2 std::vector
};

/// Straight-line code: values 0..n_inputs-1 are given, op k defines value n_inputs + k.
struct body {
  int n_inputs = 0;
  std::vector<shape> shapes;  // of every value
  std::vector<op> ops;
  std::vector<region> regions;
  std::vector<int> results;   // the loss terms, or a step's result
};

struct chain_def {
  body step;  // value 0: the state; 1..: captured outer values
  int steps = 1;
  int policy = 0;
};

struct random_program {
  std::uint64_t seed = 0;
  std::vector<shape> inputs;
  std::vector<bool> constant;  // an input without gradient
  std::vector<shape> params;
  std::vector<bool> frozen;
  std::vector<chain_def> chains;
  body main;
  // figures for the summary
  int checkpoints = 0, depth = 0;
};

constexpr int policy_count = 14;
const char* const policy_names[policy_count] = {"none",        "every<1>",    "every<2>",    "every<3>",          "sqrt_n",
                                                "binomial<0>", "binomial<1>", "binomial<2>", "binomial<3>",       "selective<matmul>",
                                                "selective<tagged<t>,2>",     "offload<every<2>>",  "user thirds_matmul", "user two_snapshots"};

// ------------------------------------------------------------------ generating one

struct generator {
  rng64 rng;
  random_program& prog;
  bool smooth;  // no relu: the program is also checked against finite differences

  int new_param(shape s, bool may_freeze = true) {
    prog.params.push_back(s);
    prog.frozen.push_back(may_freeze && rng.coin(0.08));
    return static_cast<int>(prog.params.size()) - 1;
  }
  /// An existing parameter of shape s half of the time (shared between ops, segments, steps).
  int param_of(shape s) {
    if (rng.coin(0.5)) {
      std::vector<int> fit;
      for (std::size_t i = 0; i < prog.params.size(); ++i)
        if (prog.params[i] == s) fit.push_back(static_cast<int>(i));
      if (!fit.empty()) return fit[static_cast<std::size_t>(rng.below(static_cast<int>(fit.size())))];
    }
    return new_param(s);
  }
  int pick_value(const body& bd) {
    const int n = static_cast<int>(bd.shapes.size());
    if (rng.coin(0.6)) return std::max(0, n - 1 - rng.below(std::min(n, 3)));
    return rng.below(n);
  }
  /// A value whose shape satisfies `ok`, or -1.
  template <class F>
  int pick_where(const body& bd, F&& ok) {
    std::vector<int> fit;
    for (int i = 0; i < static_cast<int>(bd.shapes.size()); ++i)
      if (ok(bd.shapes[static_cast<std::size_t>(i)])) fit.push_back(i);
    if (fit.empty()) return -1;
    return fit[static_cast<std::size_t>(rng.below(static_cast<int>(fit.size())))];
  }
  static bool broadcastable(shape a, shape b) {
    auto d = [](int x, int y) { return x == y || x == 1 || y == 1; };
    return d(a.rows, b.rows) && d(a.cols, b.cols);
  }

  void push(body& bd, op o, shape s) {
    o.tag_t = rng.coin(0.2);
    o.keep_v = rng.coin(0.04);
    bd.ops.push_back(std::move(o));
    bd.shapes.push_back(s);
  }

  /// Appends one random op reading values of bd.
  void random_op(body& bd, bool allow_chain, int& chains_left) {
    op o;
    o.a = pick_value(bd);
    const shape sa = bd.shapes[static_cast<std::size_t>(o.a)];
    for (;;) {
      const int k = rng.below(100);
      if (k < 16) {
        o.kind = opk::unary;
        o.fn = rng.below(10);
        if (smooth && o.fn == 2) o.fn = 0;
        return push(bd, o, sa);
      }
      if (k < 30) {
        o.kind = opk::binary;
        o.fn = rng.below(4);
        o.b = pick_where(bd, [&](shape s) { return broadcastable(sa, s) && std::max(sa.rows, s.rows) <= 6; });
        if (o.b < 0) continue;
        const shape sb = bd.shapes[static_cast<std::size_t>(o.b)];
        return push(bd, o, {std::max(sa.rows, sb.rows), std::max(sa.cols, sb.cols)});
      }
      if (k < 35) {
        o.kind = opk::affine;
        o.s = rng.uniform(-1.5, 1.5);
        o.s2 = rng.uniform(-0.1, 0.1);
        return push(bd, o, sa);
      }
      if (k < 41) {
        o.kind = opk::fused;
        o.p = param_of({sa.rows, 1});
        o.q = param_of({sa.rows, 1});
        return push(bd, o, sa);
      }
      if (k < 50) {
        o.kind = opk::matmul_p;
        o.fn = rng.below(3);
        const int r = rng.between(1, 4);
        o.p = o.fn == 2 ? param_of({sa.rows, r}) : param_of({r, sa.rows});
        return push(bd, o, {r, sa.cols});
      }
      if (k < 54) {
        o.kind = opk::matmul_r;
        const int c = rng.between(1, 4);
        o.p = param_of({sa.cols, c});
        return push(bd, o, {sa.rows, c});
      }
      if (k < 57) {
        o.kind = opk::matmul_tl;
        o.b = pick_where(bd, [&](shape s) { return s.rows == sa.rows; });
        if (o.b < 0) continue;
        return push(bd, o, {sa.cols, bd.shapes[static_cast<std::size_t>(o.b)].cols});
      }
      if (k < 60) {
        o.kind = opk::matmul_tr;
        o.b = pick_where(bd, [&](shape s) { return s.cols == sa.cols; });
        if (o.b < 0) continue;
        return push(bd, o, {sa.rows, bd.shapes[static_cast<std::size_t>(o.b)].rows});
      }
      if (k < 63) {
        o.kind = opk::matmul_vv;
        o.b = pick_where(bd, [&](shape s) { return s.rows == sa.cols; });
        if (o.b < 0) continue;
        return push(bd, o, {sa.rows, bd.shapes[static_cast<std::size_t>(o.b)].cols});
      }
      if (k < 66) {
        o.kind = rng.coin(0.5) ? opk::softmax : opk::log_softmax;
        return push(bd, o, sa);
      }
      if (k < 70) {
        o.kind = rng.coin(0.5) ? opk::layer_norm : opk::rms_norm;
        o.p = param_of({sa.rows, 1});
        o.q = param_of({sa.rows, 1});
        return push(bd, o, sa);
      }
      if (k < 74) {
        const int r = rng.below(4);
        if (r == 2) {
          o.kind = opk::mse;
          o.b = pick_where(bd, [&](shape s) { return s == sa; });
        } else if (r == 3) {
          o.kind = opk::cross_entropy;
          for (int j = 0; j < sa.cols; ++j) o.labels.push_back(rng.below(sa.rows));
        } else {
          o.kind = r == 0 ? opk::sum : opk::mean;
        }
        return push(bd, o, {1, 1});
      }
      if (k < 79) {
        o.kind = opk::dropout;
        o.s = rng.coin(0.5) ? 0.25 : 0.5;
        return push(bd, o, sa);
      }
      if (k < 82) {
        o.kind = opk::transpose;
        return push(bd, o, {sa.cols, sa.rows});
      }
      if (k < 85) {
        if (rng.coin(0.5)) {
          o.kind = opk::gather;
          const int n = rng.between(1, 5);
          for (int j = 0; j < n; ++j) o.labels.push_back(rng.below(sa.cols));
          return push(bd, o, {sa.rows, n});
        }
        if (sa.rows < 2) continue;
        o.kind = opk::slice;
        o.i1 = rng.between(1, sa.rows - 1);
        o.i0 = rng.between(0, sa.rows - o.i1);
        return push(bd, o, {o.i1, sa.cols});
      }
      if (k < 88) {
        o.kind = opk::concat;
        o.b = pick_where(bd, [&](shape s) { return s.cols == sa.cols && s.rows + sa.rows <= 6; });
        if (o.b < 0) continue;
        return push(bd, o, {sa.rows + bd.shapes[static_cast<std::size_t>(o.b)].rows, sa.cols});
      }
      if (k < 91) {
        o.kind = opk::const_mul;
        o.i0 = static_cast<int>(rng.next() % 100000);
        return push(bd, o, sa);
      }
      if (k < 93) {
        o.kind = opk::param_var;
        o.p = param_of({rng.between(1, 4), rng.between(1, 4)});
        return push(bd, o, prog.params[static_cast<std::size_t>(o.p)]);
      }
      if (k < 97) {
        o.kind = opk::residual;
        o.b = pick_where(bd, [&](shape s) { return s == sa; });
        return push(bd, o, sa);
      }
      if (!allow_chain || chains_left == 0) continue;
      --chains_left;
      o.kind = opk::chain;
      o.chain = static_cast<int>(prog.chains.size());
      const int ncap = rng.below(3);
      for (int c = 0; c < ncap; ++c) o.captures.push_back(rng.below(static_cast<int>(bd.shapes.size())));
      chain_def ch;
      ch.steps = rng.between(1, 8);
      ch.policy = rng.below(policy_count);
      ch.step.n_inputs = 1 + ncap;
      ch.step.shapes.push_back(sa);
      for (int c : o.captures) ch.step.shapes.push_back(bd.shapes[static_cast<std::size_t>(c)]);
      int none = 0;
      const int n = rng.between(1, 5);
      for (int i = 0; i < n; ++i) random_op(ch.step, false, none);
      // Back to the state's shape: P z Q, then a residual with the state.
      int z = static_cast<int>(ch.step.shapes.size()) - 1;
      shape sz = ch.step.shapes.back();
      if (sz.rows != sa.rows) {
        op m;
        m.kind = opk::matmul_p;
        m.a = z;
        m.p = param_of({sa.rows, sz.rows});
        push(ch.step, m, {sa.rows, sz.cols});
        z = static_cast<int>(ch.step.shapes.size()) - 1;
        sz = ch.step.shapes.back();
      }
      if (sz.cols != sa.cols) {
        op m;
        m.kind = opk::matmul_r;
        m.a = z;
        m.p = param_of({sz.cols, sa.cols});
        push(ch.step, m, sa);
        z = static_cast<int>(ch.step.shapes.size()) - 1;
      }
      op res;
      res.kind = opk::residual;
      res.a = 0;
      res.b = z;
      push(ch.step, res, sa);
      ch.step.results = {static_cast<int>(ch.step.shapes.size()) - 1};
      regions_for(ch.step, rng.below(3));
      prog.chains.push_back(std::move(ch));
      return push(bd, o, sa);
    }
  }

  /// Values op k reads.
  static std::vector<int> reads(const op& o) {
    std::vector<int> r{o.a};
    if (o.b >= 0) r.push_back(o.b);
    r.insert(r.end(), o.captures.begin(), o.captures.end());
    return r;
  }

  std::vector<region> random_regions(const body& bd, int begin, int end, int depth, int max_depth) {
    std::vector<region> out;
    int i = begin;
    while (i < end) {
      if (depth < max_depth && rng.coin(0.35)) {
        region r;
        r.begin = i;
        r.end = i + rng.between(1, std::min(end - i, 8));
        r.children = random_regions(bd, r.begin, r.end, depth + 1, max_depth);
        r.save = rng.below(4);
        out.push_back(std::move(r));
        i = out.back().end;
        prog.checkpoints++;
        prog.depth = std::max(prog.depth, depth + 1);
      } else {
        ++i;
      }
    }
    return out;
  }

  /// Inputs (1 to 3 of what it reads from before it; the rest is captured) and outputs.
  void finish_region(const body& bd, region& r) {
    for (region& c : r.children) finish_region(bd, c);  // first: the parent can only return what they return
    const int first = bd.n_inputs + r.begin, last = bd.n_inputs + r.end;  // values [first, last) are its own
    std::vector<int> before;
    for (int k = r.begin; k < r.end; ++k)
      for (int v : reads(bd.ops[static_cast<std::size_t>(k)]))
        if (v < first && std::find(before.begin(), before.end(), v) == before.end()) before.push_back(v);
    const int n_in = rng.between(1, std::min<int>(3, static_cast<int>(before.size())));
    for (int j = 0; j < n_in; ++j) {
      const int at = rng.below(static_cast<int>(before.size()));
      r.inputs.push_back(before[static_cast<std::size_t>(at)]);
      before.erase(before.begin() + at);
    }
    auto add_output = [&](int v) {
      if (std::find(r.outputs.begin(), r.outputs.end(), v) == r.outputs.end()) r.outputs.push_back(v);
    };
    for (int v = first; v < last; ++v) {
      bool used = std::find(bd.results.begin(), bd.results.end(), v) != bd.results.end();
      for (std::size_t k = static_cast<std::size_t>(r.end); k < bd.ops.size() && !used; ++k)
        for (int w : reads(bd.ops[k])) used = used || w == v;
      if (used) add_output(v);
    }
    if (rng.coin(0.25)) add_output(r.inputs[static_cast<std::size_t>(rng.below(static_cast<int>(r.inputs.size())))]);
    if (rng.coin(0.25) || r.outputs.empty()) {
      // a value the region's body defines itself or gets back from a child (those are visible)
      std::vector<int> visible;
      for (int v = first; v < last; ++v) {
        bool inside_child = false, returned = false;
        for (const region& c : r.children) {
          inside_child = inside_child || (v >= bd.n_inputs + c.begin && v < bd.n_inputs + c.end);
          returned = returned || std::find(c.outputs.begin(), c.outputs.end(), v) != c.outputs.end();
        }
        if (!inside_child || returned) visible.push_back(v);
      }
      if (!visible.empty()) add_output(visible[static_cast<std::size_t>(rng.below(static_cast<int>(visible.size())))]);
      if (r.outputs.empty()) add_output(r.inputs[0]);  // its children return only pass-throughs
    }
    // a random order, so that pass-through and dead outputs are not always last
    for (std::size_t j = r.outputs.size(); j > 1; --j) std::swap(r.outputs[j - 1], r.outputs[static_cast<std::size_t>(rng.below(static_cast<int>(j)))]);
    if (r.outputs.size() == 1)
      r.form = rng.coin(0.7) ? 0 : 2;
    else if (r.outputs.size() == 2)
      r.form = rng.coin(0.5) ? 1 : 2;
    else
      r.form = 2;
  }

  void regions_for(body& bd, int max_depth) {
    bd.regions = random_regions(bd, 0, static_cast<int>(bd.ops.size()), 0, max_depth);
    for (region& r : bd.regions) finish_region(bd, r);
  }

  void generate() {
    const int n_in = rng.between(1, 3);
    body& bd = prog.main;
    bd.n_inputs = n_in;
    for (int i = 0; i < n_in; ++i) {
      const shape s{rng.between(1, 4), rng.between(1, 4)};
      prog.inputs.push_back(s);
      prog.constant.push_back(i > 0 && rng.coin(0.25));
      bd.shapes.push_back(s);
    }
    int chains_left = 2;
    const int n = rng.between(3, 16);
    for (int i = 0; i < n; ++i) random_op(bd, true, chains_left);
    // Loss terms: the last value and about half of the values nothing reads.
    std::vector<bool> read(bd.shapes.size(), false);
    for (const op& o : bd.ops)
      for (int v : reads(o)) read[static_cast<std::size_t>(v)] = true;
    const int last = static_cast<int>(bd.shapes.size()) - 1;
    bd.results.push_back(last);
    for (int v = bd.n_inputs; v < last; ++v)
      if (!read[static_cast<std::size_t>(v)] && rng.coin(0.5)) bd.results.push_back(v);
    regions_for(bd, rng.below(4));
  }
};

random_program make_program(std::uint64_t seed, bool smooth) {
  random_program p;
  p.seed = seed;
  generator g{rng64(seed), p, smooth};
  g.generate();
  return p;
}

// ------------------------------------------------------------------ describing one (on failure)

const char* op_name(const op& o) {
  switch (o.kind) {
    case opk::unary: {
      static const char* const u[] = {"tanh", "sigmoid", "relu", "gelu", "silu", "neg", "square", "exp_tanh", "log1p_sq", "sqrt1p_sq"};
      return u[o.fn];
    }
    case opk::binary: {
      static const char* const b[] = {"add", "sub", "mul", "div_safe"};
      return b[o.fn];
    }
    case opk::affine: return "affine";
    case opk::fused: return "fused";
    case opk::matmul_p: return o.fn == 0 ? "matmul(P,a)" : o.fn == 1 ? "matmul(param(P),a)" : "matmul(P^T,a)";
    case opk::matmul_r: return "matmul(a,P)";
    case opk::matmul_tl: return "matmul(a^T,b)";
    case opk::matmul_tr: return "matmul(a,b^T)";
    case opk::matmul_vv: return "matmul(a,b)";
    case opk::softmax: return "softmax";
    case opk::log_softmax: return "log_softmax";
    case opk::layer_norm: return "layer_norm";
    case opk::rms_norm: return "rms_norm";
    case opk::sum: return "sum";
    case opk::mean: return "mean";
    case opk::mse: return "mse";
    case opk::cross_entropy: return "cross_entropy";
    case opk::dropout: return "dropout";
    case opk::transpose: return "transpose";
    case opk::slice: return "slice_rows";
    case opk::gather: return "gather_cols";
    case opk::concat: return "concat_rows";
    case opk::const_mul: return "const_mul";
    case opk::residual: return "residual";
    case opk::param_var: return "param";
    case opk::chain: return "chain";
  }
  return "?";
}

void describe_regions(std::ostream& o, const std::vector<region>& rs, int indent) {
  for (const region& r : rs) {
    o << std::string(static_cast<std::size_t>(indent), ' ') << "checkpoint ops [" << r.begin << ", " << r.end << ") save " << r.save
      << " form " << r.form << " inputs";
    for (int v : r.inputs) o << " v" << v;
    o << " outputs";
    for (int v : r.outputs) o << " v" << v;
    o << '\n';
    describe_regions(o, r.children, indent + 2);
  }
}

void describe_body(std::ostream& o, const random_program& p, const body& bd, int indent) {
  const std::string pad(static_cast<std::size_t>(indent), ' ');
  for (std::size_t k = 0; k < bd.ops.size(); ++k) {
    const op& x = bd.ops[k];
    const std::size_t v = static_cast<std::size_t>(bd.n_inputs) + k;
    o << pad << "v" << v << " " << bd.shapes[v] << " = " << op_name(x) << "(v" << x.a;
    if (x.b >= 0) o << ", v" << x.b;
    if (x.p >= 0) o << ", P" << x.p;
    if (x.q >= 0) o << ", P" << x.q;
    o << ")" << (x.tag_t ? " tag t" : "") << (x.keep_v ? " keep" : "") << '\n';
    if (x.kind == opk::chain) {
      const chain_def& c = p.chains[static_cast<std::size_t>(x.chain)];
      o << pad << "  chain of " << c.steps << " steps under " << policy_names[c.policy] << ", captures";
      for (int w : x.captures) o << " v" << w;
      o << '\n';
      describe_body(o, p, c.step, indent + 4);
    }
  }
  describe_regions(o, bd.regions, indent);
}

std::string describe(const random_program& p) {
  std::ostringstream o;
  o << "program seed " << p.seed << ": inputs";
  for (std::size_t i = 0; i < p.inputs.size(); ++i) o << " v" << i << " " << p.inputs[i] << (p.constant[i] ? " (constant)" : "");
  o << "; " << p.params.size() << " parameters\n";
  describe_body(o, p, p.main, 2);
  o << "  loss terms:";
  for (int v : p.main.results) o << " v" << v;
  return o.str();
}

// ------------------------------------------------------------------ running one

template <class T>
struct machine;

template <class T, class R>
struct segment_fn;

/// The step of a chain: interprets the chain's body.
template <class T>
struct chain_step {
  machine<T>* m;
  const chain_def* c;
  std::shared_ptr<const std::vector<Var<T>>> captured;
  Var<T> operator()(std::size_t i, const Var<T>& x) const;
};

template <class T>
struct machine {
  using env = std::vector<Var<T>>;
  const random_program& prog;
  std::vector<Parameter<T>>& params;
  Tape<T>& t;
  bool checkpoints;  // false: the same program with no checkpoint anywhere

  Parameter<T>& P(int i) { return params[static_cast<std::size_t>(i)]; }

  Var<T> unary(int fn, const Var<T>& a) {
    switch (fn) {
      case 0: return tanh(a);
      case 1: return sigmoid(a);
      case 2: return relu(a);
      case 3: return gelu(a);
      case 4: return silu(a);
      case 5: return -a;
      case 6: return square(a);
      case 7: return exp(tanh(a));
      case 8: return log(square(a) + T(1));
      default: return sqrt(square(a) + T(1));
    }
  }
  Var<T> binary(int fn, const Var<T>& a, const Var<T>& b) {
    switch (fn) {
      case 0: return a + b;
      case 1: return a - b;
      case 2: return a * b;
      default: return a / (square(b) + T(1));
    }
  }

  Var<T> apply(const op& o, env& e, std::size_t step) {
    const Var<T> a = e[static_cast<std::size_t>(o.a)];
    const Var<T> b = o.b >= 0 ? e[static_cast<std::size_t>(o.b)] : Var<T>();
    Var<T> y;
    switch (o.kind) {
      case opk::unary: y = unary(o.fn, a); break;
      case opk::binary: y = binary(o.fn, a, b); break;
      case opk::affine: y = a * static_cast<T>(o.s) + static_cast<T>(o.s2) * static_cast<T>(step + 1); break;
      case opk::fused: y = tanh(a * P(o.p) + P(o.q)); break;
      case opk::matmul_p:
        if (o.fn == 0) y = matmul(P(o.p), a);
        else if (o.fn == 1) y = matmul(t.param(P(o.p)), a);
        else y = matmul(transpose(P(o.p)), a);
        break;
      case opk::matmul_r: y = matmul(a, P(o.p)); break;
      case opk::matmul_tl: y = matmul(transpose(a), b); break;
      case opk::matmul_tr: y = matmul(a, transpose(b)); break;
      case opk::matmul_vv: y = matmul(a, b); break;
      case opk::softmax: y = softmax(a); break;
      case opk::log_softmax: y = log_softmax(a); break;
      case opk::layer_norm: y = layer_norm(a, P(o.p), P(o.q)); break;
      case opk::rms_norm: y = rms_norm(a, P(o.p)); break;
      case opk::sum: y = sum(a); break;
      case opk::mean: y = mean(a); break;
      case opk::mse: y = o.b >= 0 ? mse(a, b) : mse(a, t.constant(MatT<T>::Constant(a.rows(), a.cols(), T(0.25)))); break;
      case opk::cross_entropy: y = cross_entropy(a, o.labels); break;
      case opk::dropout: y = dropout(a, o.s); break;
      case opk::transpose: y = eval(transpose(a)); break;
      case opk::slice: y = slice_rows(a, o.i0, o.i1); break;
      case opk::gather: y = gather_cols(a, o.labels); break;
      case opk::concat: y = concat_rows({a, b}); break;
      case opk::const_mul: y = a * t.constant(random_t<T>(a.rows(), a.cols(), static_cast<std::uint64_t>(o.i0))); break;
      case opk::residual: y = o.b >= 0 ? Var<T>(a * T(0.5) + tanh(b)) : Var<T>(a * T(0.5) + tanh(a)); break;
      case opk::param_var: y = t.param(P(o.p)); break;
      case opk::chain: y = run_chain(o, e); break;
    }
    if (o.tag_t) tag(y, "t");
    if (o.keep_v) keep(y);
    return y;
  }

  /// Ops [begin, end) of bd, the regions among them as checkpoints.
  void run(const body& bd, int begin, int end, const std::vector<region>& regions, env& e, std::size_t step) {
    int k = begin;
    for (const region& r : regions) {
      for (; k < r.begin; ++k) define(bd, k, apply(bd.ops[static_cast<std::size_t>(k)], e, step), e);
      run_region(bd, r, e, step);
      k = r.end;
    }
    for (; k < end; ++k) define(bd, k, apply(bd.ops[static_cast<std::size_t>(k)], e, step), e);
  }
  void define(const body& bd, int k, const Var<T>& y, env& e) {
    const std::size_t v = static_cast<std::size_t>(bd.n_inputs + k);
    if (y.dims() != bd.shapes[v]) throw std::logic_error(detail::cat("property test: op ", k, " made ", y.dims(), ", expected ", bd.shapes[v]));
    e[v] = y;
  }

  template <class Save, class R>
  R call(const body& bd, const region& r, env& e, std::size_t step) {
    const segment_fn<T, R> seg{this, &bd, &r, std::make_shared<const env>(e), step};
    auto in = [&](std::size_t j) { return e[static_cast<std::size_t>(r.inputs[j])]; };
    switch (r.inputs.size()) {
      case 1: return checkpoint<Save>("region", seg, in(0));
      case 2: return checkpoint<Save>("region", seg, in(0), in(1));
      default: return checkpoint<Save>("region", seg, in(0), in(1), in(2));
    }
  }
  template <class Save>
  void call_form(const body& bd, const region& r, env& e, std::size_t step) {
    auto out = [&](std::size_t j) -> Var<T>& { return e[static_cast<std::size_t>(r.outputs[j])]; };
    if (r.form == 0) {
      out(0) = call<Save, Var<T>>(bd, r, e, step);
    } else if (r.form == 1) {
      const auto [x, y] = call<Save, std::pair<Var<T>, Var<T>>>(bd, r, e, step);
      out(0) = x;
      out(1) = y;
    } else {
      const std::vector<Var<T>> v = call<Save, std::vector<Var<T>>>(bd, r, e, step);
      for (std::size_t j = 0; j < v.size(); ++j) out(j) = v[j];
    }
  }
  // Not inlined: its 36 checkpoint instantiations (4 saves x 3 result forms x 1-3 inputs) made
  // run() one function that clang -O3 spent 25 s of a 170 s compile on (loop unrolling).
  [[gnu::noinline]] void run_region(const body& bd, const region& r, env& e, std::size_t step) {
    if (!checkpoints) return run(bd, r.begin, r.end, r.children, e, step);
    switch (r.save) {
      case 0: return call_form<save::nothing>(bd, r, e, step);
      case 1: return call_form<save::matmul>(bd, r, e, step);
      case 2: return call_form<save::tagged<"t">>(bd, r, e, step);
      default: return call_form<save::any<save::matmul, save::tagged<"t">>>(bd, r, e, step);
    }
  }

  template <class Pol>
  Var<T> chain_under(const chain_def& c, const chain_step<T>& s, const Var<T>& x) {
    return sequential<Pol>(static_cast<std::size_t>(c.steps), s, x);
  }
  Var<T> run_chain(const op& o, env& e) {
    const chain_def& c = prog.chains[static_cast<std::size_t>(o.chain)];
    auto cap = std::make_shared<env>();
    for (int v : o.captures) cap->push_back(e[static_cast<std::size_t>(v)]);
    const chain_step<T> s{this, &c, cap};
    const Var<T> x = e[static_cast<std::size_t>(o.a)];
    if (!checkpoints) {
      Var<T> y = x;
      for (std::size_t i = 0; i < static_cast<std::size_t>(c.steps); ++i) y = s(i, y);
      return y;
    }
    switch (c.policy) {
      case 0: return chain_under<policy::none>(c, s, x);
      case 1: return chain_under<policy::every<1>>(c, s, x);
      case 2: return chain_under<policy::every<2>>(c, s, x);
      case 3: return chain_under<policy::every<3>>(c, s, x);
      case 4: return chain_under<policy::sqrt_n>(c, s, x);
      case 5: return chain_under<policy::binomial<0>>(c, s, x);
      case 6: return chain_under<policy::binomial<1>>(c, s, x);
      case 7: return chain_under<policy::binomial<2>>(c, s, x);
      case 8: return chain_under<policy::binomial<3>>(c, s, x);
      case 9: return chain_under<policy::selective<save::matmul>>(c, s, x);
      case 10: return chain_under<policy::selective<save::tagged<"t">, 2>>(c, s, x);
      case 11: return chain_under<policy::offload<policy::every<2>>>(c, s, x);
      case 12: return chain_under<thirds_matmul>(c, s, x);
      default: return chain_under<two_snapshots>(c, s, x);
    }
  }
};

template <class T>
Var<T> chain_step<T>::operator()(std::size_t i, const Var<T>& x) const {
  typename machine<T>::env e(c->step.shapes.size());
  e[0] = x;
  for (std::size_t k = 0; k < captured->size(); ++k) e[k + 1] = (*captured)[k];
  m->run(c->step, 0, static_cast<int>(c->step.ops.size()), c->step.regions, e, i);
  return e[static_cast<std::size_t>(c->step.results[0])];
}

/// A region as a segment: the values from before it as they were when it was called (captured),
/// its inputs from the arguments, its ops (nested regions checkpointed again), its outputs.
template <class T, class R>
struct segment_fn {
  machine<T>* m;
  const body* bd;
  const region* r;
  std::shared_ptr<const std::vector<Var<T>>> before;
  std::size_t step;

  template <class... X>
  R operator()(const X&... xs) const {
    std::vector<Var<T>> e = *before;
    const std::array<Var<T>, sizeof...(X)> in{xs...};
    for (std::size_t j = 0; j < in.size(); ++j) e[static_cast<std::size_t>(r->inputs[j])] = in[j];
    m->run(*bd, r->begin, r->end, r->children, e, step);
    auto out = [&](std::size_t j) { return e[static_cast<std::size_t>(r->outputs[j])]; };
    if constexpr (std::is_same_v<R, Var<T>>) {
      return out(0);
    } else if constexpr (std::is_same_v<R, std::pair<Var<T>, Var<T>>>) {
      return {out(0), out(1)};
    } else {
      R v;
      for (std::size_t j = 0; j < r->outputs.size(); ++j) v.push_back(out(j));
      return v;
    }
  }
};

/// Values of the inputs and parameters of a program (double; cast for float runs).
struct program_data {
  std::vector<Mat> inputs, params;
  std::vector<Mat> weights;  // of the loss terms
};

program_data make_data(const random_program& p) {
  program_data d;
  rng64 r(p.seed ^ 0xda7a);
  auto fill = [&](shape s, double lo, double hi) {
    Mat m(s.rows, s.cols);
    for (long i = 0; i < m.size(); ++i) m.data()[i] = r.uniform(lo, hi);
    return m;
  };
  for (shape s : p.inputs) d.inputs.push_back(fill(s, -1.0, 1.0));
  for (shape s : p.params) d.params.push_back(fill(s, -0.8, 0.8));
  for (int v : p.main.results) d.weights.push_back(fill(p.main.shapes[static_cast<std::size_t>(v)], 0.5, 1.5));
  return d;
}

/// Runs the program once (with or without its checkpoints) and collects loss and gradients.
template <class T>
run_result<T> run_program(const random_program& p, const program_data& d, bool checkpoints, bool with_grad = true) {
  std::vector<Parameter<T>> params;
  params.reserve(p.params.size());
  for (std::size_t i = 0; i < p.params.size(); ++i) params.emplace_back(d.params[i].cast<T>(), p.frozen[i]);
  Tape<T> t;
  t.set_seed(p.seed);
  std::vector<Var<T>> e(p.main.shapes.size());
  for (std::size_t i = 0; i < p.inputs.size(); ++i)
    e[i] = p.constant[i] ? t.constant(d.inputs[i].cast<T>()) : t.variable(d.inputs[i].cast<T>());
  machine<T> m{p, params, t, checkpoints};
  m.run(p.main, 0, static_cast<int>(p.main.ops.size()), p.main.regions, e, 0);
  Var<T> loss = sum(e[static_cast<std::size_t>(p.main.results[0])] * t.constant(d.weights[0].cast<T>()));
  for (std::size_t k = 1; k < p.main.results.size(); ++k)
    loss = loss + sum(e[static_cast<std::size_t>(p.main.results[k])] * t.constant(d.weights[k].cast<T>()));
  run_result<T> r;
  r.loss = loss.value();
  if (!with_grad) return r;
  // The loss terms are retained: their values (boundaries, some of them) must survive backward.
  for (int v : p.main.results) t.retain(e[static_cast<std::size_t>(v)]);
  t.backward(loss);
  for (std::size_t i = 0; i < p.inputs.size(); ++i)
    if (!p.constant[i]) r.grads.push_back(t.grad(e[i]));
  for (std::size_t i = 0; i < params.size(); ++i)
    if (!p.frozen[i]) r.grads.push_back(params[i].grad());
  // after the gradients (finite_difference_error reads those in this order), compared the same way
  for (int v : p.main.results) r.grads.push_back(e[static_cast<std::size_t>(v)].value());
  r.counters = t.counters();
  r.peak_bytes = t.peak_bytes();
  // What ops' outputs still hold after backward (leaves -- inputs, constants -- left out: a
  // checkpoint creates its inputs' adjoints before its re-trace, so an input that gets no
  // gradient holds a zero adjoint it would not have without checkpoints).
  for (const auto& n : report(t).nodes)
    if (n.kind != op_kind::leaf) r.bytes_after += n.bytes;
  if (env_count("CKPT_PROPERTY_REPORT", 0)) std::cout << (checkpoints ? "checkpointed" : "plain") << " run:\n" << report(t) << '\n';
  return r;
}

template <class T>
bool identical(const run_result<T>& a, const run_result<T>& b) {
  if (!same_bits(a.loss, b.loss) || a.grads.size() != b.grads.size()) return false;
  for (std::size_t i = 0; i < a.grads.size(); ++i)
    if (!same_bits(a.grads[i], b.grads[i])) return false;
  return true;
}

/// The plain run's gradients against central differences of its loss, over every input and
/// parameter entry. Returns the worst error relative to max(1, |analytic|, |numeric|).
double finite_difference_error(const random_program& p, const program_data& d, const run_result<double>& plain) {
  const double h = 1e-6;
  double worst = 0;
  std::size_t g = 0;
  auto loss_with = [&](const program_data& dd) { return run_program<double>(p, dd, false, false).loss(0, 0); };
  auto check = [&](std::vector<Mat> program_data::*field, std::size_t i) {
    program_data dd = d;
    Mat& m = (dd.*field)[i];
    const Mat& analytic = plain.grads[g++];
    for (long k = 0; k < m.size(); ++k) {
      const double x = m.data()[k];
      m.data()[k] = x + h;
      const double up = loss_with(dd);
      m.data()[k] = x - h;
      const double down = loss_with(dd);
      m.data()[k] = x;
      const double numeric = (up - down) / (2 * h), a = analytic.data()[k];
      worst = std::max(worst, std::abs(a - numeric) / std::max({1.0, std::abs(a), std::abs(numeric)}));
    }
  };
  for (std::size_t i = 0; i < p.inputs.size(); ++i)
    if (!p.constant[i]) check(&program_data::inputs, i);
  for (std::size_t i = 0; i < p.params.size(); ++i)
    if (!p.frozen[i]) check(&program_data::params, i);
  return worst;
}

}  // namespace

TEST_CASE("property: 10,000 random programs have the gradients of their un-checkpointed run, bit for bit") {
  const long count = env_count("CKPT_PROPERTY_PROGRAMS", 10000);
  const long first = env_count("CKPT_PROPERTY_FIRST", 0);
  // Finite differences cost 2 runs per scalar of every input and parameter (about 100x a
  // bitwise check) and test the ops' derivative rules, not checkpointing: the checkpointed
  // run equals the plain one bit for bit, so a finite-difference check of either checks both.
  // Every 20th program (500 of 10,000) is drawn without relu (no kink within a step of h)
  // and checked.
  constexpr long fd_every = 20;
  long checkpointed = 0, retraced = 0, replayed = 0, fd_checked = 0, chains = 0, max_depth = 0, failures = 0;
  double fd_worst = 0;
  for (long n = first; n < first + count; ++n) {
    const bool fd = n % fd_every == 0;
    const std::uint64_t seed = 0xc0ffee00ull + static_cast<std::uint64_t>(n);
    const random_program p = make_program(seed, fd);
    const program_data d = make_data(p);
    checkpointed += p.checkpoints > 0 || !p.chains.empty();
    chains += static_cast<long>(p.chains.size());
    max_depth = std::max<long>(max_depth, p.depth);

    const auto plain_d = run_program<double>(p, d, false);
    const auto ckpt_d = run_program<double>(p, d, true);
    const auto plain_f = run_program<float>(p, d, false);
    const auto ckpt_f = run_program<float>(p, d, true);
    retraced += ckpt_d.counters.nodes_retraced > 0;
    replayed += ckpt_d.counters.nodes_replayed > 0;
    const bool same = identical(plain_d, ckpt_d) && identical(plain_f, ckpt_f) && plain_d.counters.nodes_retraced == 0 &&
                      ckpt_d.bytes_after <= plain_d.bytes_after && ckpt_f.bytes_after <= plain_f.bytes_after;
    if (!same) {
      ++failures;
      INFO("program #", n, " (CKPT_PROPERTY_FIRST=", n, " CKPT_PROPERTY_PROGRAMS=1 replays it)\n", describe(p));
      check_same_bits(plain_d, ckpt_d, "double");
      check_same_bits(plain_f, ckpt_f, "float");
      // After backward the ops' outputs of a checkpointed run hold no more than the plain
      // one's (less when values without gradient were rolled back with their segment).
      CHECK(ckpt_d.bytes_after <= plain_d.bytes_after);
      CHECK(ckpt_f.bytes_after <= plain_f.bytes_after);
      if (failures >= 5) break;
    }
    if (fd) {
      ++fd_checked;
      const double err = finite_difference_error(p, d, plain_d);
      fd_worst = std::max(fd_worst, err);
      if (!(err <= 1e-5)) {
        ++failures;
        INFO("program #", n, "\n", describe(p));
        CHECK(err <= 1e-5);
      }
    }
  }
  CHECK(failures == 0);
  MESSAGE("programs ", count, ": ", checkpointed, " with checkpoints or chains, ", retraced, " re-traced, ", replayed,
          " replayed saved values, ", chains, " chains, nesting depth up to ", max_depth, "; ", fd_checked,
          " checked by finite differences, worst relative error ", fd_worst);
  // The generator really exercises the mechanism (with the default seeds: 74% of the programs
  // re-trace something, 50% replay saved values).
  if (count >= 1000) {
    CHECK(retraced * 10 >= count * 6);
    CHECK(replayed * 10 >= count * 4);
    CHECK(max_depth >= 3);
  }
}
