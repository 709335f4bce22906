// Checkpointing changes memory and work, never the numbers: for every policy (the library's and
// two written here), in float and double, the loss and every gradient (inputs and parameters)
// are bit for bit those of policy::none, on an MLP stack (layers form), the loop form over 50
// steps, checkpoints nested three deep, dropout inside segments, segments with several inputs
// and outputs (tuple and array returns, a pass-through output, a parameter's Var as an
// output), a parameter shared by every segment, and segments that capture outer Vars instead
// of receiving them.
//
// The other checkpoint suites: test_checkpoint_property.cpp (10,000 random programs) and
// test_checkpoint_schedule.cpp (memory bounds, step counts, errors, selective saving, report).
#include "checkpoint/checkpoint_support.hpp"

#include <array>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

using namespace ckpt;
using namespace ckpt::test;

namespace {

/// The save predicate a policy uses inside its segments (binomial ones have none).
template <class P>
struct save_of {
  using type = save::nothing;
};
template <SegmentingPolicy P>
struct save_of<P> {
  using type = typename P::save;
};

/// Runs every policy of all_policies on `body` and compares with `reference` bit for bit.
/// Every policy but none must really have re-traced something; so must none when the body
/// checkpoints by itself.
template <class T, class Body>
void check_every_policy(Body& body, const run_result<T>& reference, const std::vector<MatT<T>>& inputs,
                        const std::vector<Parameter<T>*>& params, const std::string& scenario, bool body_checkpoints) {
  check_nontrivial(reference, scenario + " (reference)");
  for_each_type(all_policies{}, [&]<class P>() {
    const run_result<T> got = run_policy<P, T>(body, inputs, params);
    const std::string what = scenario + " under " + policy_name<P>;
    check_same_bits(reference, got, what);
    INFO(what);
    if (body_checkpoints || !std::is_same_v<P, policy::none>) {
      CHECK(got.counters.nodes_retraced > 0);
    } else {
      CHECK(got.counters.nodes_retraced == 0);
    }
    // Backward leaves exactly what it leaves without checkpoints (the inputs, constants and the
    // loss, values and adjoints): no boundary, saved value or re-trace buffer outlives it.
    CHECK(got.bytes_after == reference.bytes_after);
  });
}

template <class T>
std::vector<Parameter<T>*> pointers(std::vector<Parameter<T>>& ps) {
  std::vector<Parameter<T>*> r;
  for (auto& p : ps) r.push_back(&p);
  return r;
}

// ------------------------------------------------------------------ an MLP stack, layers form

/// 12 layers tanh/relu(shared ⊙ (W_l h) + b_l): the gain `shared` is one parameter used by every
/// layer, hence by every segment. The product is tagged "h" for selective<tagged<"h">>.
template <class T>
struct mlp_stack {
  static constexpr int width = 6, batch = 5, depth = 12;
  std::vector<Parameter<T>> params;  // W_0, b_0, W_1, b_1, ..., shared
  std::vector<std::function<Var<T>(const Var<T>&)>> layers;
  MatT<T> target = random_t<T>(width, batch, 77);

  mlp_stack() {
    for (int l = 0; l < depth; ++l) {
      params.push_back(random_parameter<T>(width, width, 100 + static_cast<std::uint64_t>(l), 0.7));
      params.push_back(random_parameter<T>(width, 1, 200 + static_cast<std::uint64_t>(l), 0.3));
    }
    params.push_back(random_parameter<T>(width, 1, 300, 0.5));
    for (int l = 0; l < depth; ++l) {
      layers.push_back([this, l](const Var<T>& h) -> Var<T> {
        Parameter<T>& W = params[2 * static_cast<std::size_t>(l)];
        Parameter<T>& b = params[2 * static_cast<std::size_t>(l) + 1];
        Parameter<T>& shared = params.back();
        const Var<T> z = tag(matmul(W, h), "h");
        if (l % 3 == 2) return relu(z * (shared + T(1)) + b);
        return tanh(z * (shared + T(1)) + b);
      });
    }
  }
  mlp_stack(const mlp_stack&) = delete;

  template <class P>
  Var<T> operator()(Tape<T>& t, std::vector<Var<T>>& in) {
    const Var<T> y = sequential<P>(layers, in[0]);
    return mse(y, t.constant(target));
  }
};

TEST_CASE_TEMPLATE("every policy: an MLP stack (layers form) has the gradients of none, bit for bit", T, float, double) {
  mlp_stack<T> body;
  const std::vector<MatT<T>> inputs{random_t<T>(mlp_stack<T>::width, mlp_stack<T>::batch, 1)};
  const auto params = pointers(body.params);
  const auto reference = run_policy<policy::none, T>(body, inputs, params);
  check_every_policy<T>(body, reference, inputs, params, "MLP stack", false);
}

// ------------------------------------------------------------------ the loop form, 50 steps

template <class T>
struct ode_loop {
  static constexpr std::size_t steps = 50;
  std::vector<Parameter<T>> params = make_parameters<T>({{4, 4, 11, 0.8}, {4, 1, 12, 0.5}});

