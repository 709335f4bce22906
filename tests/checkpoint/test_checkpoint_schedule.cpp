// What checkpointing costs and saves, measured on the tape's own counters: peak memory bounds
// for an L-layer MLP under none, every<K>, sqrt_n and binomial<S>; exact step-call counts
// (binomial<S> against an independent dynamic program, at n = 100,000 too); a tape that stays
// usable after exceptions in a segment's forward and re-trace; the consistency check of a
// re-trace; selective saving (matrix products, tags, keep()); and the printed report.
#include "checkpoint/checkpoint_support.hpp"

#include <cmath>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

using namespace ckpt;
using namespace ckpt::test;

namespace {

// ------------------------------------------------------------------ an MLP of equal layers

/// L layers h <- tanh(W_l h + b_l), width x batch activations, input x a variable, loss sum(h).
/// One layer records two tensors of width x batch, the product and the activation, but holds
/// one: the product is a temporary, freed once tanh(z + b) is computed (its reverse reads tanh's
/// output, not z).
template <class T>
struct equal_layers {
  int width, batch;
  std::vector<Parameter<T>> params;  // W_0, b_0, W_1, b_1, ...
  MatT<T> x0;

  equal_layers(int L, int w, int n) : width(w), batch(n), x0(random_t<T>(w, n, 5)) {
    params.reserve(2 * static_cast<std::size_t>(L));
    for (int l = 0; l < L; ++l) {
      params.push_back(random_parameter<T>(w, w, 1000 + static_cast<std::uint64_t>(l), 1.2 / std::sqrt(static_cast<double>(w))));
      params.push_back(random_parameter<T>(w, 1, 2000 + static_cast<std::uint64_t>(l), 0.2));
    }
  }
  Var<T> layer(std::size_t l, const Var<T>& h) { return tanh(matmul(params[2 * l], h) + params[2 * l + 1]); }

  /// The step; `probe` (may be null) is called before each step with the tape.
  struct step_fn {
    equal_layers* self;
    std::function<void(const Tape<T>&)>* probe = nullptr;
    Var<T> operator()(std::size_t i, const Var<T>& h) const {
      if (probe) (*probe)(*h.tape());
      return self->layer(i, h);
    }
  };

  struct figures {
    std::size_t peak = 0;
    std::size_t most_boundaries = 0;  // boundary tensors held at once (seen before each step)
    op_counters counters;
    std::vector<MatT<T>> grads;
  };