  // The step is a type of its own, not a lambda inside operator()<P>: its ops are then
  // compiled once per T instead of once per policy (this file's compile time). It owns a
  // std::vector, so it is not trivially copyable: the tape keeps it in an owned holder, which
  // must outlive the checkpoints that sequential() makes (an ASan build checks that).
  struct step_fn {
    ode_loop* self;
    std::vector<T> offsets;
    Var<T> operator()(std::size_t i, const Var<T>& x) const {
      return x + tanh(matmul(self->params[0], x) + self->params[1] + offsets[i]) * T(0.1);
    }
  };
  template <class P>
  Var<T> operator()(Tape<T>&, std::vector<Var<T>>& in) {
    std::vector<T> offsets(steps);
    for (std::size_t i = 0; i < steps; ++i) offsets[i] = T(0.01) * static_cast<T>(i);
    static_assert(!std::is_trivially_copyable_v<step_fn>);
    const Var<T> y = sequential<P>(steps, step_fn{this, std::move(offsets)}, in[0]);
    return sum(square(y));
  }
};

TEST_CASE_TEMPLATE("every policy: the loop form over 50 steps has the gradients of none, bit for bit", T, float, double) {
  ode_loop<T> body;
  const std::vector<MatT<T>> inputs{random_t<T>(4, 3, 2)};
  const auto params = pointers(body.params);
  const auto reference = run_policy<policy::none, T>(body, inputs, params);
  check_every_policy<T>(body, reference, inputs, params, "loop form", false);
}

// ------------------------------------------------------------------ nested checkpoints

/// Each step checkpoints a segment that checkpoints a segment that checkpoints a segment (with
/// three different save predicates); the policy adds its own levels around them. The reference
/// is the same program with no checkpoint at all.
template <class T>
struct nested {
  std::vector<Parameter<T>> params = make_parameters<T>({{4, 4, 21, 0.8}, {4, 4, 22, 0.8},
                                   {4, 4, 23, 0.8}, {4, 1, 24, 0.5}});
  bool inner = true;

  struct step_fn {
    nested* self;
    Var<T> operator()(std::size_t i, const Var<T>& x) const {
      nested* n = self;
      auto level3 = [n](const Var<T>& d) -> Var<T> {
        const Var<T> z = tag(matmul(n->params[2], d), "h");
        return tanh(z) * d;
      };
      auto level2 = [n, level3](const Var<T>& b) -> Var<T> {
        const Var<T> d = sigmoid(matmul(n->params[1], b));
        const Var<T> e = n->inner ? checkpoint<save::tagged<"h">>("level3", level3, d) : level3(d);
        return e + b;
      };
      auto level1 = [n, level2, i](const Var<T>& a) -> Var<T> {
        const Var<T> b = tanh(matmul(n->params[0], a) + n->params[3]);
        const Var<T> c = n->inner ? checkpoint<save::matmul>("level2", level2, b) : level2(b);
        return c * a * T(0.5) + a * (T(1) / static_cast<T>(i + 1));
      };
      return n->inner ? checkpoint("level1", level1, x) : level1(x);
    }
  };
  template <class P>
  Var<T> operator()(Tape<T>&, std::vector<Var<T>>& in) {
    const Var<T> y = sequential<P>(8, step_fn{this}, in[0]);
    return sum(square(y));
  }
};

TEST_CASE_TEMPLATE("every policy: checkpoints nested three deep have the gradients of none, bit for bit", T, float, double) {
  nested<T> body;
  const std::vector<MatT<T>> inputs{random_t<T>(4, 3, 3)};
  const auto params = pointers(body.params);
  body.inner = false;
  const auto reference = run_policy<policy::none, T>(body, inputs, params);
  body.inner = true;
  check_every_policy<T>(body, reference, inputs, params, "nested checkpoints", true);
}

// ------------------------------------------------------------------ dropout inside segments

template <class T>
struct dropout_loop {
  std::vector<Parameter<T>> params = make_parameters<T>({{6, 6, 31, 0.8}, {6, 1, 32, 0.5}});

  struct step_fn {
    dropout_loop* self;
    Var<T> operator()(std::size_t, const Var<T>& x) const {
      const Var<T> h = tanh(dropout(matmul(self->params[0], x) + self->params[1], 0.3));
      return x * T(0.5) + dropout(h, 0.2);
    }
  };
  template <class P>
  Var<T> operator()(Tape<T>&, std::vector<Var<T>>& in) {
    const Var<T> y = sequential<P>(16, step_fn{this}, in[0]);
    return sum(square(y));
  }
};

TEST_CASE_TEMPLATE("every policy: dropout inside segments draws the same masks on re-trace, bit for bit", T, float, double) {
  SUBCASE("the mask drops something, not everything, and differs between ops") {
    Tape<T> tape;
    tape.set_seed(0x1234);
    const Var<T> ones = tape.constant(MatT<T>::Ones(6, 4));
    const Var<T> a = dropout(ones, 0.3);
    const Var<T> b = dropout(ones, 0.3);
    const auto av = a.value(), bv = b.value();
    const long zeros = (av.array() == T(0)).count();
    CHECK(zeros > 0);
    CHECK(zeros < av.size());
    CHECK((av.array() != T(0)).select(av.array() - T(1) / T(0.7), T(0)).abs().maxCoeff() < T(1e-6));
    CHECK(!same_bits(av, bv));  // each op draws its own mask
  }
  SUBCASE("gradients equal none's; another seed gives other gradients (the masks matter)") {
    dropout_loop<T> body;
    const std::vector<MatT<T>> inputs{random_t<T>(6, 4, 4)};
    const auto params = pointers(body.params);
    const auto reference = run_policy<policy::none, T>(body, inputs, params, 0x1234);
    const auto other_seed = run_policy<policy::none, T>(body, inputs, params, 0x4321);
    CHECK(!same_bits(reference.grads[0], other_seed.grads[0]));
    // Some input gradient entries are exactly zero: every path from them was dropped.
    check_every_policy<T>(body, reference, inputs, params, "dropout", false);
  }
}

// ------------------------------------------------------------------ several inputs and outputs

/// A gated cell checkpointed as one segment of three inputs (one of them captured by the step
/// from outside) and three outputs returned as a std::tuple, the third a pass-through of an
/// input; then a segment of two inputs returning a std::array. The state travels through the
/// policy's chain as one tensor (h stacked on c).
template <class T>
struct multi_io {
  static constexpr int H = 3, B = 4;
  std::vector<Parameter<T>> params = make_parameters<T>({{H, H, 41, 0.8}, {H, H, 42, 0.8},
                                   {H, 1, 43, 0.5}});
  bool inner = true;

  template <class Save>
  struct step_fn {
    multi_io* self;
    Var<T> drive;  // captured by the step, passed on to the cell as an input
    Var<T> operator()(std::size_t, const Var<T>& s) const {
      multi_io* n = self;
      auto cell = [n](const Var<T>& h, const Var<T>& c, const Var<T>& d) -> std::tuple<Var<T>, Var<T>, Var<T>> {
        const Var<T> g = sigmoid(matmul(n->params[0], h) + d + n->params[2]);
        const Var<T> c2 = c * g + tanh(matmul(n->params[1], h));
        const Var<T> h2 = tanh(c2) * g;
        return {h2, c2, c};
      };
      auto mix = [](const Var<T>& a, const Var<T>& b) -> std::array<Var<T>, 2> {
        return {Var<T>(a * b), Var<T>(a - b * T(0.5))};
      };
      const Var<T> h = slice_rows(s, 0, H), c = slice_rows(s, H, H);
      const auto [h2, c2, c_pass] = n->inner ? checkpoint<Save>("cell", cell, h, c, drive) : cell(h, c, drive);
      const std::array<Var<T>, 2> m = n->inner ? checkpoint<Save>("mix", mix, h2, c2) : mix(h2, c2);
      return concat_rows({Var<T>(m[0] + c_pass * T(0.25)), m[1]});
    }
  };
  template <class P>
  Var<T> operator()(Tape<T>&, std::vector<Var<T>>& in) {
    const Var<T> y = sequential<P>(6, step_fn<typename save_of<P>::type>{this, in[1]}, in[0]);
    return sum(square(y));
  }
};

TEST_CASE_TEMPLATE("every policy: segments with several inputs and outputs have the gradients of none, bit for bit", T, float,
                   double) {
  multi_io<T> body;
  const std::vector<MatT<T>> inputs{random_t<T>(2 * multi_io<T>::H, multi_io<T>::B, 5), random_t<T>(multi_io<T>::H, multi_io<T>::B, 6)};
  const auto params = pointers(body.params);
  body.inner = false;
  const auto reference = run_policy<policy::none, T>(body, inputs, params);
  body.inner = true;
  check_every_policy<T>(body, reference, inputs, params, "several inputs and outputs", true);

  SUBCASE("an output that is a parameter's Var: its gradient adds to what the parameter has") {
    // P is returned by the segment, used after it, and used directly too; two steps accumulate
    // into P's gradient without zero_grad in between.
    Parameter<T> P = random_parameter<T>(3, 3, 44, 0.7);
    auto grads = [&](bool with_checkpoint) {
      P.zero_grad();
      std::vector<MatT<T>> r;
      for (int step = 0; step < 2; ++step) {
        Tape<T> tape;
        const Var<T> x = tape.variable(random_t<T>(3, 2, 45));
        auto segment = [&tape, &P](const Var<T>& a) {
          const Var<T> w = tape.param(P);
          return std::pair<Var<T>, Var<T>>{Var<T>(tanh(matmul(w, a))), w};
        };
        const auto [y, w] = with_checkpoint ? checkpoint("returns P", segment, x) : segment(x);
        const Var<T> loss = Var<T>(sum(matmul(w, y))) + sum(matmul(P, x));
        tape.backward(loss);
        r.push_back(tape.grad(x));
      }
      r.push_back(P.grad());
      return r;
    };
    const auto plain = grads(false), checkpointed = grads(true);
    for (std::size_t i = 0; i < plain.size(); ++i) CHECK(same_bits(plain[i], checkpointed[i]));
  }
  SUBCASE("a pass-through output is the input itself; a tuple output is a boundary") {
    Tape<T> tape;
    const Var<T> h = tape.variable(random_t<T>(3, 2, 7)), c = tape.variable(random_t<T>(3, 2, 8));
    const auto [a, b] = checkpoint(
        "pass", [](const Var<T>& x, const Var<T>& y) { return std::pair<Var<T>, Var<T>>{Var<T>(x * y), y}; }, h, c);
    CHECK(b.index() == c.index());
    CHECK(tape.node(a.index()).kind == op_kind::boundary);
    CHECK(std::string(tape.node(a.index()).op) == "pass");
  }
}

// ------------------------------------------------------------------ a parameter shared by every segment

/// One weight used twice in every step (directly and as tape.param(W) inside the segment), a
/// frozen weight (no gradient, one GEMM fewer) and a bias.
template <class T>
struct shared_parameter {
  std::vector<Parameter<T>> params = make_parameters<T>({{5, 5, 51, 0.6}, {5, 1, 52, 0.5}});
  Parameter<T> frozen = random_parameter<T>(5, 5, 53, 0.6, true);