  template <class P>
  figures run(std::size_t L, bool count_boundaries = false) {
    for (auto& p : params) p.zero_grad();
    figures f;
    std::function<void(const Tape<T>&)> probe = [&](const Tape<T>& t) {
      std::size_t n = 0;
      for (const auto& node : report(t).nodes) n += node.status == "boundary";
      f.most_boundaries = std::max(f.most_boundaries, n);
    };
    Tape<T> t;
    const Var<T> x = t.variable(x0);
    const Var<T> y = sequential<P>(L, step_fn{this, count_boundaries ? &probe : nullptr}, x);
    const Var<T> loss = sum(y);
    t.backward(loss);
    f.peak = t.peak_bytes();
    f.counters = t.counters();
    f.grads.push_back(t.grad(x));
    for (std::size_t i = 0; i < 2 * L; ++i) f.grads.push_back(params[i].grad());
    return f;
  }
};

/// Sizes measured on a one-layer run: the chain input, one layer's output (what a boundary or
/// snapshot holds), what the tape holds of one layer once it is recorded, the loss (value +
/// adjoint).
struct sizes {
  double input, boundary, layer, loss;
};
template <class T>
sizes measure(equal_layers<T>& m) {
  Tape<T> t;
  const Var<T> x = t.variable(m.x0);
  const std::size_t b0 = t.bytes();
  (void)matmul(m.params[0], x);  // passed to no expression, so it stays: one tensor
  const std::size_t b1 = t.bytes();
  const Var<T> h = m.layer(0, x);
  const std::size_t b2 = t.bytes();
  (void)sum(h);
  const std::size_t b3 = t.bytes();
  return {static_cast<double>(b0), static_cast<double>(b1 - b0), static_cast<double>(b2 - b1), 2.0 * static_cast<double>(b3 - b2)};
}

// The constant c of the bounds, from how the mechanism works. Besides the tensors a policy
// keeps on purpose (the boundaries or snapshots and the inside of what is being recorded or
// re-traced), the peak of a backward pass holds:
//   - the chain's input x (a variable: the tape keeps it),
//   - two adjoints of one layer's output: the adjoint being propagated into the layer being
//     swept and the one its sweep allocates for the layer's product before it releases the
//     layer; at a checkpoint, the boundary's adjoint (the seed, kept until the re-trace has run
//     and it is copied into the re-traced output) and the adjoint of the segment's input
//     (created before the re-trace) play these parts, while the boundary's own value is freed,
//   - the loss's value and adjoint (1x1 each, a pool-rounded buffer each).
// So c_a = (x + 2 b + loss) / a, with b the bytes of one layer's output and a what the tape
// holds of a recorded layer (b here: the product is freed once the layer's output is computed;
// it was 2 b before). With none the bound is attained exactly, so no smaller constant holds
// (and with a = 2 b, every<K> attained peak = floor((L-1)/K) b + min(K, L) a + c_a a for all L
// up to 200 and K in {1, 2, 3, 4, 7, 16}).
//
// binomial<S> holds at most S + 1 boundary tensors (S snapshots and the input of the last step,
// the one being recorded) and, for each of them, possibly its adjoint: along the nest of
// running re-traces, every level keeps its seed and has created its input's adjoint. That is
// (S + 1) 2 b, plus one step's inside (a) plus the terms above:
//   peak <= (S + 1) 2 b + a + c_a a.
TEST_CASE_TEMPLATE("memory: peak bytes of an L-layer MLP under none, every<K>, sqrt_n, binomial<S>", T, float, double) {
  constexpr int width = 8, batch = 8;
  equal_layers<T> m(256, width, batch);
  const sizes s = measure(m);
  REQUIRE(s.layer == s.boundary);  // one layer holds its activation; its product is freed
  REQUIRE(s.input == s.boundary);
  const double a = s.layer, b = s.boundary;
  const double c = (s.input + 2 * b + s.loss) / a;
  CAPTURE(a);
  CAPTURE(c);
  for (const std::size_t L : {std::size_t(16), std::size_t(64), std::size_t(256)}) {
    CAPTURE(L);
    const double l = static_cast<double>(L);
    const auto none = m.template run<policy::none>(L);
    const double pn = static_cast<double>(none.peak);
    INFO("none: peak ", pn / a, " layers");
    CHECK(pn >= l * a);             // it holds every layer
    CHECK(pn == (l + c) * a);       // and nothing else but the constant

    auto every = [&]<std::size_t K>() {
      const auto f = m.template run<policy::every<K>>(L, true);
      const double p = static_cast<double>(f.peak), k = static_cast<double>(K);
      INFO("every<", K, ">: peak ", p / a, " layers, bound ", l / k + k + c);
      CHECK(p <= (l / k + k + c) * a);
      // tighter: a boundary holds one tensor (b), not a layer (a)
      CHECK(p <= (l / k) * b + k * a + c * a);
      CHECK(f.most_boundaries <= (L - 1) / K);
      CHECK(f.peak < none.peak);
      for (std::size_t i = 0; i < f.grads.size(); ++i) CHECK(same_bits(f.grads[i], none.grads[i]));
    };
    every.template operator()<2>();
    every.template operator()<4>();
    every.template operator()<8>();

    {
      const auto f = m.template run<policy::sqrt_n>(L, true);
      const double p = static_cast<double>(f.peak), r = std::sqrt(l);
      INFO("sqrt_n: peak ", p / a, " layers, bound ", 2 * r + c);
      REQUIRE(policy::sqrt_n::segment_length(L) * policy::sqrt_n::segment_length(L) == L);  // L is a square here
      CHECK(p <= (2 * r + c) * a);
      CHECK(p <= r * b + r * a + c * a);
      CHECK(f.peak < none.peak);
    }

    auto binomial = [&]<std::size_t S>() {
      const auto f = m.template run<policy::binomial<S>>(L, true);
      const double p = static_cast<double>(f.peak), sn = static_cast<double>(S);
      INFO("binomial<", S, ">: peak ", p / a, " layers, bound ", (2 * (sn + 1) * b + a + c * a) / a);
      CHECK(p <= 2 * (sn + 1) * b + a + c * a);
      CHECK(f.most_boundaries <= S + 1);  // S snapshots and the input of the step being recorded
      CHECK(f.peak < none.peak);
      for (std::size_t i = 0; i < f.grads.size(); ++i) CHECK(same_bits(f.grads[i], none.grads[i]));
    };
    binomial.template operator()<1>();
    binomial.template operator()<2>();
    binomial.template operator()<4>();
    binomial.template operator()<8>();
  }
}

// ------------------------------------------------------------------ step-call counts

/// F(n, s): the fewest step calls that reverse a chain of n steps with s snapshots besides its
/// input, by dynamic programming over the first split (written independently of revolve.hpp).
struct revolve_table {
  static constexpr int max_n = 200, max_s = 10;
  std::vector<std::vector<std::uint64_t>> F;
  revolve_table() : F(max_n + 1, std::vector<std::uint64_t>(max_s + 1, 0)) {
    for (int n = 1; n <= max_n; ++n) {
      F[static_cast<std::size_t>(n)][0] = static_cast<std::uint64_t>(n) * static_cast<std::uint64_t>(n + 1) / 2;
      for (int s = 1; s <= max_s; ++s) {
        if (n == 1) {
          F[1][static_cast<std::size_t>(s)] = 1;
          continue;
        }
        std::uint64_t best = ~std::uint64_t(0);
        for (int m = 1; m < n; ++m)
          best = std::min(best, static_cast<std::uint64_t>(m) + F[static_cast<std::size_t>(n - m)][static_cast<std::size_t>(s - 1)] +
                                    F[static_cast<std::size_t>(m)][static_cast<std::size_t>(s)]);
        F[static_cast<std::size_t>(n)][static_cast<std::size_t>(s)] = best;
      }
    }
  }
  std::uint64_t operator()(int n, int s) const { return F[static_cast<std::size_t>(n)][static_cast<std::size_t>(s)]; }
};

TEST_CASE("counts: revolve's closed form and first split against an independent dynamic program, n <= 200, s <= 10") {
  const revolve_table F;
  for (int n = 1; n <= revolve_table::max_n; ++n) {
    for (int s = 0; s <= revolve_table::max_s; ++s) {
      INFO("n = ", n, ", s = ", s);
      const auto un = static_cast<std::uint64_t>(n), us = static_cast<std::uint64_t>(s);
      REQUIRE(revolve::extra_evaluations(un, us) == F(n, s) - un);
      if (n >= 2 && s >= 1) {
        const std::uint64_t m = revolve::split(un, us);
        REQUIRE(m >= 1);
        REQUIRE(m < un);
        REQUIRE(m + F(n - static_cast<int>(m), s - 1) + F(static_cast<int>(m), s) == F(n, s));
      }
    }
  }
  // A few values by hand: n steps with no snapshot cost n (n + 1) / 2; with as many snapshots
  // as steps, each step is recomputed at most once.
  CHECK(revolve::extra_evaluations(10, 0) == 45);
  CHECK(revolve::extra_evaluations(1, 3) == 0);
  CHECK(revolve::extra_evaluations(2, 1) == 1);
  CHECK(revolve::extra_evaluations(4, 1) == 4);  // F(4, 1) = 8: split at 2, 2 + F(2, 0) + F(2, 1) = 2 + 3 + 3
}

/// A tiny ODE-like step on a 2x1 state that counts its calls.
template <class T>
struct counting_step {
  std::size_t* calls;
  Parameter<T>* W;
  Var<T> operator()(std::size_t, const Var<T>& x) const {
    ++*calls;
    return x + tanh(matmul(*W, x)) * T(0.01);
  }
};

template <class P>
std::pair<std::size_t, MatT<double>> count_calls(std::size_t n, Parameter<double>& W) {
  std::size_t calls = 0;
  Tape<double> t;
  const Var<double> x = t.variable(random_t<double>(2, 1, 3));
  const Var<double> y = sequential<P>(n, counting_step<double>{&calls, &W}, x);
  const Var<double> loss = sum(y);
  t.backward(loss);
  return {calls, t.grad(x)};
}

TEST_CASE("counts: binomial<S> calls the step exactly F(n, S) times, for n up to 200 and S in 0..10") {
  const revolve_table F;
  Parameter<double> W = random_parameter<double>(2, 2, 8, 0.5);
  // Every n up to 60, then every 7th up to 200 (S = 0 costs n (n + 1) / 2 calls per run).
  auto grid = [&]<std::size_t S>() {
    for (int n = 1; n <= revolve_table::max_n; n += n < 60 ? 1 : 7) {
      const std::size_t calls = count_calls<policy::binomial<S>>(static_cast<std::size_t>(n), W).first;
      INFO("binomial<", S, ">, n = ", n);
      REQUIRE(calls == F(n, static_cast<int>(S)));
      REQUIRE(calls == expected_step_calls<policy::binomial<S>>(static_cast<std::size_t>(n)));
    }
  };
  grid.template operator()<0>();
  grid.template operator()<1>();
  grid.template operator()<2>();
  grid.template operator()<3>();
  grid.template operator()<4>();
  grid.template operator()<5>();
  grid.template operator()<6>();
  grid.template operator()<8>();
  grid.template operator()<10>();
  // a policy written by a user, with only `snapshots`
  for (int n = 1; n <= revolve_table::max_n; n += 7)
    CHECK(count_calls<two_snapshots>(static_cast<std::size_t>(n), W).first == F(n, 2));
}

TEST_CASE("counts: binomial<16> over 100,000 steps calls the step n + t(n, 16) times; gradients equal none's") {
  constexpr std::size_t n = 100000;
  Parameter<double> W = random_parameter<double>(2, 2, 9, 0.5);
  const auto [calls, grad] = count_calls<policy::binomial<16>>(n, W);
  const MatT<double> dW = W.grad();
  W.zero_grad();
  CHECK(calls == n + revolve::extra_evaluations(n, 16));
  CHECK(calls == expected_step_calls<policy::binomial<16>>(n));
  // The closed form by hand: the repetition number r is the smallest with C(r + 17, 17) >= n
  // (C(18, 17) = 18, C(19, 17) = 171, C(20, 17) = 1140, C(21, 17) = 5985, C(22, 17) = 26334,
  // C(23, 17) = 100947 >= 100000), so r = 6 and t = 17 C(22, 18) + 6 (n - C(22, 17)).
  CHECK(revolve::repetitions(n, 16) == 6);
  CHECK(revolve::extra_evaluations(n, 16) == 17 * 7315 + 6 * (n - 26334));
  // none over the same 100,000 steps (about 0.1 s): the same gradients, bit for bit.
  const auto [calls_none, grad_none] = count_calls<policy::none>(n, W);
  CHECK(calls_none == n);
  CHECK(same_bits(grad, grad_none));
  CHECK(same_bits(dW, W.grad()));
}

TEST_CASE("counts: segmenting policies call the step n + K floor((n - 1) / K) times") {
  // Each checkpointed segment of K steps is recomputed once; the last (up to K steps) is
  // recorded as usual, so floor((n - 1) / K) segments are checkpointed. K >= n: no segment.
  Parameter<double> W = random_parameter<double>(2, 2, 10, 0.5);
  auto formula = [](std::size_t n, std::size_t k) { return k >= n ? n : n + k * ((n - 1) / k); };
  auto check = [&]<class P>() {
    for (std::size_t n = 1; n <= 200; n += (n < 40 ? 1 : 13)) {
      const std::size_t k = P::segment_length(n);
      INFO(policy_name<P>, ", n = ", n);
      const std::size_t calls = count_calls<P>(n, W).first;
      CHECK(calls == (k == 0 ? n : formula(n, k)));
      CHECK(calls == expected_step_calls<P>(n));
    }
  };
  check.template operator()<policy::none>();
  check.template operator()<policy::every<1>>();
  check.template operator()<policy::every<3>>();
  check.template operator()<policy::every<4>>();
  check.template operator()<policy::sqrt_n>();
  check.template operator()<policy::selective<save::matmul>>();
  check.template operator()<policy::offload<>>();
  check.template operator()<thirds_matmul>();
  CHECK(policy::sqrt_n::segment_length(50) == 8);
  CHECK(expected_step_calls<policy::every<4>>(50) == 50 + 4 * 12);
  CHECK(expected_step_calls<policy::sqrt_n>(100) == 100 + 10 * 9);
}

// ------------------------------------------------------------------ errors

using V = Var<double>;

/// The reference: loss sum(tanh(x) * x * 3) on a fresh tape, gradient of x.
MatT<double> reference_grad(const MatT<double>& xm) {
  Tape<double> t;
  const V x = t.variable(xm);
  const V y = tanh(x) * x * 3.0;
  const V loss = sum(y);
  t.backward(loss);
  return t.grad(x);
}
/// The same through a checkpoint on `t`, which must be usable.
void expect_usable(Tape<double>& t, const MatT<double>& xm) {
  const V x = t.variable(xm);
  const V y = checkpoint("again", [](const V& a) -> V { return tanh(a) * a * 3.0; }, x);
  const V loss = sum(y);
  t.backward(loss);
  CHECK(same_bits(t.grad(x), reference_grad(xm)));
}

V tanh_times_three(const V& a) { return tanh(a) * a * 3.0; }

TEST_CASE("segments: a function, a function pointer and a std::function re-trace as a lambda does") {
  // checkpoint() reaches the segment through a pointer to the caller's object (forward) and to
  // the tape's copy (reverse): a function reference decays to a pointer held in a temporary.
  const MatT<double> xm = random_matrix(5, 3, 21);
  auto run = [&](auto&& segment) {
    Tape<double> t;
    const V x = t.variable(xm);
    const V loss = sum(checkpoint("f", segment, x));
    t.backward(loss);
    CHECK(t.counters().nodes_retraced > 0);
    return MatT<double>(t.grad(x));
  };
  V (*pointer)(const V&) = &tanh_times_three;
  const std::function<V(const V&)> wrapped = tanh_times_three;
  CHECK(same_bits(run(tanh_times_three), reference_grad(xm)));
  CHECK(same_bits(run(pointer), reference_grad(xm)));
  CHECK(same_bits(run(wrapped), reference_grad(xm)));
  CHECK(same_bits(run(std::function<V(const V&)>(tanh_times_three)), reference_grad(xm)));  // an rvalue: copied
}

struct boom : std::runtime_error {
  using std::runtime_error::runtime_error;
};

TEST_CASE("errors: an exception inside a segment's forward leaves the tape as it was") {
  const MatT<double> xm = random_t<double>(3, 2, 21);
  Tape<double> t;
  const V x = t.variable(xm);
  const V y0 = tanh(x) * 2.0;  // something recorded before
  const std::size_t nodes = t.node_count(), entries = t.entry_count(), bytes = t.bytes();
  bool strong = true;  // checkpoint() restores the tape exactly

  SUBCASE("thrown by the segment") {
    CHECK_THROWS_AS(checkpoint(
                        "throws", [](const V& a) -> V {
                          const V b = tanh(a) * a;
                          if (b.rows() > 0) throw boom("in the forward");
                          return b;
                        },
                        y0),
                    boom);
  }
  SUBCASE("thrown by a checkpoint nested inside the segment") {
    CHECK_THROWS_AS(checkpoint(
                        "outer", [](const V& a) -> V {
                          const V b = sigmoid(a);
                          return checkpoint(
                              "inner", [](const V& c) -> V {
                                const V d = exp(c);
                                if (d.rows() > 0) throw boom("nested");
                                return d;
                              },
                              b);
                        },
                        y0),
                    boom);
  }
  SUBCASE("thrown by a step of sequential<sqrt_n> (inside its third segment)") {
    auto step = [](std::size_t i, const V& h) -> V {
      if (i == 9) throw boom("step 9");
      return tanh(h) + h;
    };
    CHECK_THROWS_AS(sequential<policy::sqrt_n>(16, step, y0), boom);
    // The throwing segment is rolled back; the two segments before it stay recorded, like ops
    // recorded before one that throws (their boundaries get no adjoint and are skipped).
    strong = false;
  }
  SUBCASE("a segment returning an empty Var (misuse) is rejected") {
    CHECK_THROWS_AS(checkpoint(
                        "bad output", [](const V& a) { return std::pair<V, V>{V(tanh(a) * a), V()}; }, y0),
                    tape_error);
  }
  if (strong) {
    CHECK(t.node_count() == nodes);
    CHECK(t.entry_count() == entries);
    CHECK(t.bytes() == bytes);
  }
  // record again, on top of what was there, and back-propagate through both
  const V z = checkpoint("after", [](const V& a) -> V { return tanh(a) * a * 3.0; }, y0);
  const V loss = sum(z);
  t.backward(loss);
  Tape<double> ref;
  const V rx = ref.variable(xm);
  const V ry0 = tanh(rx) * 2.0;
  const V rz = tanh(ry0) * ry0 * 3.0;
  const V rloss = sum(rz);
  ref.backward(rloss);
  CHECK(same_bits(t.grad(x), ref.grad(rx)));
  t.reset();
  CHECK(t.bytes() == 0);
  expect_usable(t, xm);
}

TEST_CASE("errors: an exception during a re-trace propagates from backward; the tape is usable after reset()") {
  const MatT<double> xm = random_t<double>(3, 2, 22);
  Tape<double> t;
  SUBCASE("a segment that throws on its second call") {
    int calls = 0;
    const V x = t.variable(xm);
    const V y = checkpoint(
        "flaky", [&calls](const V& a) -> V {
          const V b = tanh(a) * a;
          if (++calls == 2) throw boom("second call");
          return b * 3.0;
        },
        x);
    const V loss = sum(y);
    CHECK_THROWS_WITH_AS(t.backward(loss), "second call", boom);
    CHECK(calls == 2);
  }
  SUBCASE("a step that throws deep inside binomial<2>'s nested re-traces") {
    std::size_t calls = 0;
    const V x = t.variable(xm);
    auto step = [&calls](std::size_t, const V& h) -> V {
      if (++calls == 60) throw boom("call 60");
      return tanh(h) * 0.5 + h;
    };
    const V y = sequential<policy::binomial<2>>(30, step, x);
    CHECK(calls == 30);
    const V loss = sum(y);
    CHECK_THROWS_WITH_AS(t.backward(loss), "call 60", boom);
  }
  t.reset();
  CHECK(t.bytes() == 0);
  CHECK(t.node_count() == 0);
  CHECK(t.entry_count() == 0);
  expect_usable(t, xm);
}

/// The message of the checkpoint_error that backward(loss) throws.
std::string retrace_error(Tape<double>& t, const V& loss) {
  try {
    t.backward(loss);
  } catch (const checkpoint_error& e) {
    return e.what();
  }
  FAIL("backward did not throw ckpt::checkpoint_error");
  return {};
}

TEST_CASE("errors: a segment whose re-trace records other ops throws checkpoint_error naming it and the first difference") {
  const MatT<double> xm = random_t<double>(3, 2, 23);
  Tape<double> t;
  const V x = t.variable(xm);
  int mode = 0;  // mutable outside state the segment branches on
  auto segment = [&mode](const V& a) -> V {
    const V b = tanh(a);  // entry #0
    const V c = b * a;    // entry #1
    V d;
    if (mode == 0 || mode == 3) d = exp(c);      // entry #2
    if (mode == 1) d = sigmoid(c);               // another op
    if (mode == 2) d = exp(eval(transpose(c)));  // another shape
    if (mode == 3) d = d * 2.0;                  // one entry more
    if (mode == 4) d = c;                        // one entry fewer
    return d;
  };
  std::string message;
  SUBCASE("another op") {
    const V y = checkpoint("branchy", segment, x);
    mode = 1;
    message = retrace_error(t, sum(y));
    CHECK(message.find("checkpoint 'branchy'") != std::string::npos);
    CHECK(message.find("differs from the forward at entry #2") != std::string::npos);
    CHECK(message.find("forward recorded 'exp' 3x2") != std::string::npos);
    CHECK(message.find("re-trace recorded 'sigmoid' 3x2") != std::string::npos);
  }
  SUBCASE("another shape") {
    const V y = checkpoint("reshaped", segment, x);
    mode = 2;
    message = retrace_error(t, sum(y));
    CHECK(message.find("checkpoint 'reshaped'") != std::string::npos);
    CHECK(message.find("differs from the forward at entry #2") != std::string::npos);
    CHECK(message.find("re-trace recorded 'transpose' 2x3") != std::string::npos);
  }
  SUBCASE("more ops") {
    const V y = checkpoint("longer", segment, x);
    mode = 3;
    message = retrace_error(t, sum(y));
    CHECK(message.find("checkpoint 'longer'") != std::string::npos);
    CHECK(message.find("more entries than the forward (3); extra entry #3 is 'mul' 3x2") != std::string::npos);
  }
  SUBCASE("fewer ops") {
    const V y = checkpoint("shorter", segment, x);
    mode = 4;
    message = retrace_error(t, sum(y));
    CHECK(message.find("checkpoint 'shorter'") != std::string::npos);
    CHECK(message.find("the re-trace recorded 2 entries, the forward 3") != std::string::npos);
  }
  SUBCASE("another function inside a fused expression with the same root op") {
    auto fused = [&mode](const V& a) -> V { return mode == 0 ? V(tanh(a) + a) : V(sigmoid(a) + a); };
    const V y = checkpoint("fused", fused, x);
    mode = 1;
    message = retrace_error(t, sum(y));
    CHECK(message.find("checkpoint 'fused'") != std::string::npos);
    CHECK(message.find("at entry #0: forward recorded 'add' 3x2, re-trace recorded 'add' 3x2 (another expression fused into it)") !=
          std::string::npos);
  }
  SUBCASE("another function inside a fused reduction") {
    auto reduced = [&mode](const V& a) -> V {
      const V b = a * 2.0;
      return mode == 0 ? sum(tanh(b)) : sum(sigmoid(b));
    };
    const V y = checkpoint("reduced", reduced, x);
    mode = 1;
    message = retrace_error(t, sum(y));
    CHECK(message.find("checkpoint 'reduced'") != std::string::npos);
    CHECK(message.find("at entry #1: forward recorded 'sum' 1x1, re-trace recorded 'sum' 1x1 (another expression") != std::string::npos);
  }
  SUBCASE("inside a chain of sequential<every<2>>, nested in a named checkpoint") {
    auto step = [&mode](std::size_t, const V& h) -> V {
      const V u = mode == 0 ? V(tanh(h)) : V(sigmoid(h));
      return u + h;
    };
    const V y = checkpoint("model", [step](const V& a) -> V { return sequential<policy::every<2>>(6, step, a); }, x);
    mode = 1;
    message = retrace_error(t, sum(y));
    // The outer re-trace runs the chain's checkpoints forward again (no check there: a
    // forward is never compared); the first re-trace that differs is the chain's last step,
    // recorded inside "model"'s re-trace.
    CHECK(message.find("checkpoint 'model'") != std::string::npos);
    CHECK(message.find("forward recorded 'tanh' 3x2, re-trace recorded 'sigmoid' 3x2") != std::string::npos);
  }
  SUBCASE("inside a nested checkpoint's forward run, at a value the enclosing one kept") {
    // The inner segment's boundary (a kept value and an output, same shapes either way) is all
    // the outer signature lists; the kept value's own check catches the branch inside.
    auto inner = [&mode](const V& a) -> V {
      const V k = keep(mode == 0 ? V(tanh(a)) : V(sigmoid(a)));
      return k * a;
    };
    const V y = checkpoint("outer", [inner](const V& a) -> V { return exp(checkpoint("inner", inner, a)); }, x);
    mode = 1;
    message = retrace_error(t, sum(y));
    CHECK(message.find("checkpoint 'outer'") != std::string::npos);
    CHECK(message.find("inside a nested checkpoint, the re-trace recorded 'sigmoid' 3x2 where the forward computed the kept value 'tanh' 3x2") !=
          std::string::npos);
  }
  SUBCASE("a nested checkpoint's inside records more ops, behind the same boundary") {
    auto inner = [&mode](const V& a) -> V {
      V u = tanh(a);
      if (mode == 1) u = tanh(u);
      return u * a;
    };
    const V y = checkpoint("outer", [inner](const V& a) -> V { return exp(checkpoint("inner", inner, a)); }, x);
    mode = 1;
    message = retrace_error(t, sum(y));
    CHECK(message.find("checkpoint 'outer'") != std::string::npos);
    CHECK(message.find("differs from the forward before entry #0 ('inner' 3x2): a nested checkpoint's segment recorded 1 op(s) more inside") !=
          std::string::npos);
  }
  INFO(message);
  CHECK(message.find("does it branch on mutable state?") != std::string::npos);
  t.reset();
  mode = 0;
  expect_usable(t, xm);
}

// ------------------------------------------------------------------ selective saving

/// Layer l: z = W h (tagged "x" when l is even, "y" when odd; kept with keep() when l % 4 == 1
/// and `keep_some`), h' = tanh(z + b).
struct tagged_layers {
  equal_layers<double> m{16, 8, 4};
  bool keep_some = false;
  struct step_fn {
    tagged_layers* self;
    V operator()(std::size_t l, const V& h) const {
      auto& p = self->m.params;
      V z = tag(matmul(p[2 * l], h), l % 2 == 0 ? "x" : "y");
      if (self->keep_some && l % 4 == 1) z = keep(z);
      return tanh(z + p[2 * l + 1]);
    }
  };
  template <class P>
  equal_layers<double>::figures run() {
    for (auto& p : m.params) p.zero_grad();
    Tape<double> t;
    const V x = t.variable(m.x0);
    const V y = sequential<P>(16, step_fn{this}, x);
    const V loss = sum(y);
    t.backward(loss);
    equal_layers<double>::figures f;
    f.peak = t.peak_bytes();
    f.counters = t.counters();
    f.grads.push_back(t.grad(x));
    for (auto& p : m.params) f.grads.push_back(p.grad());
    return f;
  }
};

void check_same(const equal_layers<double>::figures& a, const equal_layers<double>::figures& b) {
  REQUIRE(a.grads.size() == b.grads.size());
  for (std::size_t i = 0; i < a.grads.size(); ++i) CHECK(same_bits(a.grads[i], b.grads[i]));
}

TEST_CASE("selective: save::matmul replays the products, save::tagged only tagged values, keep() always") {
  // 16 layers, segments of 4: layers 0..11 are checkpointed (3 segments), 12..15 recorded.
  // GEMMs: 16 forward, 2 per layer backward (x is a variable), plus the products re-traced.
  tagged_layers net;
  const auto none = net.run<policy::none>();
  CHECK(none.counters.gemms == 48);
  CHECK(none.counters.nodes_retraced == 0);
  CHECK(none.counters.nodes_replayed == 0);

  const auto sq = net.run<policy::sqrt_n>();
  check_same(none, sq);
  CHECK(sq.counters.gemms == 48 + 12);
  CHECK(sq.counters.nodes_retraced == 24);
  CHECK(sq.counters.nodes_replayed == 0);

  SUBCASE("save::matmul: every product of a re-trace is replayed, no GEMM is redone") {
    const auto sel = net.run<policy::selective<save::matmul>>();
    check_same(none, sel);
    CHECK(sel.counters.nodes_retraced == 24);
    CHECK(sel.counters.nodes_replayed == 12);
    CHECK(sel.counters.gemms == none.counters.gemms);
    CHECK(sel.counters.gemms < sq.counters.gemms);
    CHECK(sel.peak > sq.peak);    // it keeps the products
    CHECK(sel.peak < none.peak);  // but not the activations
  }
  SUBCASE("save::tagged<\"x\">: only the products tagged x (even layers) are replayed") {
    const auto sel = net.run<policy::selective<save::tagged<"x">>>();
    check_same(none, sel);
    CHECK(sel.counters.nodes_replayed == 6);  // layers 0, 2, ..., 10
    CHECK(sel.counters.gemms == 48 + 6);
    const auto both = net.run<policy::selective<save::tagged<"x", "y">>>();
    check_same(none, both);
    CHECK(both.counters.nodes_replayed == 12);
    const auto other = net.run<policy::selective<save::tagged<"nothing has this tag">>>();
    CHECK(other.counters.nodes_replayed == 0);
    CHECK(other.counters.gemms == sq.counters.gemms);
  }
  SUBCASE("keep(v) is kept under save::nothing, and under every predicate") {
    net.keep_some = true;
    const auto kept = net.run<policy::every<4>>();
    check_same(none, kept);
    CHECK(kept.counters.nodes_replayed == 3);  // layers 1, 5, 9
    CHECK(kept.counters.gemms == 48 + 12 - 3);
    const auto with_x = net.run<policy::selective<save::tagged<"x">, 4>>();
    check_same(none, with_x);
    CHECK(with_x.counters.nodes_replayed == 6 + 3);
    net.keep_some = false;
  }
  SUBCASE("an explicit checkpoint<save::matmul>: the product inside is replayed") {
    Tape<double> t;
    const V x = t.variable(net.m.x0);
    auto& p = net.m.params;
    const V y = checkpoint<save::matmul>(
        "block", [&p](const V& h) -> V { return tanh(V(matmul(p[2], V(tanh(matmul(p[0], h) + p[1])))) + p[3]); }, x);
    const V loss = sum(y);
    t.backward(loss);
    CHECK(t.counters().nodes_retraced == 4);
    CHECK(t.counters().nodes_replayed == 2);
    CHECK(t.counters().gemms == 2 + 4);  // forward 2, backward 4, none redone
  }
  SUBCASE("nested checkpoints: what the inner one keeps, the outer one keeps too") {
    // outer = [inner = [layer 0, its product kept], layer 1]. When outer re-traces, inner runs
    // forward again: it replays the product that outer kept of inner's boundary instead of
    // recomputing it, and so does inner's own re-trace. GEMMs: 2 forward, then layer 1's
    // product again, 2 + 2 backward; layer 0's product never again.
    auto& p = net.m.params;
    auto layer0 = [&p](const V& h) -> V { return tanh(keep(matmul(p[0], h)) + p[1]); };
    auto layer1 = [&p](const V& h) -> V { return tanh(matmul(p[2], h) + p[3]); };
    auto run = [&](bool checkpointed) {
      for (auto& q : p) q.zero_grad();
      Tape<double> t;
      const V x = t.variable(net.m.x0);
      const V y = checkpointed ? checkpoint("outer", [&](const V& h) -> V { return layer1(checkpoint("inner", layer0, h)); }, x)
                               : layer1(layer0(x));
      t.backward(sum(y));
      equal_layers<double>::figures f;
      f.counters = t.counters();
      f.grads = {t.grad(x), p[0].grad(), p[1].grad(), p[2].grad(), p[3].grad()};
      return f;
    };
    const auto plain = run(false), nested = run(true);
    check_same(plain, nested);
    CHECK(plain.counters.gemms == 2 + 4);
    CHECK(nested.counters.gemms == 2 + 1 + 4);
    CHECK(nested.counters.nodes_replayed == 2);
  }
}

// ------------------------------------------------------------------ the report

TEST_CASE("report: the table lists inputs, boundaries, kept values, activations and the checkpointed segments") {
  equal_layers<double> m(16, 8, 4);
  Tape<double> t;
  const V x = t.variable(m.x0);
  const V y = sequential<policy::selective<save::matmul, 4>>(16, equal_layers<double>::step_fn{&m}, x);
  const V z = checkpoint("head", [](const V& h) -> V { return softmax(h); }, y);
  const V loss = sum(square(z));

  const tape_report r = report(t);
  std::size_t boundaries = 0, kept = 0, activations = 0, inputs = 0, consumed = 0;
  for (const auto& n : r.nodes) {
    boundaries += n.status == "boundary";
    kept += n.status == "kept for re-trace";
    activations += n.status == "activation";
    inputs += n.status == "input";
    consumed += n.status == "consumed";
  }
  const std::size_t tensor = 8 * 4 * sizeof(double);
  CHECK(inputs == 1);
  CHECK(boundaries == 3 + 1);  // three segments of the chain, and "head"
  CHECK(kept == 12);           // the products of the 12 checkpointed layers
  CHECK(activations == 4 + 1);  // the last segment's 4 layers and the loss (square fuses into sum)
  CHECK(consumed == 4);         // their products, freed once each layer's output was computed
  REQUIRE(r.segments.size() == 4);
  for (std::size_t k = 0; k < 3; ++k) {
    CHECK(r.segments[k].name == "sequential");
    CHECK(r.segments[k].recompute_nodes == 8);
    CHECK(r.segments[k].recompute_bytes == 8 * tensor);
    CHECK(r.segments[k].replayed == 4);
  }
  CHECK(r.segments[3].name == "head");
  CHECK(r.segments[3].recompute_nodes == 1);
  CHECK(r.segments[3].replayed == 0);
  CHECK(r.bytes == t.bytes());

  std::ostringstream o;
  o << r;
  const std::string text = o.str();
  INFO(text);
  for (const char* s : {"node", "status", "input", "boundary", "kept for re-trace", "activation", "matmul", "tanh",
                        "checkpointed segments (recomputed on reverse)", "sequential", "head", "held now:", "peak since reset:"})
    CHECK(text.find(s) != std::string::npos);

  t.backward(loss);
  std::ostringstream after;
  after << report(t);
  CHECK(after.str().find("released") != std::string::npos);
  CHECK(report(t).segments.size() == 4);  // the entries stay until reset()
  t.reset();
  CHECK(report(t).nodes.empty());
  CHECK(report(t).segments.empty());
}

}  // namespace