  struct step_fn {
    shared_parameter* self;
    Tape<T>* t;
    Var<T> operator()(std::size_t, const Var<T>& x) const {
      const Var<T> W = t->param(self->params[0]);
      const Var<T> h = tanh(matmul(self->params[0], x) + self->params[1]);
      return sigmoid(matmul(W, h) + matmul(self->frozen, x));
    }
  };
  template <class P>
  Var<T> operator()(Tape<T>& t, std::vector<Var<T>>& in) {
    const Var<T> y = sequential<P>(24, step_fn{this, &t}, in[0]);
    return sum(square(y));
  }
};

TEST_CASE_TEMPLATE("every policy: a parameter shared by every segment gets the gradient of none, bit for bit", T, float, double) {
  shared_parameter<T> body;
  const std::vector<MatT<T>> inputs{random_t<T>(5, 3, 9)};
  const auto params = pointers(body.params);
  const auto reference = run_policy<policy::none, T>(body, inputs, params);
  check_every_policy<T>(body, reference, inputs, params, "shared parameter", false);
  CHECK(body.frozen.frozen());
}

// ------------------------------------------------------------------ captured outer Vars

/// The step captures a leaf `u` and an intermediate outer value `v` (both requiring gradients)
/// instead of receiving them as inputs; so does an explicit checkpoint after the chain.
template <class T>
struct captured {
  std::vector<Parameter<T>> params = make_parameters<T>({{4, 4, 61, 0.8}});

  struct step_fn {
    captured* self;
    Var<T> u, v;
    Var<T> operator()(std::size_t, const Var<T>& x) const { return tanh(matmul(self->params[0], x) + u) + x * v; }
  };
  struct tail_fn {
    Var<T> u, v;
    Var<T> operator()(const Var<T>& a) const { return a * u + v; }
  };
  template <class P>
  Var<T> operator()(Tape<T>&, std::vector<Var<T>>& in) {
    const Var<T> u = in[1];
    const Var<T> v = tanh(in[2] * T(2));
    const Var<T> y = sequential<P>(20, step_fn{this, u, v}, in[0]);
    const Var<T> z = checkpoint("captures u and v", tail_fn{u, v}, y);
    return Var<T>(sum(z * z)) + sum(v);
  }
};

TEST_CASE_TEMPLATE("every policy: segments capturing outer Vars have the gradients of none, bit for bit", T, float, double) {
  captured<T> body;
  const std::vector<MatT<T>> inputs{random_t<T>(4, 3, 10), random_t<T>(4, 1, 11), random_t<T>(4, 3, 12)};
  const auto params = pointers(body.params);
  const auto reference = run_policy<policy::none, T>(body, inputs, params);
  check_every_policy<T>(body, reference, inputs, params, "captured outer Vars", true);
}

}  // namespace
